# Sourced by server.sh, worker.sh and deploy.sh: the prefect executable, the API address, and two
# steps that make the scripts safe to paste one after another (README "Deploy, schedule and watch"):
# wait until the server answers, and create the work pool only if no one has.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFECT="${PREFECT:-$ROOT/.venv/bin/prefect}"
PYTHON="${PYTHON:-$(dirname "$PREFECT")/python}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"

# Wait for GET $PREFECT_API_URL/health (a server started a moment ago takes 10-30 s to answer).
#   AGEMEM_PREFECT_WAIT_S  how long to wait (default 180)
wait_for_api() {
  local limit="${AGEMEM_PREFECT_WAIT_S:-180}" start=$SECONDS
  until "$PYTHON" -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/health", timeout=2)' "$PREFECT_API_URL" >/dev/null 2>&1; do
    if (( SECONDS - start >= limit )); then
      echo "error: no Prefect API at $PREFECT_API_URL after ${limit} s; start it with infra/prefect/server.sh" >&2
      return 1
    fi
    sleep 1
  done
}

# Create the process work pool unless it exists. worker.sh and deploy.sh may run at the same time:
# if creating fails because the other one just made it, that is success.
ensure_pool() {
  local pool="$1" out
  "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1 && return 0
  if ! out="$("$PREFECT" work-pool create "$pool" --type process 2>&1)"; then
    "$PREFECT" work-pool inspect "$pool" >/dev/null 2>&1 && return 0
    echo "$out" >&2
    return 1
  fi
}
