#!/usr/bin/env bash
# Register the deployments of prefect.yaml (agemem-pipeline, nightly-champion-eval) with a server.
#   PREFECT_API_URL     server (default http://127.0.0.1:4200/api)
#   AGEMEM_PROJECT_DIR  checkout the flow runs change into (default: this checkout); baked into
#                       the deployments' pull step
# Extra arguments go to `prefect deploy` (default: --all).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PREFECT="${PREFECT:-$ROOT/.venv/bin/prefect}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export AGEMEM_PROJECT_DIR="${AGEMEM_PROJECT_DIR:-$ROOT}"
if ! "$PREFECT" work-pool inspect agemem-process >/dev/null 2>&1; then
  "$PREFECT" work-pool create agemem-process --type process
fi
cd "$ROOT"  # prefect deploy reads ./prefect.yaml and resolves entrypoints from here
if [ "$#" -eq 0 ]; then set -- --all; fi
exec "$PREFECT" --no-prompt deploy "$@"
