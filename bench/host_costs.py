#!/usr/bin/env python3
"""Two host costs of the training step, measured on the CPU with tiny tensors (no GPU needed).

1. What autograd itself costs for a decoder layer's worth of custom Functions.

A checkpointed layer's recompute records ~7 ``torch.autograd.Function``s and its backward walks them in
a nested engine run (docs/perf-notes.md, section 14: the plan for a hand-written layer backward). This
times the same chain of cheap Functions both ways: ``Function.apply`` + ``torch.autograd.backward``,
and the same ``forward``/``backward`` staticmethods called directly with a plain context object. The
difference is the per-layer host cost such a backward would remove (before the views, residual sums
and AccumulateGrad nodes a real layer adds).

2. An attribute read (``requires_grad``, ``is_cuda``, ``data_ptr()``) of a bitsandbytes ``Params4bit``,
whose ``__torch_function__`` runs in Python, against a plain parameter (section 14: ~2,000 reads an
8B QLoRA step before session 15 trimmed them).

    python bench/host_costs.py [--functions 7]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_ops import per_call_us  # noqa: E402


class Chain(torch.autograd.Function):
    """A cheap Function shaped like the fused ops: three inputs, two saved tensors, one output."""

    @staticmethod
    def forward(ctx, x, a, b):
        ctx.save_for_backward(x, a)
        return x.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        ctx.saved_tensors
        return g, None, None


class PlainContext:
    """What the staticmethods use of ``ctx`` when called without autograd."""
    needs_input_grad = (True, False, False)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def best_us(fn, n=2000):
    """Best of 5 mean µs a call over ``n`` calls, after 100 warm-up calls."""
    return per_call_us(fn, n, warmup=100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(4, 8, requires_grad=True)
    u, v = torch.randn(4), torch.randn(4)

    def with_autograd():
        with torch.enable_grad():
            y = x
            for _ in range(a.functions):
                y = Chain.apply(y, u, v)
            torch.autograd.backward([y], [torch.ones_like(y)])

    def direct():
        y, contexts = x.detach(), []
        for _ in range(a.functions):
            ctx = PlainContext()
            y = Chain.forward(ctx, y, u, v)
            contexts.append(ctx)
        g = torch.ones_like(y)
        for ctx in reversed(contexts):
            g = Chain.backward(ctx, g)[0]
        x.grad = g if x.grad is None else x.grad + g

    auto, plain = best_us(with_autograd), best_us(direct)
    print(f"{a.functions} Functions, forward + backward: autograd {auto:.1f} us, direct {plain:.1f} us "
          f"({(auto - plain) / a.functions:.1f} us a Function)")
    print_reads()


def print_reads():
    """µs a read of a Params4bit's attributes against a plain frozen parameter (skipped without bitsandbytes)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes not installed: no Params4bit reads")
        return
    for name, w in (("Params4bit", bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")),
                    ("Parameter", torch.nn.Parameter(torch.randn(64, 64), requires_grad=False))):
        reads = {attr: best_us(lambda: getattr(w, attr), n=20000) for attr in ("requires_grad", "is_cuda")}
        reads["data_ptr()"] = best_us(w.data_ptr, n=20000)
        print(f"{name}: " + ", ".join(f"{k} {v:.2f} us" for k, v in reads.items()))


if __name__ == "__main__":
    main()
