#!/usr/bin/env python3
"""Times the norm / RoPE / GLU kernels against eager PyTorch, torch.compile and Liger-Kernel.

Shapes (Llama-3-8B-like, bf16): 8192 tokens (4 x 2048), hidden 4096, intermediate 14336,
32 query / 8 key-value heads of head_dim 128. Every op is timed forward and forward+backward
(backward = ``torch.autograd.grad`` to the activations; norm weights are frozen, the LoRA
case; grads are taken to the input buffers, so no ``.grad`` accumulates). Inputs are non-leaf views of leaf buffers, as in a real model, so in-place kernels act
in place; buffers are restored outside the timed region.

Columns (see bench/_timing.py for the method):

- ``ms``: per-call latency, median of CUDA-event timings around one call after warm-up, cycling
  through several input sets (so no run finds its inputs in L2). Host overhead (Python, autograd,
  launches) is included, so for ~50 us ops it can dominate.
- ``gpu_ms``: per-call device time, the summed durations of the call's kernels (torch.profiler,
  median over several calls): what the op costs when the host runs ahead, as in a training step.
- ``extra_peak_MiB``: ``max_memory_allocated`` during one run above what was allocated before it.
- ``floor_ms``: minimal bytes the op must move / the measured device-to-device copy bandwidth
  (itself in the ``copy`` row); ``floor_frac`` = floor_ms / gpu_ms (floor_ms / ms where there is
  no gpu_ms, i.e. on CPU): 1.0 would be a kernel running at copy speed.
- ``speedup_vs_eager`` (latency) and ``gpu_speedup_vs_eager`` (device time): eager's / this row's.

On a machine without CUDA the same code runs on the CPU at small shapes (a smoke run: wall-clock
``ms`` only, the slothnb rows on Triton's interpreter if ``TRITON_INTERPRET=1``).

    python bench/kernels_elementwise.py   # markdown table; JSON to $OUT/kernels_elementwise.json if OUT is set
"""
import torch
import torch.nn.functional as F

import _timing
from _timing import gpu_info, markdown, write_json

WARMUP, REPEATS, SETS = 5, 20, 3
SHAPES = dict(tokens=8192, batch=4, hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128)


def minimal_bytes(op, mode, s, elem=2):
    """Bytes an op must read and write at the very least (one pass over each tensor it touches)."""
    n, h, i = s["tokens"], s["hidden"], s["intermediate"]
    qk = n * (s["q_heads"] + s["kv_heads"]) * s["head_dim"]
    table = n * s["head_dim"] * 2  # cos and sin rows
    if op in ("rms_norm", "rms_norm_gemma", "layer_norm"):
        fwd, bwd = 2 * n * h * elem, 3 * n * h * elem  # x -> y ; x, dy -> dx
    elif op == "rope":
        fwd = bwd = 2 * qk * elem + table * elem  # q, k read and written back ; cos/sin read
    else:  # swiglu / geglu
        fwd, bwd = 3 * n * i * elem, 5 * n * i * elem  # g, u -> h ; dh, g, u -> dg, du
    return fwd if mode == "fwd" else fwd + bwd


def copy_bandwidth(device, nbytes=1 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, gpu = time_and_memory(lambda k: dst.copy_(src), device)
    ms = gpu or ms  # the copy kernel's own time, when the profiler gives it
    return 2 * nbytes / (ms * 1e-3)


def time_and_memory(run, device, reset=None):
    """(median latency ms, extra peak MiB or None, median device ms or None) of ``run(k)``, k cycling
    over the input sets."""
    ms, mib = _timing.time_and_memory(run, device, reset, warmup=WARMUP, repeats=REPEATS, sets=SETS)
    return ms, mib, _timing.device_ms(run, device, reset, calls=REPEATS, sets=SETS)


def _liger(op):
    """Liger-Kernel's equivalent as ``fn(*inputs)``, or None when Liger is not installed."""
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama")
        if op == "rms_norm_gemma":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 1.0, "gemma")
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
        if op == "rope":
            from liger_kernel.ops.rope import LigerRopeFunction
            return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)
        if op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
        if op == "geglu_tanh":
            from liger_kernel.ops.geglu import LigerGELUMulFunction  # tanh GELU only
            return LigerGELUMulFunction.apply
    except ImportError:
        return None
    return None


def make_cases(s, device, dtype=torch.bfloat16):
    """Per op: input sets (leaf buffers), how to view them as model activations, and the impls."""
    from slothnb.kernels.geglu import geglu, geglu_reference
    from slothnb.kernels.layer_norm import layer_norm
    from slothnb.kernels.rms_norm import rms_norm, rms_norm_reference
    from slothnb.kernels.rope import apply_rope, apply_rope_reference
    from slothnb.kernels.swiglu import swiglu, swiglu_reference

    g = torch.Generator(device=device).manual_seed(0)
    n, h, i, d = s["tokens"], s["hidden"], s["intermediate"], s["head_dim"]
    B, S = s["batch"], s["tokens"] // s["batch"]

    def rnd(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)

    w, b = rnd(h, grad=False), rnd(h, grad=False)
    pos = torch.arange(S, device=device, dtype=torch.float32)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    as_act = lambda t: t.view_as(t)  # a free non-leaf view: what a projection's output looks like
    heads = lambda t: t.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D], as HF attention does
    norm_sets = [(rnd(B, S, h),) for _ in range(SETS)]
    glu_sets = [(rnd(n, i), rnd(n, i)) for _ in range(SETS)]
    rope_sets = [(rnd(B, S, s["q_heads"], d), rnd(B, S, s["kv_heads"], d)) for _ in range(SETS)]

    cases = {
        "rms_norm": (norm_sets, as_act, {
            "eager": lambda x: rms_norm_reference(x, w, 1e-6),
            "slothnb": lambda x: rms_norm(x, w, 1e-6)}),
        "rms_norm_gemma": (norm_sets, as_act, {
            "eager": lambda x: rms_norm_reference(x, w, 1e-6, 1.0),
            "slothnb": lambda x: rms_norm(x, w, 1e-6, 1.0)}),
        "layer_norm": (norm_sets, as_act, {
            "eager": lambda x: F.layer_norm(x, (h,), w, b, 1e-5),
            "slothnb": lambda x: layer_norm(x, w, b, 1e-5)}),
        "rope": (rope_sets, heads, {
            "eager": lambda q, k: apply_rope_reference(q, k, cos, sin),
            "slothnb": lambda q, k: apply_rope(q, k, cos, sin)}),
        "swiglu": (glu_sets, as_act, {
            "eager": swiglu_reference,
            "slothnb": swiglu}),
        "geglu": (glu_sets, as_act, {
            "eager": lambda a, c: geglu_reference(a, c, "none"),
            "slothnb": lambda a, c: geglu(a, c, "none")}),
        "geglu_tanh": (glu_sets, as_act, {
            "eager": lambda a, c: geglu_reference(a, c, "tanh"),
            "slothnb": lambda a, c: geglu(a, c, "tanh")}),
    }
    liger_extra = {"rms_norm": (w,), "rms_norm_gemma": (w,), "layer_norm": (w, b), "rope": (cos, sin)}
    for op, (_, _, impls) in cases.items():
        impls["torch.compile"] = torch.compile(impls["eager"]) if torch.device(device).type == "cuda" else None
        fn = _liger(op)
        if fn is not None:
            extra = liger_extra.get(op, ())
            impls["liger"] = lambda *xs, fn=fn, extra=extra: fn(*xs, *extra)
    return cases


def bench_op(op, sets, view, impl_fn, mode, device):
    pristine = [tuple(t.detach().clone() for t in ts) for ts in sets]
    grads_out = {}

    def run(k):
        xs = tuple(view(t) for t in sets[k])
        out = impl_fn(*xs)
        if mode == "fwd":
            return
        outs = out if isinstance(out, tuple) else (out,)
        if k not in grads_out:
            gen = torch.Generator(device=device).manual_seed(k)
            grads_out[k] = tuple(torch.randn(o.shape, device=device, dtype=o.dtype, generator=gen) for o in outs)
        torch.autograd.grad(outs, sets[k], grads_out[k])  # to the leaf buffers: nothing accumulates

    def reset(k):  # in-place kernels (RoPE, GLU backward) wrote into the buffers: put them back
        with torch.no_grad():
            for t, p in zip(sets[k], pristine[k]):
                t.copy_(p)

    return time_and_memory(run, device, reset)


def _row(op, mode, impl, ms, mib, gpu_ms, s, bw):
    floor = minimal_bytes(op, mode, s) / bw * 1e3
    return dict(op=op, mode=mode, impl=impl, ms=round(ms, 4), gpu_ms=None if gpu_ms is None else round(gpu_ms, 4),
                extra_peak_MiB=None if mib is None else round(mib, 1), floor_ms=round(floor, 4),
                floor_frac=round(floor / (gpu_ms or ms), 3))


def add_ratios(rows):
    for key, name in (("ms", "speedup_vs_eager"), ("gpu_ms", "gpu_speedup_vs_eager")):
        eager = {(r["op"], r["mode"]): r[key] for r in rows if r.get("impl") == "eager" and r.get(key)}
        for r in rows:
            e = eager.get((r.get("op"), r.get("mode")))
            if e and r.get(key):
                r[name] = round(e / r[key], 2)
    return rows


def bench_all(device="cuda", **shape_overrides) -> list[dict]:
    """Times every op (fwd and fwd+bwd) for every available impl; returns one row each."""
    s = dict(SHAPES, **shape_overrides)
    bw = copy_bandwidth(device, nbytes=1 << 30 if torch.device(device).type == "cuda" else 1 << 20)
    rows = [dict(op="copy", mode="d2d", impl="torch", bandwidth_GBps=round(bw / 1e9, 1))]
    for op, (sets, view, impls) in make_cases(s, device).items():
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in impls.items():
                if fn is None:
                    continue
                try:
                    ms, mib, gpu_ms = bench_op(op, sets, view, fn, mode, device)
                    rows.append(_row(op, mode, impl, ms, mib, gpu_ms, s, bw))
                except Exception as e:  # a missing compiler or a competitor's API change: report, go on
                    rows.append(dict(op=op, mode=mode, impl=impl, error=f"{type(e).__name__}: {str(e)[:200]}"))
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
    return add_ratios(rows)


SMOKE_SHAPES = dict(tokens=64, batch=2, hidden=256, intermediate=512, q_heads=4, kv_heads=2, head_dim=32)


def main():
    if torch.cuda.is_available():
        rows = bench_all("cuda")
        print(markdown(rows))
        write_json("kernels_elementwise.json", dict(gpu_info(), shapes=SHAPES, rows=rows))
    else:  # smoke run: the same code on CPU at small shapes, nothing written
        print(markdown(bench_all("cpu", **SMOKE_SHAPES)))


if __name__ == "__main__":
    main()
