#!/usr/bin/env python3
"""Launch-geometry sweep of the SwiGLU forward/backward kernels at the benchmark shape.

The GLU kernels sit at ~0.96 of the copy-bandwidth floor while torch.compile's reaches ~1.0;
this times the same Triton kernels at other (BLOCK, num_warps) choices, by device time, so the
default in kernels/swiglu.py can be chosen on evidence. Prints one line per variant.

    python bench/sweep_glu.py      # on the GPU machine
"""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_ms  # noqa: E402
from slothnb.kernels.swiglu import _swiglu_bwd, _swiglu_fwd  # noqa: E402

N, I = 8192, 14336


def main():
    g, u = (torch.randn(N, I, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    h, dh = torch.empty_like(g), torch.randn_like(g)
    dg, du = torch.empty_like(g), torch.empty_like(g)
    floor_fwd = 3 * N * I * 2 / 3.0e12 * 1e3  # ms at ~3.0 TB/s (measured copy bandwidth)
    print(f"# swiglu {N}x{I} bf16; floor at 3.0 TB/s: fwd {floor_fwd:.4f} ms, bwd {floor_fwd * 5 / 3:.4f} ms")
    for block in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8, 16):
            if block // (32 * warps) < 1:
                continue
            grid = (N, triton.cdiv(I, block))

            def fwd(_k=0):
                _swiglu_fwd[grid](g, u, h, I, I, I, I, BLOCK=block, num_warps=warps)

            def bwd(_k=0):
                _swiglu_bwd[grid](dh, g, u, dg, du, I, I, I, I, I, I, BLOCK=block, num_warps=warps)

            fwd(), bwd()  # compile outside the profiled calls
            f, b = device_ms(fwd), device_ms(bwd)
            print(f"BLOCK {block:5d} warps {warps:2d}: fwd {f:.4f} ms ({floor_fwd / f:.3f} of floor), "
                  f"bwd {b:.4f} ms ({floor_fwd * 5 / 3 / b:.3f})", flush=True)


if __name__ == "__main__":
    main()
