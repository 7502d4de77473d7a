#!/usr/bin/env bash
# The one command for a lent GPU machine (DESIGN.md "Scale-out": checked on a GPU when one is lent).
#
#   bash scripts/gpu_check.sh                      # there: wheels, gpu tests, scripts/gpu_check.py
#   PY=.venv/bin/python OUT=/tmp/gc bash scripts/gpu_check.sh --allow-cpu --tiny   # CPU smoke here
#
# 1. installs the carried pure-Python wheels (.whl/, made by scripts/gpu_wheels.sh: liger-kernel, hydra-core, omegaconf, antlr4;
#    the GPU image lacks them) into $SITE and puts $SITE and the repo root on PYTHONPATH (the
#    project is not pip-installed there);
# 2. runs the gpu test tier: python -m pytest -m gpu -q tests/gpu;
# 3. runs scripts/gpu_check.py --out $OUT/gpu_check.json (its arguments: this script's);
# 4. on CUDA, times the fused loss's chunk sizes (auto, 256, 1,024 rows) with
#    bench/bench_losses.py.
# Each step has its own time limit and a failing step does not stop the next; everything is
# tee'd to $OUT/gpu_check.log, and a status table is printed last. Ends within about 9 minutes
# (with PYTEST_LIMIT_S=200: keep the sum of the limits under the device tool's 600 s a call).
# Exit status: 0 when every step passed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
SITE=${SITE:-/tmp/site}
PYTEST_LIMIT_S=${PYTEST_LIMIT_S:-120}
CHECK_LIMIT_S=${CHECK_LIMIT_S:-290}
LOSS_LIMIT_S=${LOSS_LIMIT_S:-90}
mkdir -p "$OUT"

declare -a STEPS=() CODES=() SECS=()
record() { STEPS+=("$1"); CODES+=("$2"); SECS+=("$3"); }

main() {
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  local t0 rc
  echo "== gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $PWD"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv

  t0=$SECONDS
  if compgen -G ".whl/*.whl" >/dev/null; then
    ls -l .whl
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl
    rc=$?
  else
    echo "no .whl/ here: liger-kernel, hydra-core, omegaconf must already be importable"
    rc=0
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import torch, transformers, triton, liger_kernel, hydra, omegaconf, datasets, factory.losses, factory.sampling, students.builders
print('imports ok: torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| triton', triton.__version__)" \
    || rc=1
  record "install wheels + imports" "$rc" $((SECONDS - t0))

  t0=$SECONDS
  echo; echo "== pytest -m gpu tests/gpu (limit ${PYTEST_LIMIT_S} s)"
  timeout -k 10 "$PYTEST_LIMIT_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/gpu
  rc=$?
  record "pytest -m gpu tests/gpu" "$rc" $((SECONDS - t0))

  t0=$SECONDS
  echo; echo "== scripts/gpu_check.py $* (limit ${CHECK_LIMIT_S} s)"
  # SIGINT first: the script catches it, keeps the sections it finished and prints its table
  timeout -s INT -k 20 "$CHECK_LIMIT_S" "$PY" scripts/gpu_check.py --out "$OUT/gpu_check.json" "$@"
  rc=$?
  record "scripts/gpu_check.py" "$rc" $((SECONDS - t0))

  if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    t0=$SECONDS
    echo; echo "== bench/bench_losses.py: chunk sizes on the device (limit ${LOSS_LIMIT_S} s)"
    # the real-scale overlays chunk the fused losses 1,024 rows at a time, not auto's 110 rows:
    # time both at the 8B student's hidden size, bf16, one round
    timeout -k 10 "$LOSS_LIMIT_S" "$PY" bench/bench_losses.py --device cuda --dtype bf16 \
      --tokens 4096 --hidden 4096 --chunk-sizes 0,256,1024 --no-liger --no-doc
    rc=$?
    record "bench_losses.py chunk sizes" "$rc" $((SECONDS - t0))
  fi

  echo; echo "== gpu_check.sh summary"
  printf '| %-28s | %-6s | %-7s |\n' "step" "status" "seconds"
  printf '| %-28s | %-6s | %-7s |\n' "---" "---" "---"
  local i fails=0 status
  for i in "${!STEPS[@]}"; do
    if [ "${CODES[$i]}" = 0 ]; then status=ok; else status="rc=${CODES[$i]}"; fails=$((fails + 1)); fi
    printf '| %-28s | %-6s | %-7s |\n' "${STEPS[$i]}" "$status" "${SECS[$i]}"
  done
  echo "(rc=124/137: the step ran out of its time limit; gpu_check.py rc=1: a check failed, 130: cut short)"
  echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
  return $((fails > 0))
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
