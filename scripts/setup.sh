#!/usr/bin/env bash
# Create .venv at the repo root and install agemem from pinned constraints.
# Without an NVIDIA GPU: the [dev,train] extras with constraints.txt, torch==2.13.0 (the CPU build)
# first so that nothing pulls the multi-GB CUDA build.
# With one (nvidia-smi sees a device): the [dev,train,gpu] extras with constraints-gpu.txt, verl
# 0.9.1's tested stack (torch 2.11, vllm 0.24.0, transformers 5.9.0), then flash-attn 2.8.3 built
# against that torch; if it does not build, verl's attention falls back to sdpa.
# Safe to re-run: an up-to-date environment installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
if [ "$GPU" = 1 ]; then
  EXTRAS="${AGEMEM_EXTRAS:-dev,train,gpu}"
else
  EXTRAS="${AGEMEM_EXTRAS:-dev,train}"
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# Some machines' pip config lists index folders that do not exist: drop only those warnings.
quiet() { "$@" 2> >(grep -v "is neither a file nor a directory" >&2); }

stamp=.venv/.agemem-installed
# shellcheck disable=SC2086
want="$(cat pyproject.toml constraints.txt $([ "$GPU" = 1 ] && echo constraints-gpu.txt) | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

if [ "$GPU" = 1 ]; then
  echo "setup: NVIDIA GPU found: verl 0.9.1's tested GPU stack from constraints-gpu.txt (.[${EXTRAS}])"
  CONSTRAINTS=constraints-gpu.txt
else
  echo "setup: no NVIDIA GPU: installing the CPU build torch==2.13.0 first"
  quiet "${PIP[@]}" install -q "torch==2.13.0"
  CONSTRAINTS=constraints.txt
fi
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
if [ "$GPU" = 1 ]; then
  # flash-attn compiles against the installed torch (no wheel on PyPI): optional, sdpa otherwise.
  quiet "${PIP[@]}" install -q --no-build-isolation -c "$CONSTRAINTS" "flash-attn==2.8.3" \
    || echo "setup: flash-attn did not build: verl uses sdpa attention (train.attn_implementation=auto)"
fi
echo "$want" > "$stamp"
echo "setup: done (.venv/bin/agemem)"
