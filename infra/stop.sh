#!/usr/bin/env bash
# Stop what infra/serve.sh started, worker first (so its flow runs can still report their state),
# then the MLflow and Prefect servers. Pid files are removed. Idempotent: services that are not
# running are skipped.
#
# A service is its pid file's process, which leads its own process group, plus every descendant:
# the process worker starts each flow run in a new session, and a flow run's Ray daemons and
# workers hang below it, so a group signal alone would leave them running. Flow runs still in
# progress are ended (Prefect marks them Crashed). Each service gets SIGTERM; its leader a second
# SIGTERM after DALLE_STOP_GRACE seconds; whatever is left, SIGKILL after DALLE_STOP_TIMEOUT.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# The members of process group $1, the pids given after it, and all their descendants, one pid a
# line, from one snapshot.
service_tree() {
    ps -eo pid=,ppid=,pgid= | awk -v group="$1" -v extra="${*:2}" '
        BEGIN { n = split(extra, queue, " "); for (i = 1; i <= n; i++) seen[queue[i]] }
        { kids[$2] = kids[$2] " " $1; if ($3 == group && !($1 in seen)) { seen[$1]; queue[++n] = $1 } }
        END {
            for (i = 1; i <= n; i++) {
                print queue[i]
                m = split(kids[queue[i]], found, " ")
                for (j = 1; j <= m; j++) if (!(found[j] in seen)) { seen[found[j]]; queue[++n] = found[j] }
            }
        }' | sort -u
}

# Those of the given pids still alive.
alive() {
    local p
    for p in "$@"; do
        if kill -0 "$p" 2>/dev/null; then echo "$p"; fi
    done
}

# Wait up to $1 seconds for all of the following pids to be gone.
wait_gone() {
    local limit="$1" start=$SECONDS
    shift
    while [[ -n "$(alive "$@")" ]] && ((SECONDS - start < limit)); do
        sleep 0.5
    done
}

stop_service() {
    local name="$1" pidfile="$PID_DIR/$1.pid" pid start=$SECONDS left
    local -a tree
    if [[ ! -f "$pidfile" ]]; then
        echo "$name: not running"
        return 0
    fi
    pid="$(<"$pidfile")"
    # The leader may be gone while its group or its flow runs live on: look at the whole tree.
    tree=()
    [[ "$pid" =~ ^[0-9]+$ ]] && mapfile -t tree < <(alive $(service_tree "$pid" "$pid"))
    if ((${#tree[@]} == 0)); then
        echo "$name: not running (stale pid file removed)"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "${tree[@]}" 2>/dev/null || true
    wait_gone "$STOP_GRACE" "${tree[@]}"
    # Prefect's CLIs take a second signal as "force": an idle `prefect worker` (3.9) logs the
    # first SIGTERM, turns it into SIGINT and keeps polling; only the second one ends it.
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
    fi
    wait_gone "$((STOP_TIMEOUT - (SECONDS - start)))" "${tree[@]}"
    # Anything still there, and anything it started meanwhile, is killed.
    left="$(alive $(service_tree "$pid" $(alive "${tree[@]}")))"
    if [[ -n "$left" ]]; then
        kill -KILL $left 2>/dev/null || true
        echo "$name: killed $(wc -w <<<"$left") process(es) still running after ${STOP_TIMEOUT}s"
    else
        echo "$name: stopped (pid $pid, $((SECONDS - start))s)"
    fi
    rm -f "$pidfile"
}

status=0
for ((i = ${#DALLE_SERVICES[@]} - 1; i >= 0; i--)); do
    stop_service "${DALLE_SERVICES[i]}" || status=1
done
exit "$status"
