#!/usr/bin/env bash
# A local MLflow tracking + registry server on loopback: sqlite backend store and served
# artifacts under runs/mlflow-server/ (override with MLFLOW_SERVER_DIR).
#   MLFLOW_SERVER_HOST (default 127.0.0.1)   MLFLOW_SERVER_PORT (default 5000)
# Point agemem at it: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# Extra arguments go to `mlflow server`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
MLFLOW="${MLFLOW:-$ROOT/.venv/bin/mlflow}"
DATA="$(mkdir -p "${MLFLOW_SERVER_DIR:-$ROOT/runs/mlflow-server}" && cd "${MLFLOW_SERVER_DIR:-$ROOT/runs/mlflow-server}" && pwd)"
mkdir -p "$DATA/artifacts"
export MLFLOW_ENABLE_TELEMETRY="${MLFLOW_ENABLE_TELEMETRY:-false}"
# MLflow's background job runner (GenAI scorers) starts 7 extra processes; agemem uses none of it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# One worker: sqlite takes one writer at a time, and a single worker is healthy in ~8 s on 2 cores.
exec "$MLFLOW" server \
  --backend-store-uri "sqlite:///$DATA/mlflow.db" \
  --artifacts-destination "$DATA/artifacts" --serve-artifacts \
  --host "${MLFLOW_SERVER_HOST:-127.0.0.1}" --port "${MLFLOW_SERVER_PORT:-5000}" \
  --workers 1 "$@"
