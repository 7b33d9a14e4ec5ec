#!/usr/bin/env python3
"""What autograd itself costs the host for a decoder layer's worth of custom Functions (CPU, tiny tensors).

A checkpointed layer's recompute records ~7 ``torch.autograd.Function``s and its backward walks them in
a nested engine run (docs/perf-notes.md, section 14: the plan for a hand-written layer backward). This
times the same chain of cheap Functions both ways: ``Function.apply`` + ``torch.autograd.backward``,
and the same ``forward``/``backward`` staticmethods called directly with a plain context object. The
difference is the per-layer host cost such a backward would remove (before the views, residual sums
and AccumulateGrad nodes a real layer adds).

    python bench/autograd_overhead.py [--functions 7]
"""
import argparse
import time

import torch


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


def best_us(fn, n=2000, repeats=5):
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


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


if __name__ == "__main__":
    main()
