"""Run a token-wise function (a decoder MLP) over token chunks, holding one chunk's intermediates at a time.

At long context one MLP's intermediates dominate GPU memory: at 400K tokens on the Llama-3.1-8B shape
gate, up and the activation are each ``[400K, 14336]`` bf16 ~11.5 GB, and ``lora_mlp`` keeps G and U
for backward. An MLP is row-wise in tokens, so it can run ``chunk`` rows at a time with the same result.

``token_chunked(fn, x, params, chunk)`` is a checkpoint per chunk in one autograd node: forward runs
``fn`` on each chunk without grad and saves only ``x``; backward recomputes each chunk with grad on
(same RNG state, same autocast), backpropagates ``dy`` of that chunk, writes its rows of ``dx`` and adds
the parameter gradients, then drops the chunk's graph before the next. Peak extra memory is one chunk's
intermediates in both passes, at the price of one more MLP forward (as any checkpointing).

Gradients go to ``params`` through the node's own return values (not ``.grad`` side effects), so
``torch.autograd.grad`` works as well as ``backward()``. ``fn`` must treat tokens independently (no
mixing across rows): true of an MLP, of LoRA and of dropout.

The backward reads only the graph of each chunk's recomputed output, never its values, so it runs
``recompute_fn`` when given (``fn`` with its final projection skipped, for ``lora_mlp``). For a caller
that itself only needs the graph (a checkpointed layer's recompute), ``output_needed=False`` makes the
forward compute nothing: it returns an uninitialised ``[..., out_features]`` tensor.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ._utils import RecomputeState


def _bounds(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _chunked_no_grad(fn, X, chunk):
    """fn over the rows of 2-D X, chunk by chunk, into one preallocated output (no ``torch.cat`` copy)."""
    out = None
    for s, e in _bounds(X.shape[0], chunk):
        y = fn(X[s:e])
        if out is None:
            out = torch.empty((X.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device)
        out[s:e] = y
        del y
    return out


class TokenChunkedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, recompute_fn, chunk, lead, X, out_features, *params):
        ctx.fn, ctx.chunk = recompute_fn or fn, chunk
        ctx.params = params  # leaves (adapter parameters): no reference cycle through the graph
        # under a CUDA graph capture (a graphed layer's recompute) nothing draws random numbers (layers with
        # dropout are not graphed), and a generator's state must not be read or set there
        ctx.state = RecomputeState([X], preserve_rng=not (X.is_cuda and torch.cuda.is_current_stream_capturing()))
        if out_features is None:
            with torch.no_grad():
                out = _chunked_no_grad(fn, X, chunk)
        else:  # the caller reads only the graph: nothing to compute before the backward
            out = X.new_empty((X.shape[0], out_features))
        ctx.save_for_backward(X)
        return out.view(*lead, *out.shape[1:])

    @staticmethod
    def backward(ctx, dout):
        (X,) = ctx.saved_tensors
        dout = dout.reshape(X.shape[0], -1)
        need_x = ctx.needs_input_grad[4]
        want = [i for i, need in enumerate(ctx.needs_input_grad[6:]) if need]
        dX = torch.empty_like(X) if need_x else None
        dparams = [None] * len(ctx.needs_input_grad[6:])
        # chunks are recomputed in forward order from the forward's RNG state: same dropout masks
        with ctx.state.replay():
            targets = [ctx.params[i] for i in want]
            for s, e in _bounds(X.shape[0], ctx.chunk):
                xc = X[s:e].detach().requires_grad_(need_x)
                y = ctx.fn(xc)
                inputs = ([xc] if need_x else []) + targets
                grads = torch.autograd.grad(y, inputs, dout[s:e], allow_unused=True)
                del y
                if need_x:
                    dX[s:e] = grads[0] if grads[0] is not None else 0
                    grads = grads[1:]
                for i, g in zip(want, grads):
                    if g is not None:
                        dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
        return (None, None, None, None, dX, None, *dparams)


def token_chunked(fn, x: torch.Tensor, params, chunk: int, *, recompute_fn=None,
                  output_needed: bool = True, out_features: int | None = None) -> torch.Tensor:
    """``fn(x)`` for x ``[..., features]``, computed ``chunk`` tokens at a time (see the module doc).

    ``params``: the tensors inside ``fn`` that need gradients (the LoRA adapters); any trainable
    tensor ``fn`` uses but that is not listed gets no gradient. Below or at ``chunk`` tokens this is
    just ``fn(x)`` (``recompute_fn(x)`` when the output is not needed). ``recompute_fn``: what the
    backward re-runs per chunk, with the same graph as ``fn`` but free to leave the output's values
    unset. ``output_needed=False`` (with ``out_features``): the forward skips ``fn`` entirely.
    """
    if chunk < 1:
        raise ConfigError(f"token chunk must be >= 1 tokens, got {chunk} (SLOTHNB_MLP_CHUNK_TOKENS).")
    if not output_needed and (out_features is None or recompute_fn is None):
        raise ConfigError("token_chunked(output_needed=False) needs out_features and recompute_fn.")
    lead = x.shape[:-1]
    X = x.reshape(-1, x.shape[-1])
    if X.shape[0] <= chunk:
        return fn(x) if output_needed else recompute_fn(x)
    params = [p for p in params if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or params):
        graph_only_width = None if output_needed else int(out_features)
        return TokenChunkedFunction.apply(fn, recompute_fn, chunk, lead, X, graph_only_width, *params)
    with torch.no_grad():
        out = _chunked_no_grad(fn, X, chunk)
    return out.view(*lead, *out.shape[1:])


__all__ = ["token_chunked", "TokenChunkedFunction"]
