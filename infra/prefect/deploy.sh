#!/usr/bin/env bash
# Register the deployments of prefect.yaml (agemem-pipeline, nightly-champion-eval) with a server.
# Waits for the server and creates the work pool if needed, so it can follow server.sh at once.
#   PREFECT_API_URL     server (default http://127.0.0.1:4200/api)
#   AGEMEM_PROJECT_DIR  checkout the flow runs change into (default: this checkout); baked into
#                       the deployments' pull step
# Extra arguments go to `prefect deploy` (default: --all).
set -euo pipefail
source "$(dirname "$0")/common.sh"
export AGEMEM_PROJECT_DIR="${AGEMEM_PROJECT_DIR:-$ROOT}"
wait_for_api
ensure_pool "${AGEMEM_WORK_POOL:-agemem-process}"
cd "$ROOT"  # prefect deploy reads ./prefect.yaml and resolves entrypoints from here
if [ "$#" -eq 0 ]; then set -- --all; fi
exec "$PREFECT" --no-prompt deploy "$@"
