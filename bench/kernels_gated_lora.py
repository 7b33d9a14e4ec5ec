#!/usr/bin/env python3
"""The LoRA MLP backward's middle, two ways: the gated kernel plus five thin matmuls, against
``kernels/gated_lora_backward.py`` (one kernel that also takes the thin products and dh's adapter share).

Shapes: Llama-3.1-8B's MLP at 2 x 2,048 tokens (hidden 4096, intermediate 14336), rank 16, bf16. What is
timed is everything between ``dY B_d`` and the gate/up backward's ``dX``, which both ways leave alike:

- two-pass: ``dH = dyb A_d``; ``dH += dY W_d`` (beta in the GEMM); ``gated_backward``; ``dG^T xa_g``,
  ``dG B_g``, ``dU^T xa_u``, ``dU B_u``, ``dyb^T h`` (the adapters' gradients in fp32, as ``_mm_as`` asks);
- fused: ``dH = dY W_d`` (beta 0); ``gated_lora_backward`` with its partial sums.

``--sweep`` also times the fused kernel at other tile shapes (``BM``, ``ROW_BLOCKS``, ``BN``, ``NUM_WARPS``).
Columns as bench/kernels_lora.py: ``ms`` per-call latency, ``gpu_ms`` device time (torch.profiler).

    python bench/kernels_gated_lora.py [--sweep]   # markdown table; JSON to $OUT/kernels_gated_lora.json if OUT is set
"""
import argparse

import torch

from _timing import gpu_info, markdown, measure, write_json

HIDDEN, INTER, RANK, TOKENS = 4096, 14336, 16, 4096
SWEEP = [(64, 4, 16, 8), (32, 4, 32, 8), (64, 8, 16, 8), (64, 4, 32, 8), (64, 4, 32, 4), (128, 2, 16, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    import slothnb.kernels.gated_lora_backward as glb
    from slothnb.kernels.lora_activations import gated_backward

    dev, bf = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, device=dev) * s).to(bf)

    dY, W_d = rnd(TOKENS, HIDDEN), rnd(HIDDEN, INTER, s=INTER ** -0.5)
    G0, U0 = rnd(TOKENS, INTER), rnd(TOKENS, INTER)
    Xa = rnd(TOKENS, HIDDEN + 2 * RANK)
    xa_g, xa_u = Xa[:, HIDDEN:HIDDEN + RANK], Xa[:, HIDDEN + RANK:]
    B_d, A_d = rnd(HIDDEN, RANK, s=0.2), rnd(RANK, INTER, s=0.2)
    B_g, B_u = rnd(INTER, RANK, s=0.2), rnd(INTER, RANK, s=0.2)
    dyb = dY @ B_d
    G, U = G0.clone(), U0.clone()

    def reset():
        G.copy_(G0)
        U.copy_(U0)

    def f32(a, b):
        return torch.mm(a, b, out_dtype=torch.float32)

    def two_pass():
        dH = dyb @ A_d
        dH.addmm_(dY, W_d, beta=2.0)
        H, dG, dU = gated_backward("swiglu", dH, G, U)
        return f32(dG.t(), xa_g), dG @ B_g, f32(dU.t(), xa_u), dU @ B_u, f32(dyb.t(), H)

    def fused():
        dH = torch.empty_like(G)
        dH.addmm_(dY, W_d, beta=0.0)
        return glb.gated_lora_backward("swiglu", dH, G, U, xa_g, xa_u, dyb, B_g, B_u, A_d, 2.0)

    base = dict(op="lora_mlp_backward_middle", shape=f"{TOKENS}x{INTER} r{RANK}", dtype="bf16")
    rows = []
    measure(rows, base, "two-pass", two_pass, reset=reset)
    glb.FUSED = True
    configs = SWEEP if args.sweep else SWEEP[:1]
    for bm, blocks, bn, warps in configs:
        glb.BM, glb.ROW_BLOCKS, glb.BN, glb.NUM_WARPS = bm, blocks, bn, warps
        measure(rows, dict(base, tiles=f"{bm}x{blocks} rows, {bn} cols, {warps} warps"), "fused", fused, reset=reset)
    print(markdown(rows))
    write_json("kernels_gated_lora.json", dict(gpu=gpu_info(), rows=rows))


if __name__ == "__main__":
    main()
