#!/usr/bin/env python3
"""The LoRA ops' rank-r products at Llama-3.1-8B shapes: ``kernels/thin_matmul.py`` against torch.mm.

Why: the thin kernel exists to take ~10 µs of host off each of ~1,300 products a step (docs/perf-notes.md,
section 27), and it may only do that if each product's device time stays at cuBLAS's. Per shape, both
ways: the device time of one call (``gpu_ms``, torch.profiler), the host's µs a call with 100 calls
queued back to back (the GPU never waited on), and the largest difference from an fp32 product
(relative to its largest entry).

    python bench/kernels_thin_mm.py [--tokens 4096]     # markdown; JSON to $OUT/kernels_thin_mm.json if OUT is set
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

from slothnb.kernels import thin_matmul  # noqa: E402


def shapes(tokens=4096, hidden=4096, inter=14336, kv=1024, r=16):
    """(name, a's shape, b's shape, a stored transposed, b stored transposed, out dtype) of each product
    the LoRA ops issue (``a @ b``; a transposed operand is a view of the other layout, as the call sites
    hold it), at the given sizes (defaults: Llama-3.1-8B, 2 x 2,048 tokens, rank 16)."""
    n = tokens
    return [
        ("x Aᵀ, q/k/v stacked", (n, hidden), (hidden, 3 * r), False, True, None),
        ("x Aᵀ, gate/up stacked", (n, hidden), (hidden, 2 * r), False, True, None),
        ("h A_dᵀ", (n, inter), (inter, r), False, True, None),
        ("(x Aᵀ) Bᵀ, q", (n, r), (r, hidden), False, True, None),
        ("(x Aᵀ) Bᵀ, k", (n, r), (r, kv), False, True, None),
        ("(x Aᵀ) Bᵀ, gate", (n, r), (r, inter), False, True, None),
        ("dY B, gate", (n, inter), (inter, r), False, False, None),
        ("dY B, q", (n, hidden), (hidden, r), False, False, None),
        ("dYᵀ xa, gate (fp32)", (inter, n), (n, r), True, False, torch.float32),
        ("dYᵀ xa, k (fp32)", (kv, n), (n, r), True, False, torch.float32),
        ("[dY B] A, q/k/v", (n, 3 * r), (3 * r, hidden), False, False, None),
        ("[dY B] A_d", (n, r), (r, inter), False, False, None),
    ]


def _operand(shape, transposed, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    if transposed:  # stored the other way round and handed as a view
        return torch.randn(shape[::-1], generator=g, device=device, dtype=torch.bfloat16).t()
    return torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)


def _torch_way(a, b, out_dtype):
    if out_dtype is None:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.mm(a, b).to(out_dtype)


def _host_us(call, n=100):
    """Host µs a call over ``n`` calls queued back to back."""
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        call()
    host = (time.perf_counter() - t) / n * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(host, 2)


def bench_all(device="cuda", **sizes):
    rows = []
    saved = thin_matmul.THIN_MM
    thin_matmul.THIN_MM = "1" if device == "cuda" else "cpu"
    try:
        for i, (name, sa, sb, ta, tb, out_dtype) in enumerate(shapes(**sizes)):
            a, b = _operand(sa, ta, device, 2 * i), _operand(sb, tb, device, 2 * i + 1)
            ref = a.float() @ b.float()
            for impl, call in (("torch", lambda: _torch_way(a, b, out_dtype)),
                               ("thin", lambda: thin_matmul.mm(a, b, out_dtype=out_dtype))):
                row = {"product": name, "M": sa[0], "K": sa[1], "N": sb[1], "impl": impl}
                try:
                    err = ((call().float() - ref).abs().max() / ref.abs().max()).item()
                    _timing.time_and_memory(lambda k: call(), device)  # warm-up
                    gpu = _timing.device_ms(lambda k: call(), device)
                    row.update(gpu_ms=None if gpu is None else round(gpu, 4), host_us=_host_us(call),
                               max_rel_err=round(err, 5), thin_applies=thin_matmul.applies(a, b, out_dtype))
                except Exception as e:  # report and go on with the other rows
                    row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
    finally:
        thin_matmul.THIN_MM = saved
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    rows = bench_all("cuda" if torch.cuda.is_available() else "cpu", tokens=args.tokens)
    print(_timing.markdown(rows))
    if torch.cuda.is_available():
        _timing.write_json("kernels_thin_mm.json", {**_timing.gpu_info(), "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
