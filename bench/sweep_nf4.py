#!/usr/bin/env python3
"""Launch-geometry sweep of the NF4 dequantisation kernel, beside bitsandbytes' own.

Every QLoRA step dequantises each frozen weight three times (forward, recompute, backward): on the
Llama-3.1-8B shape that is ~32 ms of a ~420 ms step (docs/benchmarks.md). The kernel is a pure
stream (read 0.5 byte + scales, write 2 bytes per weight), so it is compared with the write
bandwidth floor. Checks bit-exactness with bitsandbytes for every variant, and the strided
``out=`` path the fused LoRA ops use. Prints one line per variant.

    python bench/sweep_nf4.py      # on the GPU machine
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_ms  # noqa: E402
from slothnb.kernels import nf4  # noqa: E402

SHAPES = [(14336, 4096), (4096, 4096)]  # Llama-3.1-8B gate/up, q/o


def main():
    import bitsandbytes.functional as bnbf

    for rows, cols in SHAPES:
        w = (torch.randn(rows, cols, device="cuda") * 0.02).to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
        expected = bnbf.dequantize_4bit(packed, state)
        moved = rows * cols * 2.5  # bytes: 2 written + 0.5 read per weight (scales are ~1%)
        ref = device_ms(lambda _k: bnbf.dequantize_4bit(packed, state))
        print(f"# {rows}x{cols} bf16 nested: bitsandbytes {ref:.4f} ms ({moved / ref / 1e9:.2f} TB/s)", flush=True)
        # what the memory system gives a pure stream of the same shape: writing 2 bytes a weight, and
        # copying them (2 read + 2 written)
        dst, src = torch.empty_like(expected), expected.clone()
        fill = device_ms(lambda _k: dst.fill_(1.0))
        copy = device_ms(lambda _k: dst.copy_(src))
        print(f"# floors: fill {fill:.4f} ms ({rows * cols * 2 / fill / 1e9:.2f} TB/s written), copy {copy:.4f} ms "
              f"({rows * cols * 4 / copy / 1e9:.2f} TB/s moved)", flush=True)
        default = (nf4.OUTPUTS_PER_PROGRAM, nf4.WORD_OUTPUTS_PER_PROGRAM, nf4.NUM_WARPS, nf4.PAIRED_STORES,
                   nf4.WORD_STORES)
        # words: 8 outputs a thread from a 32-bit word; else tiles of blocks, 16-bit interleaved stores
        # or (paired) two bf16 per 32-bit word
        for words, paired in ((True, False), (False, False), (False, True)):
            for outputs in (512, 1024, 2048, 4096, 8192):
                for warps in (2, 4, 8):
                    nf4.OUTPUTS_PER_PROGRAM = nf4.WORD_OUTPUTS_PER_PROGRAM = outputs
                    nf4.NUM_WARPS, nf4.PAIRED_STORES, nf4.WORD_STORES = warps, paired, words
                    out = nf4.dequantize_nf4(packed, state)
                    exact = torch.equal(out, expected)
                    ms = device_ms(lambda _k: nf4.dequantize_nf4(packed, state))
                    print(f"words {words:d} paired {paired:d} outputs/program {outputs:5d} warps {warps}: {ms:.4f} ms "
                          f"({moved / ms / 1e9:.2f} TB/s, {ref / ms:.2f}x bitsandbytes) exact={exact}", flush=True)
        (nf4.OUTPUTS_PER_PROGRAM, nf4.WORD_OUTPUTS_PER_PROGRAM, nf4.NUM_WARPS, nf4.PAIRED_STORES,
         nf4.WORD_STORES) = default
        wide = torch.empty(rows, cols + 16, dtype=torch.bfloat16, device="cuda")
        nf4.dequantize_nf4(packed, state, out=wide[:, 16:])
        ms = device_ms(lambda _k: nf4.dequantize_nf4(packed, state, out=wide[:, 16:]))
        print(f"default into [:, 16:] of a {rows}x{cols + 16} buffer: {ms:.4f} ms, "
              f"exact={torch.equal(wide[:, 16:], expected)}", flush=True)


if __name__ == "__main__":
    main()
