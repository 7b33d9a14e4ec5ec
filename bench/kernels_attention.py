#!/usr/bin/env python3
"""Times Gemma-2's soft-capped attention: slothnb's flash kernel against the eager path it replaces.

Shape: Gemma-2-9B (16 query / 8 kv heads, head dim 256, softcap 50, scale 256^-0.5), batch 2,
bf16, forward + backward. Rows: ``eager`` (slothnb's ``_softcapped_attention``, what transformers
does: [B, H, S, S] scores in bf16 and fp32), ``sdpa-no-cap`` (cuDNN/flash SDPA *without* the cap:
not the same function, only the speed a flash kernel could reach at this head size), and
``slothnb`` with the default tile table and, with ``--sweep``, other (BLOCK_M, BLOCK_N, warps,
stages) for head dim 256, forward and backward swept separately. Every row also gives its error
against fp32 eager (relative norm, worst of out/dq/dk/dv): a fast tile config must also be right.

    python bench/kernels_attention.py [--sweep]   # markdown; JSON to $OUT/kernels_attention.json
"""
import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from _timing import markdown, measure, write_json

B, H, HK, D, CAP = 2, 16, 8, 256, 50.0
FWD_SWEEP = [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)]
BWD_SWEEP = [(32, 32, 4, 1), (64, 32, 8, 1), (32, 64, 8, 1), (64, 64, 8, 1), (32, 32, 8, 2)]


def bench(seq, window, sweep, tiles=None, device="cuda", dtype=torch.bfloat16):
    from slothnb.kernels import softcap_attention as sa
    from slothnb.models.arch import common
    from slothnb.models.arch.common import _softcapped_attention

    common.SOFTCAP_FLASH = False  # "eager" must be the eager path (the flash kernel is the default)

    g = torch.Generator(device=device).manual_seed(0)
    q = (torch.randn(B, H, seq, D, device=device, dtype=dtype, generator=g) * 0.75).requires_grad_()
    k = torch.randn(B, HK, seq, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, HK, seq, D, device=device, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(B, H, seq, D, device=device, dtype=dtype, generator=g)
    scale = D ** -0.5
    attn = SimpleNamespace(num_key_value_groups=H // HK, scaling=scale, is_causal=True, training=False)
    mask = None
    if window is not None:
        i, j = torch.arange(seq, device=device)[:, None], torch.arange(seq, device=device)[None, :]
        mask = (j <= i) & (i - j < window)

    def clear():
        q.grad = k.grad = v.grad = None

    def grads(fn):
        """(out, dq, dk, dv) of one forward + backward of fn."""
        clear()
        out = fn()
        out.backward(do)
        res = [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]
        clear()
        return res

    # the fp32 eager result every row's error is measured against (relative norm, worst of the four)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o32 = _softcapped_attention(attn, q32, k32, v32, mask, CAP, 0.0)
    o32.backward(do.float())
    want = [o32.detach(), q32.grad, k32.grad, v32.grad]
    del q32, k32, v32, o32

    def error(fn):
        got = grads(fn)
        return round(max(((a - w).norm() / w.norm()).item() for a, w in zip(got, want)), 5)

    impls = {
        "eager": lambda: _softcapped_attention(attn, q, k, v, mask, CAP, 0.0),
        "sdpa-no-cap": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=window is None,
                                                              attn_mask=mask, enable_gqa=True),
    }
    base = dict(op="softcap_attention", seq=seq, window=window, heads=f"{H}/{HK}", head_dim=D)
    rows = []
    for name, fn in impls.items():
        row = measure(rows, base, name, lambda fn=fn: fn().backward(do), clear)
        if name == "eager":
            row["err_vs_fp32"] = error(fn)
    fwd0, bwd0 = sa._FWD[D], sa._BWD[D]
    configs = [(fwd0, bwd0)] + list(tiles or [])
    if sweep:
        configs += [(f, bwd0) for f in FWD_SWEEP if f != fwd0] + [(fwd0, b) for b in BWD_SWEEP if b != bwd0]
    try:
        for fwd, bwd in configs:
            sa._FWD[D], sa._BWD[D] = fwd, bwd
            name = "slothnb" if (fwd, bwd) == (fwd0, bwd0) else f"slothnb fwd{fwd} bwd{bwd}"
            flash = lambda: sa.softcap_attention(q, k, v, CAP, scale, True, window)  # noqa: E731
            row = measure(rows, base, name, lambda: flash().backward(do), clear)
            row["err_vs_fp32"] = error(flash)
    finally:
        sa._FWD[D], sa._BWD[D] = fwd0, bwd0
    eager = next((r for r in rows if r["impl"] == "eager" and "gpu_ms" in r), None)
    for r in rows:
        if eager and r.get("gpu_ms") and eager.get("gpu_ms"):
            r["time_vs_eager"] = round(r["gpu_ms"] / eager["gpu_ms"], 3)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other tile configs for head dim 256")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048])
    parser.add_argument("--tiles", nargs="*", default=[], metavar="FWD/BWD",
                        help='extra head-dim-256 configs, e.g. "64,32,8,2/32,32,8,1" (BLOCK_M,BLOCK_N,warps,stages)')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return
    tiles = [tuple(tuple(int(n) for n in part.split(",")) for part in t.split("/")) for t in args.tiles]
    rows = []
    for seq in args.seq:  # the sweep on the full causal case only
        for window in (None, 4096 if seq > 4096 else seq // 2):
            rows += bench(seq, window, args.sweep and window is None, tiles)
    print(markdown(rows))
    write_json("kernels_attention.json", rows)


if __name__ == "__main__":
    main()
