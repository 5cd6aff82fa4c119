# Shared by start-head.sh and start-worker.sh (sourced, not run).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
[ -x "$RAY" ] || RAY="$(command -v ray)" || { echo "ray not found: set RAY=/path/to/ray" >&2; exit 1; }
# Job entrypoints (`python -m verl.trainer.main_ppo`) and Ray workers run the `python` on this
# node's PATH: make it the interpreter next to `ray`, the one agemem and verl are installed in.
export PATH="$(dirname "$RAY"):$PATH"

# GPUs this node offers Ray: RAY_NUM_GPUS wins, else what nvidia-smi lists (0 without a driver).
detect_gpus() {
  if [ -n "${RAY_NUM_GPUS:-}" ]; then echo "$RAY_NUM_GPUS"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# The address other nodes reach this one on: RAY_NODE_IP wins, else the first non-loopback IPv4.
detect_ip() {
  if [ -n "${RAY_NODE_IP:-}" ]; then echo "$RAY_NODE_IP"; return; fi
  hostname -I 2>/dev/null | awk '{print $1}'
}

# Fixed ports, so a firewall / security group can be written once (see README.md).
NODE_MANAGER_PORT="${RAY_NODE_MANAGER_PORT:-6380}"
OBJECT_MANAGER_PORT="${RAY_OBJECT_MANAGER_PORT:-6381}"
MIN_WORKER_PORT="${RAY_MIN_WORKER_PORT:-10002}"
MAX_WORKER_PORT="${RAY_MAX_WORKER_PORT:-10999}"

# `ray start` arguments every node takes (its address, the fixed ports, its GPUs and CPUs) in
# NODE_ARGS; usage: node_args <ip> <gpus>.
node_args() {
  NODE_ARGS=(--node-ip-address "$1"
    --node-manager-port "$NODE_MANAGER_PORT" --object-manager-port "$OBJECT_MANAGER_PORT"
    --min-worker-port "$MIN_WORKER_PORT" --max-worker-port "$MAX_WORKER_PORT"
    --num-gpus "$2")
  if [ -n "${RAY_NUM_CPUS:-}" ]; then NODE_ARGS+=(--num-cpus "$RAY_NUM_CPUS"); fi
}
