#!/usr/bin/env bash
# The written-out layer's levers on the GPU machine in one call: their GPU tests, then each lever
# switched against the defaults in one process per case (bench/lora_step.py --ab-switch "A;B;..": the
# variants take turns with the defaults step by step; per-variant tok/s, host ms and peak in the
# record's ab_variants). Written for session 17's levers; since session 18 the defaults have direct
# SDPA, the residual sum in the norm, kept q/k/v and the GPU embedding gather on, and the attention
# state carry off, so each variant below turns one of those the other way; since session 19 G and U
# are paced by the link's backlog with the host two layers of copies ahead.
#
#   bash bench/run_gpu.sh info model:8b model:1b   # wheels into /tmp/site, the checkpoints
#   bash bench/ab_levers.sh [CASE...]   # CASE as in run_gpu.sh; default 8B QLoRA at 2048 and 4096, 1B bf16
#
# The 1B step is host-bound and carries nothing (its layers are under CARRY_MIN_BYTES). On a slow host
# (host_probe above ~35 ns) the 2,048-token and 1B steps swing ±8% per 7-step variant: compare there
# only with more steps (session 18).
#
# Env: STEPS (timed steps, default 63: 7 each for the defaults and 8 variants, after 9 warm-up steps
# that run each once: first-call compiles and pinned buffers), TESTS_TIMEOUT (180 s),
# SKIP_TESTS=1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT="${OUT:-$PWD/bench-out}"
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# Does cuDNN's forward give the same output with and without the log-sum-exp asked for? A forward that
# carries the attention state asks for it, SDPA without grad does not (docs/perf-notes.md section 16).
python3 - <<'PY' 2>&1 | tail -3
import torch
A = torch.ops.aten
for s in (2048, 4096):
    q = torch.randn(2, 32, s, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    outs = [A._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, True, False, scale=128 ** -0.5)[0]
            for lse in (True, False)]
    print(f"cuDNN forward, seq {s}: same output with and without the log-sum-exp: {torch.equal(*outs)}")
PY
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -k 5 "${TESTS_TIMEOUT:-180}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/models/test_sdpa_direct.py tests/models/test_llama_layer.py tests/ops/test_lora.py \
    tests/ops/test_rms_norm.py tests/models/test_carry.py tests/ops/test_row_gather.py \
    tests/models/test_embedding_offload.py 2>&1 | tee "$OUT/levers-tests.log" | tail -8
fi
SDPA=slothnb.models.arch.sdpa_direct.CUDA=0    # SDPA through its module again
ADD=slothnb.models.arch.llama_layer._RESIDUAL_ADD=0
KEEP=slothnb.kernels.lora_widened.KEEP=0
GATE_UP=slothnb.kernels.lora_widened.KEEP_GATE_UP=1
CARRY_SDPA=slothnb.models.carrying.CARRY_SDPA=1  # the attention state over the link (zero-sum with G/U in session 18)
GATHER=slothnb.models.embedding_offload.GPU_GATHER=0  # the embedding rows gathered by the host
PACING=slothnb.models.carrying.GATE_UP_PACING=in_flight  # G/U paced by all copies in flight (sessions 12-18)
AHEAD=slothnb.models.host_offload.LAYERS_AHEAD=3  # the host three layers of copies ahead (sessions 12-18)
VARIANTS="$SDPA;$ADD;$KEEP;$GATE_UP;$CARRY_SDPA;$GATHER;$PACING;$AHEAD"
[ $# -gt 0 ] || set -- slothnb:8b:nf4:2048:2 slothnb:8b:nf4:4096:2 slothnb:1b:none:2048:2
LORA_STEP_ARGS="--warmup 9 --steps ${STEPS:-63} --ab-switch $VARIANTS" bash bench/run_gpu.sh "$@" 2>&1 | grep -v '^|' | tail -20
python3 bench/ab_summary.py "$OUT/results.jsonl"
