#!/usr/bin/env bash
# Set up a virtual environment in .venv with the project installed (editable) and its test tools.
# On a machine without CUDA it installs torch's CPU build first, so nothing pulls the multi-GB
# CUDA build. Idempotent: a second call only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" torch
  elif ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"            # the CPU wheel that lies on this kind of machine
  else
    "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if ! .venv/bin/python -c "import factory, hydra, liger_kernel, pytest_timeout, xdist" 2>/dev/null; then
  "${PIP[@]}" -e ".[dev]"
fi
# the code sandbox (bubblewrap) for HumanEval-style tasks; needs root or sudo, skipped otherwise
[ -x .ci/install-system-deps.sh ] && bash .ci/install-system-deps.sh || true
