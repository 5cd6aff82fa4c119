#!/usr/bin/env bash
# Start a process worker for the agemem deployments, creating the work pool on first use.
# Flow runs execute in this checkout's .venv, on this machine (its CPUs/GPUs, its runs/ folder).
#   PREFECT_API_URL     server to poll (default http://127.0.0.1:4200/api)
#   AGEMEM_PROJECT_DIR  checkout the runs change into (default: this checkout)
#   AGEMEM_WORK_POOL    work pool name (default agemem-process, as in prefect.yaml)
# Extra arguments go to `prefect worker start` (e.g. --limit 1, --run-once).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PREFECT="${PREFECT:-$ROOT/.venv/bin/prefect}"
POOL="${AGEMEM_WORK_POOL:-agemem-process}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export AGEMEM_PROJECT_DIR="${AGEMEM_PROJECT_DIR:-$ROOT}"
if ! "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
  "$PREFECT" work-pool create "$POOL" --type process
fi
cd "$AGEMEM_PROJECT_DIR"
exec "$PREFECT" worker start --pool "$POOL" --type process "$@"
