#!/usr/bin/env bash
# Start a Prefect server on loopback: API + UI at http://127.0.0.1:4200 (database under PREFECT_HOME,
# ~/.prefect by default). Another port: PREFECT_SERVER_API_PORT=4300 infra/prefect/server.sh (not
# --port: the UI takes the API's address from this variable, and would look for it on 4200).
# Extra arguments go to `prefect server start`.
# worker.sh and deploy.sh wait until it answers, so all three can be started one after another.
set -euo pipefail
source "$(dirname "$0")/common.sh"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
# Loopback by default: the API has no authentication. Expose it on purpose (--host 0.0.0.0).
export PREFECT_SERVER_API_HOST="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
export PREFECT_SERVER_API_PORT="${PREFECT_SERVER_API_PORT:-4200}"
exec "$PREFECT" server start "$@"
