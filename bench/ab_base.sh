#!/usr/bin/env bash
# The same LoRA step with an older commit's code, on the GPU machine, for a same-machine A/B.
#
#   bash bench/ab_base.sh COMMIT MODEL QUANT SEQ [BATCH]      e.g. bash bench/ab_base.sh fd7e747 8b nf4 2048
#
# Why: tokens/s differ by a few percent between machines (and the host-bound 1B case by far more), so a
# change is measured against the old code in the same call, alternating. The old code runs from a
# `git archive` in /tmp/base-COMMIT, with only it and the wheels on PYTHONPATH (this tree's slothnb would
# shadow it). Run `bash bench/run_gpu.sh model:MODEL` first (it installs the wheels and builds the model).
# Appends to $OUT/results-base.jsonl and prints tokens/s, peak allocated GiB and the first losses.
set -euo pipefail
commit=$1 model=$2 quant=$3 seq=$4 batch=${5:-2}
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/bench-out}"
base=/tmp/base-$commit
if [ -d "$REPO/build/base-$commit/slothnb" ]; then
  # made on the development machine and carried (the GPU machine's copy of .git may lack recent commits):
  #   git archive COMMIT slothnb kernels bench | tar -x -C build/base-COMMIT
  base="$REPO/build/base-$commit"
elif [ ! -d "$base/slothnb" ]; then
  mkdir -p "$base" && git -C "$REPO" archive "$commit" slothnb kernels bench | tar -x -C "$base"
fi
mkdir -p "$OUT"
(cd "$base" && env -u PYTHONPATH PYTHONPATH="$base:/tmp/site" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  ANCHOR_MODEL_ROOT="${ANCHOR_MODEL_ROOT:-/tmp/anchor_models}" timeout "${CASE_TIMEOUT:-300}" \
  python3 bench/lora_step.py --model "$model" --quant "$quant" --seq "$seq" --batch "$batch" --grad-ckpt slothnb \
  --peak-tflops "${PEAK_TFLOPS:-778}" ${LORA_STEP_ARGS:-} --out "$OUT/results-base.jsonl" > /dev/null 2>&1) || echo "base run failed"
tail -1 "$OUT/results-base.jsonl" | python3 -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"base {r.get('model')} {r.get('quant')} {r.get('seq')}: {r.get('tokens_per_s')} tok/s, \"
      f\"{r.get('peak_alloc_gib')} GiB, losses {r.get('losses', [])[:3]}, steps ms {[round(t * 1000) for t in r.get('step_times_s', [])]}\")"
