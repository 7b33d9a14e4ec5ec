"""Fused LoRA projections over a frozen 16-bit or NF4 base: one autograd node per layer part.

A LoRA linear is ``y = x W^T + s (x A^T) B^T`` with W frozen and A ``[r, in]``, B ``[out, r]``
trainable. Written as a peft module it is ~5 autograd nodes that together keep x, x A^T and (for
QLoRA) a dequantised copy of W alive until backward. Here each of the three shapes a decoder layer
needs is one ``torch.autograd.Function`` with a hand-written backward:

- ``lora_linear(x, p)``: saves x and the tiny ``x A^T`` ``[N, r]``; the gradients are
  ``dB = s dY^T (x A^T)``, ``dA = s (dY B)^T x``, ``dx = dY W + s (dY B) A``. No ``dW``: the base is
  frozen (a weight that requires grad is refused rather than silently left without a gradient).
- ``lora_qkv(x, q, k, v)``: the three attention projections share x; one node, dx summed.
- ``lora_mlp(x, gate, up, down, activation)``: ``down(act(gate(x)) * up(x))``. Saves x, the gate
  pre-activation G and the up output U (2 x ``[N, intermediate]``) rather than recomputing them in
  backward (two more ``[N, in] x [in, I]`` matmuls, ~50% more MLP backward FLOPs, the trade Unsloth
  also makes). ``h = act(G) * U`` is not kept: the activation backward recomputes it while writing
  ``dG``/``dU`` over G and U, so the backward allocates only ``dH``.

NF4 bases are dequantised (``nf4.dequantize_nf4``, one Triton launch) right before each matmul
that needs W, in forward and again in backward, and dropped immediately: only the packed 4-bit
weight is held between the passes. (A recompute whose backward follows at once may hand its widened
q/k/v and gate/up weights to that backward: ``lora_widened.KEEP``.)

Dtypes: the matmuls run in the compute dtype, the autocast dtype when autocast is on (as a
peft+autocast model would), else x's dtype. A and B may be fp32 master weights: they are cast for
the matmuls and their gradients come back in their own dtype, as does x's.
"""
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .adapter_casts import _cast, _stacked
from . import lora_widened
from .lora_widened import (_adapter_in_gemm, _adapter_inputs, _forward_fused, _forward_shared, _widened_input,
                           backward_bases, backward_stacked_base, keeps)
from .nf4 import dequantize_nf4
from ..errors import ConfigError
from .lora_activations import ACTIVATIONS, gated_backward, gated_forward


@dataclass
class LoraWeights:
    """One LoRA linear: frozen ``weight`` ``[out, in]`` (16-bit, or packed NF4 with its bitsandbytes
    ``quant_state``), trainable ``A`` ``[r, in]`` and ``B`` ``[out, r]``, and ``scale`` (alpha / r)."""

    weight: torch.Tensor
    quant_state: Optional[object]
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0] if self.quant_state is not None else self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.quant_state.shape[1] if self.quant_state is not None else self.weight.shape[1])


def _check(p: LoraWeights, in_features: int, name: str) -> None:
    if not isinstance(p, LoraWeights):
        raise ConfigError(f"{name} must be a LoraWeights bundle, got {type(p).__name__}.")
    if p.quant_state is None and p.weight.dim() != 2:
        raise ConfigError(f"{name}.weight must be [out, in] (or packed NF4 with quant_state), got {tuple(p.weight.shape)}.")
    if torch.is_grad_enabled() and p.weight.requires_grad:  # grad mode first: a Params4bit read runs Python
        raise ConfigError(
            f"{name}.weight requires grad, but the fused LoRA ops treat the base weight as frozen and "
            "would give it no gradient: freeze it (weight.requires_grad_(False)) or run the plain module."
        )
    out_f, in_f = p.out_features, p.in_features
    r = p.A.shape[0]
    if in_f != in_features or tuple(p.A.shape) != (r, in_f) or tuple(p.B.shape) != (out_f, r):
        raise ConfigError(
            f"{name}: shapes do not chain: x has {in_features} features, weight is [{out_f}, {in_f}], "
            f"A {tuple(p.A.shape)} (want [r, {in_f}]), B {tuple(p.B.shape)} (want [{out_f}, r])."
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype




def _base(weight, quant_state, dtype) -> torch.Tensor:
    """The dense base weight in ``dtype``: a fresh NF4 dequantisation, or the 16-bit weight itself."""
    if quant_state is not None:
        return dequantize_nf4(weight, quant_state, dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _forward(X, weight, quant_state, A, B, scale, out_shape=None, xa=None):
    """(x A^T, x W^T + s (x A^T) B^T) for 2-D X; A and B already in X's dtype (``xa``: x A^T if known).

    The adapter term is written first and the base matmul adds itself onto it (``beta = s`` in its
    epilogue): the matmul reads y while it is compute-bound anyway, where adding the adapter afterwards
    would read and write all of y once more (``_add_base``). With ``out_shape`` the result is
    allocated in that shape and filled through a 2-D view, so the caller gets a tensor that is not a
    view (RoPE may then rotate it in place under autograd).
    """
    xa = X @ A.t() if xa is None else xa
    y = torch.empty(out_shape if out_shape is not None else (X.shape[0], B.shape[0]), dtype=X.dtype,
                    device=X.device)
    y2 = y.view(-1, y.shape[-1])
    torch.mm(xa, B.t(), out=y2)
    _add_base(y2, X, weight, quant_state, scale)
    return xa, y


def _add_base(out, dY, weight, quant_state, beta, transpose=True, W=None):
    """``out = beta * out + dY W^T`` (or ``dY W`` with ``transpose=False``): the frozen base's matmul
    accumulating onto a low-rank term already in ``out``, in one GEMM. Holding out's adapter term
    first and letting the base matmul add itself (``beta`` in its epilogue) saves the separate
    ``out.addmm_(xa, B^T)`` pass over the whole output: for the 8B gate and up projections at 4,096
    tokens that is ~0.5 GB of traffic a call. ``W``: the dense base when the caller has it."""
    W = _base(weight, quant_state, dY.dtype) if W is None else W
    out.addmm_(dY, W.t() if transpose else W, beta=beta)


# The MLP's ``h A_d^T`` is computed over row chunks of at most this many bytes of h, in the forward and,
# after a recompute that skipped the down projection (``output_needed=False``), in the backward from
# the h its activation kernel rewrites: the same chunks give the same bits either way. Chunks bound
# memory only where h is made chunk by chunk (``SLOTHNB_HA_IN_BACKWARD=0``); where h is whole they are
# views, and each is one more matmul for the host to launch. 256 MiB (64 until session 25) keeps the
# 8B MLP's h (117 MB at 2 x 2,048 tokens, 235 MB at 2 x 4,096) in one: 62 launches fewer a step.
H_CHUNK_BYTES = 256 << 20
# SLOTHNB_HA_IN_BACKWARD=0: a recompute without output still computes h A_d^T itself (benchmarks).
HA_IN_BACKWARD = os.environ.get("SLOTHNB_HA_IN_BACKWARD", "1") != "0"


def _h_times_adapter(h_rows, n, width, A, like):
    """``h_rows(start, end) @ A^T`` over row chunks of ``h`` (``[n, width]``, ``like``'s dtype and device)."""
    chunks = -(-n * width * like.element_size() // H_CHUNK_BYTES)
    if chunks <= 1:
        return h_rows(0, n) @ A.t()
    step = -(-n // chunks)
    out = torch.empty(n, A.shape[0], dtype=like.dtype, device=like.device)
    for start in range(0, n, step):
        end = min(n, start + step)
        torch.mm(h_rows(start, end), A.t(), out=out[start:end])
    return out


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * scale`` in place; no launch at all for the common alpha == r (scale 1)."""
    return t if scale == 1.0 else t.mul_(scale)


# torch.mm(..., out_dtype=) for adapter gradients; switched off at its first refusal.
# SLOTHNB_MM_OUT_DTYPE=0 turns it off (benchmarks).
_MM_OUT_DTYPE = os.environ.get("SLOTHNB_MM_OUT_DTYPE", "1") != "0"


def _mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype``: an adapter's gradient in its parameter's own dtype.

    On CUDA a 16-bit product wanted in fp32 comes straight out of cuBLAS's fp32 accumulator: one
    launch instead of a matmul and a cast (14 launches a Llama layer), and no 16-bit rounding on the
    way. Elsewhere (CPU, or a torch without ``out_dtype``) it is the matmul and the cast.
    """
    global _MM_OUT_DTYPE
    if a.dtype == dtype:
        return a @ b
    if _MM_OUT_DTYPE and a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return (a @ b).to(dtype)


def _backward(dYs: list, X, xas, parts, dtypes, need_dx=True, kept=None, widened=False, fused=False):
    """(dX, [(dA_j, dB_j)]) of LoRA projections sharing the input X (one projection, or q/k/v, or
    gate/up): ``parts`` = [(W, quant_state, scale, A, B)] with A, B in dY's dtype, ``dtypes`` = [(A dtype,
    B dtype)] of the parameters, in which their gradients come back.

    Per projection: ``dB_j = s_j dY_j^T (x A_j^T)``, ``dY_j B_j`` and ``dX += dY_j W_j``. The adapter
    terms of all projections come from one matmul each: ``dA = [dY_j B_j]^T X`` (split into row views)
    and ``dX += [dY_j B_j] [A_j]``, four launches fewer for q/k/v and two for gate/up than one by one;
    the A's are one view when packed (``_stacked``). ``dYs`` entries are dropped as they are used.
    ``widened``: the forward ran them widened (``lora_widened``); ``kept``: its dequantised W of each
    projection (``lora_widened.KEEP``). ``fused``: it ran them as one matmul (``lora_widened.FUSED_QKV``):
    the dY_j are laid side by side and ``dX += [dY_1 ..] [W_1; ..]`` is one matmul (``kept``: the stacked W).
    """
    n, dt = X.shape[0], X.dtype
    dY_all = None
    if fused:  # one [tokens, sum out_j] gradient, whose column blocks stand in for the dY_j from here on
        dY_all = torch.cat(dYs, dim=1)
        dYs.clear()
        start = 0
        for p in parts:
            dYs.append(dY_all[:, start:start + p[4].shape[0]])
            start += p[4].shape[0]
    ranks = [p[3].shape[0] for p in parts]
    scales = [p[2] for p in parts]
    same_scale = all(sc == scales[0] for sc in scales)
    dyb_t = torch.empty(sum(ranks), n, dtype=dt, device=X.device)  # rows: (dY_j B_j)^T, scaled unless same_scale
    dBs, start = [], 0
    for (weight, quant_state, scale, _A, B), dY, xa, r, (_, tb) in zip(parts, dYs, xas, ranks, dtypes):
        dBs.append(_scaled(_mm_as(dY.t(), xa, tb), scale))
        torch.mm(B.t(), dY.t(), out=dyb_t[start:start + r])
        if not same_scale:
            _scaled(dyb_t[start:start + r], scale)
        start += r
    common = scales[0] if same_scale else 1.0
    a_dtype = functools.reduce(torch.promote_types, [d[0] for d in dtypes])  # A's of mixed dtypes: the widest
    dA = _scaled(_mm_as(dyb_t, X, a_dtype), common)
    dX = None
    if need_dx and fused:
        dX = dyb_t.t() @ _stacked([p[3] for p in parts])
        dX.addmm_(dY_all, backward_stacked_base(X, parts, kept), beta=common)
    elif need_dx:  # the adapter terms first, then each base matmul adds itself onto them (``_add_base``)
        dX = dyb_t.t() @ _stacked([p[3] for p in parts])
        bases = backward_bases(X, parts, kept) if widened else [None] * len(parts)
        for j, (weight, quant_state, *_rest) in enumerate(parts):
            _add_base(dX, dYs[j], weight, quant_state, common if j == 0 else 1.0, transpose=False, W=bases[j])
            dYs[j] = bases[j] = None
    dYs.clear()
    grads, start = [], 0
    for r, dB, (ta, _) in zip(ranks, dBs, dtypes):
        grads.append((dA[start:start + r].to(ta), dB))
        start += r
    return dX, grads


def _rows(x, dt):
    return x.reshape(-1, x.shape[-1]).to(dt)


def _adapters(ps):
    """What the Functions receive per projection: (A, B) as autograd inputs, and the rest as one
    non-tensor bundle (W is frozen: fewer autograd inputs is less per-call work in ``apply``)."""
    tensors, bundles = [], []
    for p in ps:
        tensors += [p.A, p.B]
        bundles.append((p.weight, p.quant_state, float(p.scale)))
    return tensors, tuple(bundles)


def _prepared(dt, bundles, tensors):
    """Per projection (W, quant_state, scale, A, B in dt, (A dtype, B dtype))."""
    out = []
    for i, (weight, quant_state, scale) in enumerate(bundles):
        A, B = tensors[2 * i], tensors[2 * i + 1]
        out.append((weight, quant_state, scale, _cast(A, dt), _cast(B, dt), (A.dtype, B.dtype)))
    return out


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bundles, given, A, B):
        dt = _compute_dtype(x)
        X = _rows(x, dt)
        ((weight, quant_state, scale, Ac, Bc, dtypes),) = _prepared(dt, bundles, (A, B))
        if given[0] is not None:  # the output's values are known: only x A^T, which backward needs
            xa, y = X @ Ac.t(), given[0]
        else:
            xa, y = _forward(X, weight, quant_state, Ac, Bc, scale, out_shape=(*x.shape[:-1], Bc.shape[0]))
        ctx.save_for_backward(X, xa, Ac, Bc)
        ctx.base = (weight, quant_state, scale, dtypes)
        ctx.x_meta = (x.shape, x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        X, xa, A, B = ctx.saved_tensors
        weight, quant_state, scale, dtypes = ctx.base
        dX, ((dA, dB),) = _backward([_rows(dy, X.dtype)], X, [xa], [(weight, quant_state, scale, A, B)], [dtypes],
                                    need_dx=ctx.needs_input_grad[0])
        dx = None if dX is None else dX.view(ctx.x_meta[0]).to(ctx.x_meta[1])
        return dx, None, None, dA, dB


class LoraQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bundles, *AB):
        dt = _compute_dtype(x)
        X = _rows(x, dt)
        parts = _prepared(dt, bundles, AB)
        shapes = [(*x.shape[:-1], p[4].shape[0]) for p in parts]
        ctx.kept, ctx.fused = None, False
        if _adapter_in_gemm(parts):
            ctx.kept = [] if getattr(ctx, "keep_bases", False) and keeps(X) else None
            ctx.fused = lora_widened.FUSED_QKV and len(parts) > 1
            Xa, xas, outs = (_forward_fused if ctx.fused else _forward_shared)(
                X, [p[:5] for p in parts], shapes, getattr(ctx, "widened", None), ctx.kept)
            X, saved = Xa, [Xa]  # X itself is Xa[:, :in]
        else:
            xas, outs, saved = _adapter_inputs(X, [p[3] for p in parts]), [], [X]
            for (weight, quant_state, scale, Ac, Bc, _), shape, xa in zip(parts, shapes, xas):
                outs.append(_forward(X, weight, quant_state, Ac, Bc, scale, out_shape=shape, xa=xa)[1])
        bases = []
        for (weight, quant_state, scale, Ac, Bc, dtypes), xa in zip(parts, xas):
            saved += [xa, Ac, Bc]
            bases.append((weight, quant_state, scale, dtypes))
        ctx.save_for_backward(*saved)
        ctx.in_features = x.shape[-1]
        ctx.bases = bases
        ctx.x_meta = (x.shape, x.dtype)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        X, *rest = ctx.saved_tensors
        X = X[:, :ctx.in_features]  # a view when the forward kept [X | x A^T ...] together
        need_dx = ctx.needs_input_grad[0]
        dX, grads = None, []
        parts = [(w, qs, sc, rest[3 * i + 1], rest[3 * i + 2]) for i, (w, qs, sc, _) in enumerate(ctx.bases)]
        kept, ctx.kept = ctx.kept, None
        dX, pairs = _backward([_rows(dy, X.dtype) for dy in dys], X, rest[0::3], parts, [b[3] for b in ctx.bases],
                              need_dx=need_dx, kept=kept, widened=True, fused=getattr(ctx, "fused", False))
        grads = [g for pair in pairs for g in pair]
        dx = dX.view(ctx.x_meta[0]).to(ctx.x_meta[1]) if need_dx else None
        return (dx, None, *grads)


class LoraMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, activation, output_needed, gate_up_io, bundles, *AB):
        dt = _compute_dtype(x)
        X = _rows(x, dt)
        (Wg, qg, sg, Ag, Bg, tg), (Wu, qu, su, Au, Bu, tu), (Wd, qd, sd, Ad, Bd, td) = _prepared(dt, bundles, AB)
        gate_up = [(Wg, qg, sg, Ag, Bg), (Wu, qu, su, Au, Bu)]
        given, keep = gate_up_io
        ctx.kept = None
        shared = _adapter_in_gemm(gate_up)
        if given is not None:  # G and U are known (a recompute handed the forward's): only the adapter inputs
            G, U = given
            if shared:  # X kept widened as when they are computed: the backward's matmuls see the same layout
                X, (xa_g, xa_u) = _widened_input(X, [Ag, Au], getattr(ctx, "widened", None))
            else:
                xa_g, xa_u = _adapter_inputs(X, [Ag, Au])
        elif shared:
            n = X.shape[0]
            ctx.kept = [] if getattr(ctx, "keep_bases", False) and keeps(X) else None
            X, (xa_g, xa_u), (G, U) = _forward_shared(X, gate_up, [(n, Bg.shape[0]), (n, Bu.shape[0])],
                                                      getattr(ctx, "widened", None), ctx.kept)
        else:
            xa_g, xa_u = _adapter_inputs(X, [Ag, Au])
            G = _forward(X, Wg, qg, Ag, Bg, sg, xa=xa_g)[1]
            U = _forward(X, Wu, qu, Au, Bu, su, xa=xa_u)[1]
        if keep is not None:
            keep(G, U)
        out_shape = (*x.shape[:-1], Bd.shape[0])
        n, inter = G.shape
        if output_needed:
            H = gated_forward(activation, G, U)
            ha = _h_times_adapter(lambda a, b: H[a:b], n, inter, Ad, G)
            ha, y = _forward(H, Wd, qd, Ad, Bd, sd, out_shape=out_shape, xa=ha)
            del H
        else:  # nothing of the down projection: its backward computes H A_d^T from the H that the
            # activation's backward kernel rewrites anyway (the same bits as the forward kernel's H)
            ha = None if HA_IN_BACKWARD else _h_times_adapter(
                lambda a, b: gated_forward(activation, G[a:b], U[a:b]), n, inter, Ad, G)
            y = torch.empty(out_shape, dtype=X.dtype, device=X.device)
        ctx.save_for_backward(X, G, U, xa_g, xa_u, ha, Ag, Bg, Au, Bu, Ad, Bd)
        ctx.in_features = x.shape[-1]
        ctx.bases = [(Wg, qg, sg, tg), (Wu, qu, su, tu), (Wd, qd, sd, td)]
        ctx.activation = activation
        ctx.x_meta = (x.shape, x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        X, G, U, xa_g, xa_u, ha, Ag, Bg, Au, Bu, Ad, Bd = ctx.saved_tensors
        X = X[:, :ctx.in_features]  # a view when the forward kept [X | x A^T ...] together
        (Wg, qg, sg, tg), (Wu, qu, su, tu), (Wd, qd, sd, td) = ctx.bases
        dt = X.dtype
        dY = _rows(dy, dt)
        # down: dH = dY Wd + sd (dY Bd) Ad, then (h, dG, dU) with h in dH's buffer, dG/dU over G/U
        dyb = dY @ Bd
        dH = dyb @ Ad  # the adapter term first; the base matmul adds onto it (``_add_base``)
        _add_base(dH, dY, Wd, qd, sd, transpose=False)
        H, dG, dU = gated_backward(ctx.activation, dH, G, U)
        del dH, G, U
        if ha is None:  # a recompute that skipped the down projection: H A_d^T in the forward's row chunks
            ha = _h_times_adapter(lambda a, b, H=H: H[a:b], H.shape[0], H.shape[1], Ad, H)
        dB_d = _scaled(_mm_as(dY.t(), ha, td[1]), sd)
        del dY, ha
        dA_d = _scaled(_mm_as(dyb.t(), H, td[0]), sd)
        del H, dyb
        need_dx = ctx.needs_input_grad[0]
        dYs = [dG, dU]
        del dG, dU  # _backward drops each as it is used
        kept, ctx.kept = ctx.kept, None
        dX, ((dA_g, dB_g), (dA_u, dB_u)) = _backward(
            dYs, X, [xa_g, xa_u], [(Wg, qg, sg, Ag, Bg), (Wu, qu, su, Au, Bu)], [tg, tu], need_dx=need_dx, kept=kept,
            widened=True)
        dx = dX.view(ctx.x_meta[0]).to(ctx.x_meta[1]) if need_dx else None
        return (dx, None, None, None, None, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d)


def lora_linear(x: torch.Tensor, p: LoraWeights, output: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + scale (x A^T) B^T`` for x ``[..., in]``: one autograd node, grads for x, A, B.

    ``output``: that result's values when they are already known (a checkpoint's recompute handed the
    forward's own output, ``carrying.carried``): it is returned as the node's output and neither
    the base matmul nor its dequantisation runs. The gradients are the same.
    """
    _check(p, x.shape[-1], "p")
    if output is not None:
        want = (*x.shape[:-1], p.out_features)
        if tuple(output.shape) != want or output.dtype != _compute_dtype(x) or output.device != x.device:
            raise ConfigError(f"lora_linear output= must be a {want} {_compute_dtype(x)} tensor on {x.device}, "
                              f"got {tuple(output.shape)} {output.dtype} on {output.device}.")
    tensors, bundles = _adapters((p,))
    return LoraLinearFunction.apply(x, bundles, [output], *tensors)


def lora_qkv(x: torch.Tensor, q: LoraWeights, k: LoraWeights, v: LoraWeights):
    """(Q, K, V) = the three LoRA projections of the same x, as one autograd node.

    The outputs are fresh ``[..., out]`` tensors, not views, so they may be modified in place
    under autograd (``apply_rope_projections`` rotates q and k in place).
    """
    for name, p in (("q", q), ("k", k), ("v", v)):
        _check(p, x.shape[-1], name)
    tensors, bundles = _adapters((q, k, v))
    return LoraQKVFunction.apply(x, bundles, *tensors)


def lora_mlp(x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights,
             activation: str = "swiglu", output_needed: bool = True, gate_up=None, keep_gate_up=None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with LoRA on all three; activation: swiglu | geglu | geglu_tanh.

    ``output_needed=False`` is for a checkpoint's recompute, whose outputs only carry the autograd
    graph: the result is then an *uninitialised* tensor of the right shape, and nothing of the down
    projection runs (its base matmul is a quarter of a Llama layer's FLOPs; no dequantisation, no
    activation): the backward computes ``h A_d^T`` from the h its activation kernel writes anyway,
    with the forward's bits, so the gradients are bit-identical.

    ``gate_up=(G, U)``: the gate and up outputs (``[tokens, intermediate]``, compute dtype) when they
    are already known (a recompute handed the forward's own): their matmuls are skipped; the backward
    overwrites them. ``keep_gate_up(G, U)`` is called with them once computed (the forward handing
    them on). The gradients are the same.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"lora_mlp activation must be one of {ACTIVATIONS}, got {activation!r}.")
    _check(gate, x.shape[-1], "gate")
    _check(up, x.shape[-1], "up")
    if up.out_features != gate.out_features:
        raise ConfigError(f"gate and up must have the same width, got {gate.out_features} and {up.out_features}.")
    _check(down, gate.out_features, "down")
    if gate_up is not None:
        want = (x.numel() // x.shape[-1], gate.out_features)
        if any(tuple(t.shape) != want or t.dtype != _compute_dtype(x) or t.device != x.device for t in gate_up):
            raise ConfigError(f"lora_mlp gate_up= must be two {want} {_compute_dtype(x)} tensors on {x.device}, "
                              f"got {[(tuple(t.shape), t.dtype, str(t.device)) for t in gate_up]}.")
    tensors, bundles = _adapters((gate, up, down))
    return LoraMLPFunction.apply(x, activation, bool(output_needed), (gate_up, keep_gate_up), bundles, *tensors)


def lora_linear_reference(x, p: LoraWeights, dequantized_weight=None):
    """Plain autograd composition (what peft computes) in x's dtype, for tests and benchmarks."""
    W = dequantized_weight if dequantized_weight is not None else _base(p.weight, p.quant_state, x.dtype)
    return x @ W.to(x.dtype).t() + p.scale * (x @ p.A.to(x.dtype).t()) @ p.B.to(x.dtype).t()


__all__ = ["LoraWeights", "lora_linear", "lora_qkv", "lora_mlp", "lora_linear_reference",
           "LoraLinearFunction", "LoraQKVFunction", "LoraMLPFunction"]
