#!/usr/bin/env bash
# Start a process worker for the agemem deployments, creating the work pool on first use.
# Flow runs execute in this checkout's .venv, on this machine (its CPUs/GPUs, its runs/ folder).
# Waits for the server first, so it can be started right after server.sh.
#   PREFECT_API_URL     server to poll (default http://127.0.0.1:4200/api)
#   AGEMEM_PROJECT_DIR  checkout the runs change into (default: this checkout)
#   AGEMEM_WORK_POOL    work pool name (default agemem-process, as in prefect.yaml)
# Extra arguments go to `prefect worker start` (e.g. --limit 1, --run-once).
set -euo pipefail
source "$(dirname "$0")/common.sh"
POOL="${AGEMEM_WORK_POOL:-agemem-process}"
export AGEMEM_PROJECT_DIR="${AGEMEM_PROJECT_DIR:-$ROOT}"
wait_for_api
ensure_pool "$POOL"
cd "$AGEMEM_PROJECT_DIR"
exec "$PREFECT" worker start --pool "$POOL" --type process "$@"
