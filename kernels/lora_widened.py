"""LoRA projections sharing one input, with NF4 bases, as one matmul each over a widened input.

Projections that share their input (q/k/v, gate/up) and have NF4 bases run as
``[X | xa_1 .. xa_k] @ [W_j | 0 | s_j B_j]^T``: the adapter's contribution rides in the base matmul's
reduction instead of a second pass over the output (``y.addmm_(xa, B^T)`` reads and writes all of y:
for the 8B gate and up projections at 4,096 tokens that is ~0.5 GB a pass). The dequantisation writes
W, the zeros and ``s B`` straight into the wider buffer (one launch, ``nf4.dequantize_nf4(tail=)``).
16-bit bases keep two matmuls (widening W would copy it every call; ``lora._forward``).

A recompute's widened weights may be kept for its backward (``KEEP``): the backward then reads W from
them instead of dequantising it again (``backward_bases``). Opt-in, q/k/v go further: one matmul against
their weights stacked in one buffer (``FUSED_QKV``, ``_forward_fused``).
"""
import os
from typing import Optional

import torch

from ._utils import switched_on
from .adapter_casts import _stacked
from .nf4 import _write_tail_torch, dequantize_nf4

# SLOTHNB_ADAPTER_IN_GEMM=0 turns the widened form off (benchmarks).
ADAPTER_IN_GEMM = os.environ.get("SLOTHNB_ADAPTER_IN_GEMM", "1") != "0"
# The dequantisation writes the 0 and s B columns too (``tail``): ~470 launches fewer an 8B QLoRA step.
DEQUANT_TAIL = os.environ.get("SLOTHNB_DEQUANT_TAIL", "1") != "0"
_ALIGN = 8  # row strides padded to 16 bytes of bf16, so cuBLAS keeps its fast kernels


# SLOTHNB_KEEP_DEQUANTIZED: a recompute's widened weights kept for the backward that follows it, which
# then reads W from them (``backward_bases``) instead of dequantising it again: 3 launches a Llama layer for
# q/k/v (+50 MB while the layer's backward runs, 8B shapes). With it on, every widened projection's
# backward reads W in the forward's padded row layout, kept or dequantised afresh, so that both give the
# same matmul and the same bits. "1" (default) everywhere, "cpu" only off CUDA, "0" nowhere.
# KEEP_GATE_UP (SLOTHNB_KEEP_GATE_UP, on by default since session 22): gate/up kept too, 2 launches fewer
# a layer for +235 MB. Where the host sets the step's pace that paid +0.5-2% (H100, 8B QLoRA), and the
# peaks stay within the targets (6.41 GiB at 2 x 2,048 tokens, 7.35 at 2 x 4,096).
KEEP = os.environ.get("SLOTHNB_KEEP_DEQUANTIZED", "1")
KEEP_GATE_UP = os.environ.get("SLOTHNB_KEEP_GATE_UP", "1") != "0"


# SLOTHNB_FUSED_QKV: q, k and v (NF4 bases, widened) as one matmul against their weights stacked in one
# buffer, ``[X | xa_q xa_k xa_v] @ [W_q | s B_q 0 0; W_k | 0 s B_k 0; W_v | 0 0 s B_v]^T`` (``_forward_fused``),
# and in the backward one ``dX += [dY_q dY_k dY_v] [W_q; W_k; W_v]``: two matmuls and two output buffers
# fewer in each forward and recompute, two accumulations into dX fewer in the backward, and GEMMs of
# N = 6,144 and K = 6,144 instead of k's and v's 1,024 at 8B shapes. q, k and v come back as tensors over
# the one output's memory (not views of it, so RoPE may still rotate q and k in place under autograd).
# On by default since session 27: on an H100, round by round against the three matmuls (same process,
# alternating steps), 8B QLoRA +0.7% [+0.3, +1.6], Qwen2.5-7B +1.5% [+0.5, +2.6], Gemma-2-9B +1.3% [+0.3, +1.9]
# (session 25, a host-slow machine: -0.1% [-0.7, +3.7]); peaks equal or a few MB lower. SLOTHNB_FUSED_QKV=0
# turns it off (benchmarks: ``--ab-switch ...lora_widened.FUSED_QKV=0``).
FUSED_QKV = os.environ.get("SLOTHNB_FUSED_QKV", "1") != "0"


def keeps(X) -> bool:
    """Whether ``KEEP`` is on for tensors like X."""
    return switched_on(KEEP, X)


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def backward_bases(X, parts, kept=None):
    """W ``[out, in]`` of each widened projection ``parts`` (sharing X) for its backward's ``dY W``, or
    None each where the caller dequantises as before (``KEEP`` off): the forward's kept widened weight's
    first columns, or a fresh dequantisation into the same padded row layout."""
    if kept is not None:
        return kept
    if not (keeps(X) and _adapter_in_gemm(parts)):
        return [None] * len(parts)
    h, start, out = X.shape[1], X.shape[1], []
    for weight, quant_state, _scale, A, B in (p[:5] for p in parts):
        start += A.shape[0]
        W = torch.empty(B.shape[0], _padded(start), dtype=X.dtype, device=X.device)[:, :h]
        out.append(dequantize_nf4(weight, quant_state, X.dtype, out=W))
    return out


def _dequantize_widened(weight, quant_state, out, B, scale, zeros):
    """W into ``out`` (the left columns of a widened row buffer), then in the same rows ``zeros`` zeros and
    ``scale * B``: one launch; SLOTHNB_DEQUANT_TAIL=0: op by op (benchmarks)."""
    tail = (B if B.stride(-1) == 1 else B.contiguous(), scale, zeros)
    if DEQUANT_TAIL:
        dequantize_nf4(weight, quant_state, out.dtype, out=out, tail=tail)
    else:
        _write_tail_torch(dequantize_nf4(weight, quant_state, out.dtype, out=out), tail)


def _stacked_weights(X, parts, width, tails):
    """The projections' dequantised weights one above the other in one ``[sum out_j, width]`` buffer (rows
    padded to ``_ALIGN``). With ``tails`` each row block is ``[W_j | 0 .. s_j B_j .. 0]``: its adapter's
    columns at its place among all the adapters' (``_widened_input``'s order), zeros at the others'; without,
    only the first ``in`` columns are written (the backward's ``[W_q; W_k; W_v]``, in the same row layout
    as the forward's, so that kept or dequantised afresh it gives the same matmul and the same bits)."""
    h = X.shape[1]
    W = torch.empty(sum(p[4].shape[0] for p in parts), _padded(width), dtype=X.dtype, device=X.device)[:, :width]
    if tails and width > h:
        W[:, h:].zero_()  # each block's tail writes its own adapter's columns and the zeros before them
    row, start = 0, h
    for weight, quant_state, scale, A, B in parts:
        block = W[row:row + B.shape[0], :h]
        if not tails:
            dequantize_nf4(weight, quant_state, X.dtype, out=block)
        else:
            _dequantize_widened(weight, quant_state, block, B, scale, start - h)
            start += A.shape[0]
        row += B.shape[0]
    return W


def _column_blocks(Y, shapes):
    """Y's consecutive column blocks as tensors of ``shapes`` (``[..., out_j]``, their rows Y's rows) over
    Y's memory. Not views: each has its own version counter and no ``_base``, so one may be modified in
    place under autograd (``RoPEProjectionsFunction`` marks q and k dirty) as a projection's own output."""
    out, col, row = [], Y.storage_offset(), Y.stride(0)
    storage = Y.untyped_storage()
    for shape in shapes:
        strides, step = [1], row
        for d in reversed(shape[:-1]):
            strides.append(step)
            step *= d
        out.append(torch.empty(0, dtype=Y.dtype, device=Y.device).set_(storage, col, shape, tuple(reversed(strides))))
        col += shape[-1]
    return out


def _forward_fused(X, parts, out_shapes, into=None, keep=None):
    """``_forward_shared`` for q/k/v as one matmul (``FUSED_QKV``): (Xa, [x A_j^T views], [y_j]) with the
    y_j column blocks of one ``[tokens, sum out_j]`` output. ``keep`` receives one tensor, the stacked
    ``[sum out_j, in]`` weights (``backward_stacked_base``)."""
    h = X.shape[1]
    Xa, xas = _widened_input(X, [p[3] for p in parts], into)
    width = h + sum(xa.shape[1] for xa in xas)
    W = _stacked_weights(X, parts, width, tails=True)
    Y = torch.empty(X.shape[0], W.shape[0], dtype=X.dtype, device=X.device)
    torch.mm(Xa[:, :width], W.t(), out=Y)
    if keep is not None:
        keep.append(W[:, :h])
    del W
    return Xa, xas, _column_blocks(Y, out_shapes)


def backward_stacked_base(X, parts, kept=None):
    """``[W_1; ..; W_k]`` ``[sum out_j, in]`` for the fused backward's one ``dY W``: the forward's kept
    buffer, or a fresh dequantisation in its row layout."""
    if kept is not None:
        return kept[0]
    width = X.shape[1] + sum(p[3].shape[0] for p in parts)
    return _stacked_weights(X, parts, width, tails=False)[:, :X.shape[1]]


def _adapter_in_gemm(parts) -> bool:
    """Whether ``_forward_shared`` applies: NF4 bases whose rows are whole quantisation blocks."""
    return ADAPTER_IN_GEMM and all(
        qs is not None and qs.shape[1] % int(qs.blocksize) == 0 for _, qs, *_ in parts)


def _forward_shared(X, parts, out_shapes, into=None, keep=None):
    """(Xa, [x A_j^T views], [y_j]) of projections ``parts`` = [(W, quant_state, scale, A, B)] sharing X.

    ``Xa = [X | x A_1^T | ... | x A_k^T]`` is what the backward keeps (X and each ``x A_j^T`` are views
    of it: no more memory than keeping them apart). Projection j reads the first ``H + r_1 + .. + r_j``
    columns against ``[W_j | 0 | s_j B_j]``, so its output is one matmul with fp32 accumulation of the
    base and adapter terms together. ``keep``: a list that receives each dequantised W ``[out, H]``
    (a view of its widened buffer) for the backward, instead of dropping it.
    """
    h = X.shape[1]
    Xa, xas = _widened_input(X, [p[3] for p in parts], into)
    ys, start = [], h
    for (weight, quant_state, scale, _A, B), xa, shape in zip(parts, xas, out_shapes):
        width = start + xa.shape[1]
        W = torch.empty(B.shape[0], _padded(width), dtype=X.dtype, device=X.device)[:, :width]
        _dequantize_widened(weight, quant_state, W[:, :h], B, scale, start - h)  # zeros facing the other xa's
        y = torch.empty(shape, dtype=X.dtype, device=X.device)
        torch.mm(Xa[:, :width], W.t(), out=y.view(-1, shape[-1]))
        if keep is not None:
            keep.append(W[:, :h])
        del W
        ys.append(y)
        start = width
    return Xa, xas, ys


def _adapter_inputs(X, As):
    """The ``x A_j^T`` of adapters sharing X, from one matmul (column views of ``x [A_1; ..]^T``)."""
    xa, out, start = X @ _stacked(As).t(), [], 0
    for A in As:
        out.append(xa[:, start:start + A.shape[0]])
        start += A.shape[0]
    return out


def widened_buffer(x: torch.Tensor, weights) -> Optional[torch.Tensor]:
    """An empty ``[tokens, in + ranks]`` buffer (rows padded) whose first columns the producer of x
    (an RMSNorm) may write, for LoRA projections ``weights`` that share x and will widen it
    (``_forward_shared``), so that X is never copied into it; None when they will not widen it.
    Pass it on as ``into``: the Function bodies take it from ``ctx.widened``."""
    if not _adapter_in_gemm([(w.weight, w.quant_state) for w in weights]):
        return None
    h = x.shape[-1]
    return torch.empty(x.numel() // h, _padded(h + sum(w.A.shape[0] for w in weights)), dtype=x.dtype,
                       device=x.device)


def _widened_input(X, As, into=None):
    """(``Xa = [X | X A_1^T | ...]``, the ``X A_j^T`` as views of it), rows padded to ``_ALIGN``.
    ``into``: a ``widened_buffer`` whose first columns already are X (nothing is copied then)."""
    n, h = X.shape
    ranks = [A.shape[0] for A in As]
    width = _padded(h + sum(ranks))
    if (into is not None and tuple(into.shape) == (n, width) and into.dtype == X.dtype
            and into.data_ptr() == X.data_ptr() and X.stride() == (width, 1)):
        Xa = into
    else:
        Xa = torch.empty(n, width, dtype=X.dtype, device=X.device)
        Xa[:, :h].copy_(X)
    torch.mm(X, _stacked(As).t(), out=Xa[:, h:h + sum(ranks)])  # written in place (cuBLAS takes the row stride)
    xas, start = [], h
    for r in ranks:
        xas.append(Xa[:, start:start + r])
        start += r
    return Xa, xas
