#!/usr/bin/env python3
"""Times NF4 dequantisation and the fused LoRA ops against what peft + bitsandbytes do.

- ``dequantize_nf4`` vs ``bitsandbytes.functional.dequantize_4bit``: a 14336 x 4096 NF4 weight with
  double-quantised absmax (Llama-3-8B gate/up), into bf16.
- ``lora_mlp`` (SwiGLU) and ``lora_qkv`` (4096 -> 4096/1024/1024), 8192 tokens, r=16, bf16, with a
  bf16 or NF4 base, forward+backward, vs the plain peft-like composition: base linear
  (``F.linear`` or ``bnb.matmul_4bit`` as peft's Linear4bit calls it) + ``scale * B(A(x))``, and
  ``F.silu(gate) * up`` for the MLP.

Method: ``ms`` = per-call latency, median of CUDA-event timings after warm-up; ``gpu_ms`` = per-call
device time, summed kernel durations from torch.profiler (bench/_timing.py); extra peak memory is
max_memory_allocated above what the inputs already hold. ``speedup`` = plain ms / slothnb ms.

    python bench/kernels_lora.py     # markdown table; JSON to $OUT/kernels_lora.json if OUT is set
"""
import torch
import torch.nn.functional as F

from _timing import gpu_info, markdown, measure as _measure, write_json

HIDDEN, INTER, Q, KV, RANK, TOKENS = 4096, 14336, 4096, 1024, 16, 8192


def _speedup(plain, ours):
    if "ms" in plain and "ms" in ours:
        ours["speedup"] = round(plain["ms"] / ours["ms"], 2)


def _lora(out_f, in_f, base, device, gen):
    """(LoraWeights, plain-composition closure) for one projection."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from slothnb.kernels.lora import LoraWeights

    w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16, generator=gen) * in_f ** -0.5
    A = (torch.randn(RANK, in_f, device=device, dtype=torch.bfloat16, generator=gen) * in_f ** -0.5).requires_grad_()
    B = (torch.randn(out_f, RANK, device=device, dtype=torch.bfloat16, generator=gen) * 0.01).requires_grad_()
    scale = 2.0
    if base == "nf4":
        weight, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        del w

        def base_linear(x):
            return bnb.matmul_4bit(x, weight.t(), quant_state=state)
    else:
        weight, state = w, None

        def base_linear(x):
            return F.linear(x, weight)

    def plain(x):
        return base_linear(x) + F.linear(F.linear(x, A), B) * scale

    return LoraWeights(weight, state, A, B, scale), plain


def bench_dequant(rows, device):
    import bitsandbytes.functional as bnbf
    from slothnb.kernels.nf4 import dequantize_nf4

    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(INTER, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    del w
    base = {"op": "dequantize_nf4", "base": "nf4", "shape": f"{INTER}x{HIDDEN}"}
    gbytes = (packed.numel() + INTER * HIDDEN * 2) / 1e9
    plain = _measure(rows, base, "bitsandbytes", lambda: bnbf.dequantize_4bit(packed, state))
    ours = _measure(rows, base, "slothnb", lambda: dequantize_nf4(packed, state))
    for row in (plain, ours):
        if "ms" in row:  # from the device time when the profiler gave one
            row["GB_per_s"] = round(gbytes / ((row.get("gpu_ms") or row["ms"]) / 1e3), 1)
    _speedup(plain, ours)
    ok = torch.equal(dequantize_nf4(packed, state), bnbf.dequantize_4bit(packed, state))
    ours["bit_exact"] = ok


def _train_step(fn, x, dys, leaves):
    def step():
        outs = fn(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(list(outs), dys)

    def reset():
        for t in leaves:
            t.grad = None
    return step, reset


def bench_mlp(rows, device, base):
    from slothnb.kernels.lora import lora_mlp

    gen = torch.Generator(device=device).manual_seed(1)
    (g, pg), (u, pu), (d, pd) = (_lora(o, i, base, device, gen) for o, i in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)))
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = [torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen)]
    leaves = [x, g.A, g.B, u.A, u.B, d.A, d.B]
    info = {"op": "lora_mlp (swiglu)", "base": base, "shape": f"{TOKENS}x{HIDDEN}->{INTER}"}
    plain = _measure(rows, info, "peft-like", *_train_step(lambda t: pd(F.silu(pg(t)) * pu(t)), x, dy, leaves))
    ours = _measure(rows, info, "slothnb", *_train_step(lambda t: lora_mlp(t, g, u, d), x, dy, leaves))
    _speedup(plain, ours)


def bench_qkv(rows, device, base):
    from slothnb.kernels.lora import lora_qkv

    gen = torch.Generator(device=device).manual_seed(2)
    (q, pq), (k, pk), (v, pv) = (_lora(o, HIDDEN, base, device, gen) for o in (Q, KV, KV))
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dys = [torch.randn(TOKENS, o, device=device, dtype=torch.bfloat16, generator=gen) for o in (Q, KV, KV)]
    leaves = [x, q.A, q.B, k.A, k.B, v.A, v.B]
    info = {"op": "lora_qkv", "base": base, "shape": f"{TOKENS}x{HIDDEN}->{Q}/{KV}/{KV}"}
    plain = _measure(rows, info, "peft-like", *_train_step(lambda t: (pq(t), pk(t), pv(t)), x, dys, leaves))
    ours = _measure(rows, info, "slothnb", *_train_step(lambda t: lora_qkv(t, q, k, v), x, dys, leaves))
    _speedup(plain, ours)


def bench_all(device="cuda") -> list:
    rows = []
    bench_dequant(rows, device)
    for base in ("nf4", "bf16"):
        for bench in (bench_mlp, bench_qkv):
            try:
                bench(rows, device, base)
            except torch.cuda.OutOfMemoryError:
                rows.append({"op": bench.__name__, "base": base, "error": "OOM"})
            torch.cuda.empty_cache()
    return rows


def main():
    rows = bench_all("cuda")
    print(markdown(rows))
    write_json("kernels_lora.json", dict(gpu_info(), rows=rows))


if __name__ == "__main__":
    main()
