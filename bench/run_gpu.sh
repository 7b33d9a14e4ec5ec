#!/usr/bin/env bash
# One entry point for the GPU machine (it has no internet: everything comes as wheels).
#
# On the development machine, once per session, from the repository root:
#   bash bench/prepare_gpu.sh        # .whl/ (peers' wheels + gguf, pytest, slothnb) and peers/ (git-ignored)
# On the GPU machine (device tool, carry [".whl", "peers"]):
#   bash bench/run_gpu.sh STEP...
# STEP is one of
#   info                          GPU, versions, matmul ceiling (peers/device_info.py)
#   model:NAME                    build a random-initialised checkpoint (peers/make_models.py)
#   bench-model:NAME              one of bench/make_bench_models.py (3b, 5b), for slothnb's own defaults
#   tests[:PYTEST_ARGS]           the GPU test-suite (pytest -m gpu), log in $OUT/gpu-tests.log
#   kernels                       bench/kernels_ops.py (all ops) -> $OUT/kernels.json
#   attention                     bench/kernels_attention.py --sweep (Gemma-2 soft-capped attention) -> $OUT/kernels_attention.json
#   slothnb:MODEL:QUANT:SEQ:BATCH[:CKPT] bench/lora_step.py (CKPT: slothnb | true | false), one process per case;
#                                 env LORA_STEP_ARGS (e.g. "--rank 32 --alpha 32 --warmup 0 --steps 1"), CASE_TIMEOUT (300 s)
#   profile:MODEL:QUANT:SEQ:BATCH[:CKPT]  bench/profile_step.py (top GPU kernels, live memory at the peak) -> $OUT/profile-*.txt;
#                                 env PROFILE_ARGS: "--host" (the host's Python hot spots), "--gemms" (matmuls by
#                                 shape), "--timeline" (where the compute stream waits), "--copies"
#   base:COMMIT:MODEL:QUANT:SEQ[:BATCH]  the same step with an older commit's code (bench/ab_base.sh), for
#                                 same-machine A/B runs alternating with slothnb:...; -> $OUT/results-base.jsonl
#   PEER:MODEL:QUANT:SEQ:BATCH    a peer (hf | liger | unsloth) through peers/run_anchors.sh; env DEADLINE (560 s):
#                                 run_anchors.sh starts a case only with 60 s (a larger model 150 s) of it left,
#                                 counted from that peer step's own start: 150 or less skips the 7-9B peers
#   maxseq:SYSTEM:MODEL:QUANT:L1,L2,...[:LIMIT]   longest trainable sequence (peers' harness)
#   targets                       the performance issue's cases, plain: info, the four checkpoints and one
#                                 slothnb: step per case (not 400K: that one needs a call of its own)
#   graphs:MODEL:QUANT:SEQ:BATCH  the slothnb step with forward-only graphs (SLOTHNB_CUDA_GRAPHS=forward), the
#                                 graphs switched off every other step (--ab-switch ...layer_graphs.ACTIVE=0),
#                                 read round by round and by halves; env GRAPHS_STEP_ARGS ("--warmup 8 --steps 40"),
#                                 GRAPHS_MODE (forward; 1 = whole layers)
#   forward-graphs                graphs: for each 7-9B target case (their checkpoints must exist: model:...)
# RUN_GPU_DRY=1 prints the steps (with targets expanded) and exits.
# Results: $OUT/results.jsonl (peers' format), summarised at the end.
set -uo pipefail
TARGETS="info model:8b model:1b model:qwen7b model:gemma9b slothnb:8b:nf4:2048:2 slothnb:8b:nf4:4096:2 \
slothnb:8b:none:2048:2 slothnb:1b:none:2048:2 slothnb:qwen7b:nf4:2048:2 slothnb:gemma9b:nf4:2048:2"
FORWARD_GRAPHS="graphs:8b:none:2048:2 graphs:8b:nf4:2048:2 graphs:8b:nf4:4096:2 graphs:qwen7b:nf4:2048:2 \
graphs:gemma9b:nf4:2048:2"
steps=()
for step in "$@"; do
  if [ "$step" = targets ]; then read -r -a more <<<"$TARGETS"; steps+=("${more[@]}")
  elif [ "$step" = forward-graphs ]; then read -r -a more <<<"$FORWARD_GRAPHS"; steps+=("${more[@]}")
  else steps+=("$step"); fi
done
set -- "${steps[@]}"
if [ "${RUN_GPU_DRY:-0}" = 1 ]; then printf '%s\n' "$@"; exit 0; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export OUT="${OUT:-$REPO/bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export UNSLOTH_DISABLE_STATISTICS=1 ANCHOR_MODEL_ROOT="${ANCHOR_MODEL_ROOT:-/tmp/anchor_models}"
SITE=/tmp/site
if [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    > "$OUT/install.log" 2>&1 && touch "$SITE/.installed" || { echo "wheel install failed"; tail "$OUT/install.log"; }
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
PEAK=$(python3 -c "
import json,sys
v=''
try:
    for l in open('$OUT/results.jsonl'):
        r=json.loads(l)
        if r.get('kind')=='device_info': v=r['matmul']['tflops_median']
except Exception: pass
print(v)")
lora_case() {  # lora_case KIND:MODEL:QUANT:SEQ:BATCH[:CKPT] [lora_step.py args...]: one bench/lora_step.py process
  local _ model quant seq batch gc
  IFS=: read -r _ model quant seq batch gc <<<"$1"
  shift
  timeout -k 10 "${CASE_TIMEOUT:-300}" python3 bench/lora_step.py --model "$model" --quant "$quant" --seq "$seq" \
    --batch "$batch" --grad-ckpt "${gc:-slothnb}" "$@" ${PEAK:+--peak-tflops $PEAK} --out "$OUT/results.jsonl"
}
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case "$step" in
    tests*)
      extra="${step#tests}"; extra="${extra#:}"
      timeout -k 5 "${TESTS_TIMEOUT:-240}" python3 -m pytest -v -rfE --durations=25 -m "${PYTEST_MARK:-gpu}" -p no:cacheprovider --continue-on-collection-errors --ignore=tests/notebook tests $extra 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "FAILED|ERROR|passed|failed|[0-9.]+s (call|setup)" | head -70 ;;
    kernels)
      timeout -k 5 "${KERNELS_TIMEOUT:-200}" python3 bench/kernels_ops.py 2>&1 | tee "$OUT/kernels.md" | tail -60 ;;
    attention)
      timeout -k 5 "${KERNELS_TIMEOUT:-200}" python3 bench/kernels_attention.py --sweep 2>&1 | tee "$OUT/kernels_attention.md" | tail -30 ;;
    slothnb:*)
      lora_case "$step" ${LORA_STEP_ARGS:-} | cut -c1-400 ;;
    graphs:*)
      SLOTHNB_CUDA_GRAPHS=${GRAPHS_MODE:-forward} lora_case "$step" ${GRAPHS_STEP_ARGS:---warmup 8 --steps 40} \
        --ab-switch "slothnb.models.layer_graphs.ACTIVE=0" | grep -E "^AB|Error" | cut -c1-300 ;;
    bench-model:*)
      python3 bench/make_bench_models.py "${step#bench-model:}" 2>&1 | grep -v "^Loading\|Writing" | tail -2 ;;
    base:*)
      IFS=: read -r _ commit model quant seq batch <<<"$step"
      bash bench/ab_base.sh "$commit" "$model" "$quant" "$seq" "${batch:-2}" ;;
    profile:*)
      IFS=: read -r _ model quant seq batch gc <<<"$step"
      timeout -k 10 240 python3 bench/profile_step.py --model "$model" --quant "$quant" --seq "$seq" --batch "$batch" \
        --grad-ckpt "${gc:-slothnb}" --memory ${PROFILE_ARGS:-} > "$OUT/profile-$model-$quant-$seq.txt" 2>&1
      grep -v "Loading weights" "$OUT/profile-$model-$quant-$seq.txt" | cut -c1-180 | head -32
      grep "^#  " "$OUT/profile-$model-$quant-$seq.txt" ;;
    *)
      DEADLINE=${DEADLINE:-560} bash peers/run_anchors.sh "$step" 2>&1 | grep -v '^#' | tail -3
      PEAK=${PEAK:-$(python3 -c "
import json
for l in open('$OUT/results.jsonl'):
    r=json.loads(l)
    if r.get('kind')=='device_info': print(r['matmul']['tflops_median'])" 2>/dev/null | tail -1)} ;;
  esac
done
python3 peers/summarize.py "$OUT/results.jsonl" 2>/dev/null || true
