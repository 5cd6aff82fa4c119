#!/usr/bin/env bash
# Create .venv at the repo root and install agemem with the [dev,train] extras from pinned constraints.
# On a machine without an NVIDIA GPU, torch==2.13.0 (the CPU build) goes in first so that nothing
# pulls the multi-GB CUDA build. Safe to re-run: an up-to-date environment installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
EXTRAS="${AGEMEM_EXTRAS:-dev,train}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# Some machines' pip config lists index folders that do not exist: drop only those warnings.
quiet() { "$@" 2> >(grep -v "is neither a file nor a directory" >&2); }

stamp=.venv/.agemem-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing the CUDA torch your platform resolves"
  grep -v '^torch==' constraints.txt > .venv/constraints-gpu.txt
  CONSTRAINTS=.venv/constraints-gpu.txt
else
  echo "setup: no NVIDIA GPU: installing the CPU build torch==2.13.0 first"
  quiet "${PIP[@]}" install -q "torch==2.13.0"
  CONSTRAINTS=constraints.txt
fi
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "setup: done (.venv/bin/agemem)"
