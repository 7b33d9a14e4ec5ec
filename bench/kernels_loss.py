#!/usr/bin/env python3
"""Times the loss kernels against eager PyTorch, torch.compile and Liger-Kernel.

Shapes: hidden 4096, vocabulary 128,256 (Llama-3), 4096/8192/16384 tokens, bf16, the
lm_head frozen (the LoRA case). Each row: forward+backward per-call latency ``ms`` (median of
CUDA events after warm-up), per-call device time ``gpu_ms`` (summed kernel durations from
torch.profiler, see bench/_timing.py) and the extra peak memory above the inputs. "eager" is what Hugging Face
does: ``F.linear`` then ``F.cross_entropy`` on an fp32 upcast of the logits.

Target: fused linear CE at 8192 tokens needs <= 1/10 of eager's extra peak memory at
<= 1.1x its time (row key ``target_met``).

    python bench/kernels_loss.py        # markdown table; JSON to $OUT/kernels_loss.json if OUT is set
"""
import torch
import torch.nn.functional as F

from _timing import markdown, measure as _measure, write_json

HIDDEN, VOCAB, TOKENS = 4096, 128256, (4096, 8192, 16384)


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
        return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None, None


def bench_fused(n, device="cuda", dtype=torch.bfloat16):
    from slothnb.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, HIDDEN, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, device=device, dtype=dtype, generator=g) * HIDDEN ** -0.5
    labels = torch.randint(0, VOCAB, (n,), device=device, generator=g)
    labels[: n // 4] = -100  # a masked prompt

    def eager(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y)

    def clear():
        hidden.grad = None

    impls = {"eager": eager, "torch.compile": torch.compile(eager),
             "slothnb": lambda h, w, y: fused_linear_cross_entropy(h, w, y)}
    _, liger_flce = _liger()
    if liger_flce is not None:
        liger_fn = liger_flce()
        impls["liger"] = lambda h, w, y: liger_fn(w, h, y)
    base = dict(op="fused_linear_cross_entropy", tokens=n, hidden=HIDDEN, vocab=VOCAB, dtype=str(dtype)[6:])
    rows = []
    for name, fn in impls.items():
        _measure(rows, base, name, lambda fn=fn: fn(hidden, weight, labels).backward(), clear)
    return rows


def bench_ce(n, device="cuda", dtype=torch.bfloat16):
    from slothnb.kernels.cross_entropy import cross_entropy
    g = torch.Generator(device=device).manual_seed(0)
    logits0 = torch.randn(n, VOCAB, device=device, dtype=dtype, generator=g)
    logits = logits0.clone().requires_grad_()
    labels = torch.randint(0, VOCAB, (n,), device=device, generator=g)
    labels[: n // 4] = -100

    def eager(x, y):
        return F.cross_entropy(x.float(), y)

    def restore():  # slothnb's backward overwrites the logits buffer with the gradient
        logits.grad = None
        with torch.no_grad():
            logits.copy_(logits0)

    impls = {"eager": eager, "torch.compile": torch.compile(eager),
             "slothnb": lambda x, y: cross_entropy(x, y, inplace_backward=True)}
    liger_ce, _ = _liger()
    if liger_ce is not None:
        impls["liger"] = liger_ce()
    base = dict(op="cross_entropy", tokens=n, hidden="", vocab=VOCAB, dtype=str(dtype)[6:])
    rows = []
    for name, fn in impls.items():
        _measure(rows, base, name, lambda fn=fn: fn(logits, labels).backward(), restore)
    return rows


def _ratios(rows):
    """Add time and memory relative to eager, and the target check on the fused 8192-token row."""
    eager = {(r["op"], r["tokens"]): r for r in rows if r["impl"] == "eager" and "ms" in r}
    for r in rows:
        e = eager.get((r["op"], r["tokens"]))
        if e is None or "ms" not in r:
            continue
        r["time_vs_eager"] = round(r["ms"] / e["ms"], 3)
        r["mem_vs_eager"] = round(r["extra_peak_MiB"] / max(e["extra_peak_MiB"], 1e-9), 4)
        if r["op"] == "fused_linear_cross_entropy" and r["impl"] == "slothnb" and r["tokens"] == 8192:
            r["target_met"] = r["mem_vs_eager"] <= 0.1 and r["time_vs_eager"] <= 1.1
    return rows


def bench_all(device="cuda"):
    if not torch.cuda.is_available():
        return [{"family": "loss", "error": "needs a CUDA GPU"}]
    rows = []
    for n in TOKENS:
        rows += bench_fused(n, device)
    for n in TOKENS:
        rows += bench_ce(n, device)
    return _ratios(rows)


if __name__ == "__main__":
    result = bench_all()
    print(markdown(result))
    write_json("kernels_loss.json", result)
