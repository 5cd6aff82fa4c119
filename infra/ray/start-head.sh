#!/usr/bin/env bash
# Start the Ray head node for multi-node verl training (`agemem train --backend verl`).
#   RAY_NODE_IP          address other nodes use (default: first non-loopback IPv4)
#   RAY_GCS_PORT         6379   GCS; workers join on <ip>:6379
#   RAY_DASHBOARD_HOST   defaults to RAY_NODE_IP; the Jobs API `ray job submit` talks to
#   RAY_DASHBOARD_PORT   8265   -> AGEMEM_TRAIN__RAY_ADDRESS=http://<ip>:8265
#   RAY_CLIENT_PORT      10001  Ray client (ray://), unused by agemem
#   RAY_NUM_GPUS         default: nvidia-smi's count (0 = a CPU-only head that schedules only)
#   RAY_NUM_CPUS         default: Ray's own detection
# Extra arguments go to `ray start` (e.g. --block in a container).
set -euo pipefail
source "$(dirname "$0")/common.sh"
IP="$(detect_ip)"
GPUS="$(detect_gpus)"
node_args "$IP" "$GPUS"
ARGS=(--head "${NODE_ARGS[@]}"
  --port "${RAY_GCS_PORT:-6379}"
  --dashboard-host "${RAY_DASHBOARD_HOST:-$IP}" --dashboard-port "${RAY_DASHBOARD_PORT:-8265}"
  --ray-client-server-port "${RAY_CLIENT_PORT:-10001}")
echo "ray head on $IP with $GPUS GPU(s); submit with AGEMEM_TRAIN__RAY_ADDRESS=http://$IP:${RAY_DASHBOARD_PORT:-8265}" >&2
exec "$RAY" start "${ARGS[@]}" "$@"
