#!/usr/bin/env bash
# Start, on 127.0.0.1 only, what `prefect deployment run train-dalle/full` needs:
#
#   1. a Prefect server (API + UI) on SQLite under the root, or on the PostgreSQL database
#      PREFECT_DATABASE_URL names (checked first), waited for on /api/health; it logs the cause of
#      every 5xx it answers
#   2. an MLflow server over the same store the flows log to, waited for on /health
#   3. the process work pool $PREFECT_POOL (created if missing)
#   4. the deployments of prefect.yaml (`prefect deploy --all`, re-applied on every call)
#   4b. the `training` concurrency limit and, with DALLE_WEBHOOK_URL set, the webhook automations
#   5. one process worker polling that pool (up to DALLE_WORKER_LIMIT=3 runs at once: their compute
#      stages take turns on the `training` limit), waited for until the server lists it
#
# Idempotent: a service whose pid file names a live process is left alone, so a second call only
# redeploys. Each service leads its own session (setsid); infra/stop.sh stops it together with
# everything below it (uvicorn workers, flow runs, their Ray daemons). Settings: infra/env.sh.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DALLE_REPO"
# The database URL (and its password) goes to the Prefect server only, not to MLflow or the worker.
export -n PREFECT_DATABASE_URL

for bin in "$PREFECT_BIN" "$MLFLOW_BIN"; do
    [[ -x "$bin" ]] || { echo "serve.sh: $bin not found; set VENV to the virtualenv to use" >&2; exit 1; }
done
mkdir -p "$LOG_DIR" "$PID_DIR" "$PREFECT_HOME"
[[ -n "$STORE" ]] || mkdir -p "$MLFLOW_ARTIFACTS"

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_service NAME PORT|- COMMAND...: start COMMAND detached, unless NAME already runs.
# Prints the new pid on stdout, nothing if it was running.
start_service() {
    local name="$1" port="$2" pid
    shift 2
    pid="$(service_pid "$name")"
    if [[ -n "$pid" ]]; then
        echo "$name: already running (pid $pid)" >&2
        return 0
    fi
    if [[ "$port" != - ]] && port_in_use "$port"; then
        echo "serve.sh: port $port is taken by a process this root did not start;" \
            "stop it or choose another port (PREFECT_PORT / MLFLOW_PORT)" >&2
        return 1
    fi
    echo "=== $(date -Is) serve.sh starting $name: $*" >>"$LOG_DIR/$name.log"
    # Not a process-group leader (no job control in a script), so setsid execs in place: $! is
    # the service itself and leads its own group.
    setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PID_DIR/$name.pid"
    echo "$name: started (pid $pid), log $LOG_DIR/$name.log" >&2
    echo "$pid"
}

# Kill a service that failed to come up, so a rerun starts it clean.
abandon_service() {
    local name="$1" pid="$2"
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$PID_DIR/$name.pid"
}

# wait_until NAME PID DESCRIPTION COMMAND...: poll COMMAND until it succeeds; fail if the
# service exits or START_TIMEOUT passes.
wait_until() {
    local name="$1" pid="$2" what="$3" start=$SECONDS
    shift 3
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "serve.sh: $name exited before $what; last lines of its log:" >&2
            log_tail "$name" >&2
            abandon_service "$name" "$pid"
            return 1
        fi
        if ((SECONDS - start >= START_TIMEOUT)); then
            echo "serve.sh: $name not $what after ${START_TIMEOUT}s; last lines of its log:" >&2
            log_tail "$name" >&2
            abandon_service "$name" "$pid"
            return 1
        fi
        sleep 1
    done
    echo "$name: $what after $((SECONDS - start))s" >&2
}

http_ok() {
    curl -fsS --max-time 5 -o /dev/null "$1"
}

# check_database: fail, naming the URL without its password, unless the server's database takes a
# login and a query. SQLite needs no check (the server creates the file under PREFECT_HOME). The URL
# reaches Python through the environment, never through argv, which any user can read in ps.
check_database() {
    local shown
    shown="$(redact_url "$PREFECT_DATABASE_URL")"
    case "$PREFECT_DATABASE_URL" in
    sqlite+aiosqlite://*) return 0 ;;
    postgresql+asyncpg://*) ;;
    *)
        echo "serve.sh: PREFECT_DATABASE_URL=$shown: the Prefect server takes" \
            "postgresql+asyncpg://USER:PASSWORD@HOST:PORT/NAME (or nothing, for SQLite under $ROOT)" >&2
        return 1
        ;;
    esac
    DALLE_DB_URL="$PREFECT_DATABASE_URL" DALLE_DB_SHOWN="$shown" "$VENV/bin/python" - <<'PY' >&2
import asyncio, os, sys

import asyncpg
from sqlalchemy.engine import make_url

async def check(dsn: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.fetchval("SELECT 1")
    finally:
        await connection.close()

try:
    url = make_url(os.environ["DALLE_DB_URL"])
except Exception:  # not a URL (a bad port, say); the message could quote the password
    sys.exit(f"serve.sh: PREFECT_DATABASE_URL={os.environ['DALLE_DB_SHOWN']} is not a database URL")
try:
    # asyncpg takes the same URL under libpq's scheme (query options such as sslmode included).
    asyncio.run(check(url.set(drivername="postgresql").render_as_string(hide_password=False)))
except Exception as error:
    reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if url.password:
        reason = reason.replace(url.password, "***")
    sys.exit(
        f"serve.sh: cannot log in to the Prefect server's database {os.environ['DALLE_DB_SHOWN']}"
        f" ({reason}); start PostgreSQL and create the role and database, or unset"
        " PREFECT_DATABASE_URL to use SQLite"
    )
PY
    echo "prefect database: $shown reachable" >&2
}

# 1. Prefect server, on PREFECT_DATABASE_URL (handed over in its environment, so it stays out of the
# log's command line). `prefect server start` through flows/prefect_server.py: on SQLite its
# transactions take the write lock when they begin, so concurrent writers wait their turn instead of
# one of them being refused (SQLITE_BUSY, answered 503; that module says why).
if [[ -z "$(service_pid prefect-server)" ]]; then
    check_database
fi
# PREFECT_SERVER_LOG_RETRYABLE_ERRORS: the server logs the database error behind each 503 it answers
# (a "retryable" one, which Prefect's own clients retry), so its log says why a request was refused.
pid="$(PREFECT_SERVER_DATABASE_CONNECTION_URL="$PREFECT_DATABASE_URL" \
    PREFECT_SERVER_LOG_RETRYABLE_ERRORS="${PREFECT_SERVER_LOG_RETRYABLE_ERRORS:-true}" \
    start_service prefect-server "$PREFECT_PORT" \
    "$VENV/bin/python" -m dalle_pipeline.flows.prefect_server --host 127.0.0.1 --port "$PREFECT_PORT")"
if [[ -n "$pid" ]]; then
    wait_until prefect-server "$pid" healthy http_ok "$PREFECT_API_URL/health"
fi

# 2. MLflow server. The flows write straight into $MLFLOW_BACKEND_URI (sqlite) with artifacts as
# local files under $MLFLOW_ARTIFACTS; --default-artifact-root points experiments the server
# itself creates (the Default one, or any made through its REST API) at the same local folder
# rather than at `mlflow-artifacts:/`, which a sqlite client could not write to. MLflow 3's job
# runner (a huey consumer pool for GenAI jobs, ~8 processes) is off unless asked for.
pid="$(start_service mlflow-server "$MLFLOW_PORT" \
    env MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    "$MLFLOW_BIN" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "$MLFLOW_BACKEND_URI" \
    --default-artifact-root "$MLFLOW_ARTIFACTS" \
    --artifacts-destination "$MLFLOW_ARTIFACTS")"
if [[ -n "$pid" ]]; then
    wait_until mlflow-server "$pid" healthy http_ok "$MLFLOW_URL/health"
fi

# 3. Work pool.
if ! "$PREFECT_BIN" work-pool inspect "$PREFECT_POOL" >/dev/null 2>&1; then
    "$PREFECT_BIN" work-pool create "$PREFECT_POOL" --type process >/dev/null
    echo "work pool $PREFECT_POOL: created" >&2
else
    echo "work pool $PREFECT_POOL: exists" >&2
fi

# 4. Deployments (every call, so edits to prefect.yaml or the flow's signature take effect).
if ! "$PREFECT_BIN" deploy --all --no-prompt >"$LOG_DIR/deploy.log" 2>&1; then
    echo "serve.sh: prefect deploy --all failed; last lines of $LOG_DIR/deploy.log:" >&2
    tail -n 40 "$LOG_DIR/deploy.log" | sed 's/^/    | /' >&2
    exit 1
fi
echo "deployments: $(grep -o "Deployment '[^']*'" "$LOG_DIR/deploy.log" | sort -u | tr '\n' ' ')" >&2

# 4b. The `training` concurrency limit the compute stages queue on (flows/concurrency.py: one slot, or one per
# GPU; a limit that exists is left as set), and with DALLE_WEBHOOK_URL the automations that call it when a
# run fails and when the champion moves (flows/notifications.py).
"$VENV/bin/python" -c 'from dalle_pipeline.flows.concurrency import ensure_training_limit as e; print(f"concurrency limit training: {e()} slot(s)")' >&2
if [[ -n "${DALLE_WEBHOOK_URL:-}" ]]; then
    "$VENV/bin/python" -m dalle_pipeline.flows.notifications "$DALLE_WEBHOOK_URL" >&2
fi

# 5. Worker. Its flow runs log to the MLflow store the server above shows, under the same root.
# Ready once this start's part of its log says so and the server lists it (the listing alone
# proves nothing after a restart: the server remembers workers by name).
worker_name="dalle-worker"
worker_log_start=$(($(stat -c %s "$LOG_DIR/prefect-worker.log" 2>/dev/null || echo 0) + 1))
worker_ready() {
    tail -c "+$worker_log_start" "$LOG_DIR/prefect-worker.log" | grep -q "Worker '$worker_name' started" &&
        curl -fsS --max-time 5 -X POST -H 'Content-Type: application/json' -d '{}' \
            "$PREFECT_API_URL/work_pools/$PREFECT_POOL/workers/filter" | grep -q "\"$worker_name\""
}
pid="$(start_service prefect-worker - \
    env MLFLOW_TRACKING_URI="$MLFLOW_BACKEND_URI" \
    "$PREFECT_BIN" worker start --pool "$PREFECT_POOL" --type process --name "$worker_name" \
    --limit "${DALLE_WORKER_LIMIT:-3}" --install-policy never)"
if [[ -n "$pid" ]]; then
    wait_until prefect-worker "$pid" "polling $PREFECT_POOL" worker_ready
fi

cat <<EOF

Prefect UI    $DALLE_PREFECT_UI
Prefect API   $PREFECT_API_URL   (database $(redact_url "$PREFECT_DATABASE_URL"))
MLflow UI     $MLFLOW_URL   (store $MLFLOW_BACKEND_URI, artifacts $MLFLOW_ARTIFACTS)
Work pool     $PREFECT_POOL (worker log $LOG_DIR/prefect-worker.log)

Run the pipeline:  source infra/env.sh && "\$PREFECT_BIN" deployment run train-dalle/full
                   (add --param preset=micro, or --param 'overrides={"prior": {"layers": 8}}')
Stop everything:   infra/stop.sh
EOF
