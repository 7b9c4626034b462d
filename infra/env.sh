# Shared settings for infra/serve.sh and infra/stop.sh. Source it, don't run it:
#
#     source infra/env.sh && "$PREFECT_BIN" deployment run train-dalle/full
#
# gives a shell that talks to the servers serve.sh started (same API URL, same PREFECT_HOME).
# Everything lives under one root, ROOT = $DALLE_HOME or <repo>/runs (for a DALLE_HOME on an object store,
# its local cache, and the artifacts on the store), so the user's ~/.prefect and ~/.mlflow are never touched:
#
#     $ROOT/prefect/        PREFECT_HOME (Prefect's profiles and, by default, its server's sqlite
#                           database prefect.db)
#     $ROOT/mlflow.db       the MLflow store, shared by the MLflow server and the flows
#     $ROOT/mlartifacts/    MLflow artifacts
#     $ROOT/logs/*.log      one log per service
#     $ROOT/pids/*.pid      one pid file per service; each pid leads its own process group
#
# Knobs (environment): DALLE_HOME, PREFECT_PORT (4200), MLFLOW_PORT (5000), PREFECT_POOL
# (dalle-pool), VENV (<repo>/.venv), DALLE_PREFECT_HOME ($ROOT/prefect), DALLE_WORKER_LIMIT (3), DALLE_WEBHOOK_URL
# (unset: no notifications),
# DALLE_START_TIMEOUT (180 s per service), DALLE_STOP_GRACE (5 s), DALLE_STOP_TIMEOUT (20 s),
# PREFECT_DATABASE_URL (empty: SQLite under the root; else the Prefect server's PostgreSQL database
# as postgresql+asyncpg://USER:PASSWORD@HOST:PORT/NAME, checked by serve.sh before the server
# starts; PostgreSQL itself is yours to run: serve.sh and stop.sh never start or stop it).

DALLE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DALLE_REPO

VENV="${VENV:-$DALLE_REPO/.venv}"
PREFECT_BIN="$VENV/bin/prefect"
MLFLOW_BIN="$VENV/bin/mlflow"

# A relative DALLE_HOME is taken from the caller's directory, before any script changes it. A root on an
# object store (DALLE_HOME=s3://bucket/dalle) stays the flows' root; the services' own files (databases,
# logs, pids) go to its local cache (DALLE_CACHE, else ~/.cache/dalle-pipeline/<store>), MLflow's artifacts
# to the store. An unknown protocol is refused here, naming it, before anything starts.
STORE=""
if [[ "${DALLE_HOME:-}" == *://* && "$DALLE_HOME" != file://* ]]; then
    STORE="${DALLE_HOME%/}"
    ROOT="$("$VENV/bin/python" -c 'import sys
from dalle_pipeline.components.storage import run_root
try:
    print(run_root(sys.argv[1], "DALLE_HOME").local)
except ValueError as error:
    sys.exit(f"infra/env.sh: {error}")' "$STORE")" || return 1 2>/dev/null || exit 1
    mkdir -p "$ROOT"
elif [[ -n "${DALLE_HOME:-}" ]]; then
    DALLE_HOME="${DALLE_HOME#file://}"
    mkdir -p "$DALLE_HOME"
    ROOT="$(cd "$DALLE_HOME" && pwd)"
else
    ROOT="$DALLE_REPO/runs"
fi
export DALLE_HOME="${STORE:-$ROOT}"

PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export PREFECT_POOL="${PREFECT_POOL:-dalle-pool}"   # prefect.yaml reads it as {{ $PREFECT_POOL }}

export PREFECT_HOME="${DALLE_PREFECT_HOME:-$ROOT/prefect}"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
# the pipeline's defaults (components/environment.py: no usage reports) for the servers and the worker too
eval "$("$VENV/bin/python" -m dalle_pipeline.components.environment)"
DALLE_PREFECT_UI="http://127.0.0.1:$PREFECT_PORT"
# The Prefect server's database. Not a Prefect setting: serve.sh hands it to the server alone, as
# PREFECT_SERVER_DATABASE_CONNECTION_URL (Prefect 3's name; PREFECT_API_DATABASE_CONNECTION_URL is
# its older alias), so a password in it reaches no other process. The server needs an async
# driver: aiosqlite or asyncpg, both Prefect dependencies.
PREFECT_DATABASE_URL="${PREFECT_DATABASE_URL:-sqlite+aiosqlite:///$PREFECT_HOME/prefect.db}"

MLFLOW_BACKEND_URI="sqlite:///$ROOT/mlflow.db"
MLFLOW_ARTIFACTS="${STORE:-$ROOT}/mlartifacts"   # where the flows put their runs' artifacts (storage.RunRoot)
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"

LOG_DIR="$ROOT/logs"
PID_DIR="$ROOT/pids"
START_TIMEOUT="${DALLE_START_TIMEOUT:-180}"
STOP_GRACE="${DALLE_STOP_GRACE:-5}"
STOP_TIMEOUT="${DALLE_STOP_TIMEOUT:-20}"

# The services serve.sh manages, in start order (stop.sh goes in reverse).
DALLE_SERVICES=(prefect-server mlflow-server prefect-worker)

# pid of a running service, or nothing (a stale pid file is removed).
service_pid() {
    local pidfile="$PID_DIR/$1.pid" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(<"$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    else
        rm -f "$pidfile"
    fi
}

# True while any process of the group led by $1 is alive.
group_alive() {
    kill -0 -- "-$1" 2>/dev/null
}

# A database URL with its password, if any, shown as ***: fit for logs and error messages.
redact_url() {
    sed -E 's#^([^:/]+://[^:/@]*):[^@/]*@#\1:***@#' <<<"$1"
}

# Last lines of a service's log, indented, for error messages.
log_tail() {
    [[ -f "$LOG_DIR/$1.log" ]] && tail -n "${2:-30}" "$LOG_DIR/$1.log" | sed 's/^/    | /'
}
