#!/usr/bin/env python3
"""The host's cost of one ``dequantize_nf4`` call around its launch, bound and unbound (CPU, no GPU).

An 8B QLoRA step dequantises ~480 times, and where the host sets the step's pace every microsecond of
Python around those launches counts (docs/perf-notes.md, section 23). This times the call on the CPU
with the kernel's real signature and a C launch that does nothing: the argument checks, the launch
geometry and the fast-launch key (unbound, ``nf4.BIND = False``), or the geometry lookup and the bound
launch (``nf4.BIND = True``), at the Llama-3.1-8B q_proj shape, with a widened tail and without.

    python bench/nf4_host.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_ops import per_call_us  # noqa: E402


def main():
    import bitsandbytes.functional as bnbf
    import torch

    from slothnb.kernels import _utils, nf4

    # the fast path as on a GPU: a launch is keyed and goes to a C launcher, here one that does nothing
    _utils.INTERPRET, _utils.FAST_LAUNCH = False, True
    _utils._current_device = lambda: 0
    _utils._raw_stream = lambda device: 0
    _utils._direct_launch = lambda compiled: (lambda *args: None, 0, False, False, None)
    nf4.use_triton = lambda t: True
    real = nf4._dequantize_nf4_kernel.fn

    class Compiler:  # what Triton's JIT function returns on a first launch: a compiled kernel
        arg_names, params = real.arg_names, real.params

        def __getitem__(self, grid):
            return lambda *args, **kwargs: object()

    nf4._dequantize_nf4_kernel = _utils.FastLaunch(Compiler())
    w = (torch.randn(4096, 4096) * 0.05).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    B = torch.randn(4096, 16).to(torch.bfloat16)
    wide = torch.empty(4096, 4096 + 48, dtype=torch.bfloat16)
    calls = {
        "into a widened buffer, with the s·B tail": lambda: nf4.dequantize_nf4(
            packed, state, torch.bfloat16, out=wide[:, :4096], tail=(B, 1.0, 16)),
        "into a widened buffer, no tail": lambda: nf4.dequantize_nf4(packed, state, torch.bfloat16,
                                                                    out=wide[:, :4096]),
    }
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; µs a call (best of 7 x 2000)")
    for bind in (False, True):
        nf4.BIND = bind
        for name, fn in calls.items():
            print(f"  {'bound  ' if bind else 'unbound'}  {name:42s} {per_call_us(fn, 2000, repeats=7):6.2f}")


if __name__ == "__main__":
    main()
