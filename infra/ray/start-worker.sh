#!/usr/bin/env bash
# Join this machine to a Ray cluster as a worker node.
#   usage: infra/ray/start-worker.sh <head-ip>[:<gcs-port>]   (or RAY_HEAD_ADDRESS=...)
#   RAY_NODE_IP    this node's address (default: first non-loopback IPv4)
#   RAY_NUM_GPUS   default: nvidia-smi's count
#   RAY_NUM_CPUS   default: Ray's own detection
# Extra arguments after the address go to `ray start` (e.g. --block in a container).
# The agemem package (and its `train` extra: verl, vllm) must be importable here, see README.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"
HEAD="${1:-${RAY_HEAD_ADDRESS:-}}"
[ -n "$HEAD" ] || { echo "usage: $0 <head-ip>[:6379] [ray start args...]" >&2; exit 2; }
[ $# -gt 0 ] && shift
case "$HEAD" in *:*) ;; *) HEAD="$HEAD:6379" ;; esac
IP="$(detect_ip)"
GPUS="$(detect_gpus)"
if [ "$GPUS" = "0" ]; then
  echo "warning: no GPU found on this node (set RAY_NUM_GPUS to override); verl rollout/training needs GPUs" >&2
fi
node_args "$IP" "$GPUS"
ARGS=(--address "$HEAD" "${NODE_ARGS[@]}")
echo "ray worker $IP with $GPUS GPU(s) joining $HEAD" >&2
exec "$RAY" start "${ARGS[@]}" "$@"
