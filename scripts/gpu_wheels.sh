#!/usr/bin/env bash
# Build .whl/ here: the pure-Python wheels the lent GPU machine lacks (it has torch, triton,
# pyarrow and an older transformers but no network): liger-kernel, hydra, datasets (the bank's
# Arrow sets) and this tree's transformers, so the GPU runs the code the CPU tests ran. Then run there: bash scripts/gpu_check.sh, carrying .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -q '^/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any --platform manylinux_2_17_x86_64 -d .whl \
  liger-kernel==0.8.5 hydra-core==1.3.8 omegaconf==2.3.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0
# antlr4-python3-runtime 4.9.3 (what omegaconf pins) is published as source only: build a wheel
"${PIP[@]}" wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
