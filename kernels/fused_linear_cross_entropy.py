"""lm_head matmul + cross-entropy without ever holding [tokens, vocab] logits.

The tokens are processed in chunks: a chunk's logits come from one matmul, the
cross-entropy kernel (``cross_entropy.ce_rows``) turns them into losses and writes
dlogits over them in place, and two more matmuls turn dlogits into that chunk's
grad_hidden (dlogits @ W) and its contribution to grad_weight (dlogits^T @ h). So the
gradients are finished during the forward pass and backward only scales them by
grad_output (the Liger-Kernel scheme); peak extra memory is one chunk of logits
(``CHUNK_BYTES``) plus grad_hidden, instead of several [N, V] fp32 tensors.

Choices, correctness first:
- Ignored tokens (label == ignore_index) are dropped before any matmul: their rows
  get loss 0 and grad 0 without costing compute (prompt-masked SFT often ignores half).
- dlogits are computed with scale 1 and the normaliser and grad_output are applied in
  backward, in fp32: fp16 dlogits scaled by 1/num_tokens would underflow, and a
  GradScaler's large grad_output is only known in backward.
- grad_weight (only when the weight trains, never for LoRA's frozen lm_head) is
  accumulated across chunks in an fp32 [V, H] buffer: summing 10-50 chunk products in
  bf16 would lose ~1% relative accuracy. Each chunk product is formed in vocabulary
  slices so its temporary stays small.
- reduction="none" cannot know each token's grad_output in forward, so it keeps the
  inputs and recomputes the chunks in backward (one extra matmul per chunk).
"""
import math

import torch
import torch.nn.functional as F

from .cross_entropy import ce_rows, check_options, normaliser
from ..errors import ConfigError

CHUNK_BYTES = 128 << 20  # one chunk of logits in the compute dtype
VOCAB_SLICE_BYTES = 128 << 20  # temporary of one grad_weight slice product
_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=fp32) works here; set False on first failure


def default_chunk_rows(n_tokens: int, vocab: int, elem_size: int) -> int:
    """Rows per chunk so a chunk's logits fit CHUNK_BYTES, balanced across chunks."""
    rows = max(1, CHUNK_BYTES // (vocab * elem_size))
    n_chunks = max(1, math.ceil(n_tokens / rows))
    return max(1, math.ceil(n_tokens / n_chunks))


def _add_product_fp32(acc, a, b):
    """acc (fp32 [V, H]) += a @ b with a [V, C], b [C, H] in a lower precision, in V-slices."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    V, H = acc.shape
    step = max(1, VOCAB_SLICE_BYTES // (4 * H))
    for s in range(0, V, step):
        e = min(V, s + step)
        part = None
        if _MM_OUT_DTYPE[0] and a.is_cuda:
            try:
                part = torch.mm(a[s:e], b, out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                _MM_OUT_DTYPE[0] = False
        if part is None:
            part = torch.mm(a[s:e], b)  # rounded once per chunk, then summed in fp32
        acc[s:e] += part


def _scaled(src, g, dtype):
    """New tensor ``src * g`` in ``dtype``, computed in fp32 in row slices (bounded temporaries)."""
    if src.dtype == torch.float32 and dtype == torch.float32:
        return src * g
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    step = max(1, (64 << 20) // (4 * max(1, math.prod(src.shape[1:]))))
    for s in range(0, src.shape[0], step):
        out[s:s + step] = src[s:s + step].float() * g
    return out


def _chunked(hv, yv, weight, bias, opts, chunk, want_h, want_w, want_b, row_scale=None):
    """Losses of the (all non-ignored) rows ``hv``; with want_* also their gradients."""
    n, H = hv.shape
    dev = hv.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    gh = None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if want_w else None
    gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if want_b else None
    need_grad = want_h or want_w or want_b
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = hv[s:e]
        logits = F.linear(hc, weight, bias)
        sc = None if row_scale is None else row_scale[s:e]
        loss[s:e], _ = ce_rows(logits, yv[s:e], **opts, grad=logits if need_grad else None, grad_scale=sc)
        if want_h:
            part = torch.mm(logits, weight)
            if gh is None:
                gh = torch.empty((n, H), dtype=part.dtype, device=dev)
            gh[s:e] = part
        if want_w:
            _add_product_fp32(gw, logits.t(), hc)
        if want_b:
            gb += logits.sum(0, dtype=torch.float32)
        del logits
    if want_h and gh is None:
        gh = torch.empty((0, H), dtype=hv.dtype, device=dev)
    return loss, gh, gw, gb


def _scatter_rows(rows, idx, n):
    """[len(idx), ...] -> [n, ...] with zeros on the rows not in idx (the ignored tokens)."""
    if idx is None:
        return rows
    out = torch.zeros((n,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return out.index_copy_(0, idx, rows)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, ignore_index, softcap, logit_scale,
                num_items_in_batch, reduction, chunk_size):
        N, H = hidden.shape
        opts = dict(ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale)
        idx = (labels != ignore_index).nonzero().squeeze(1)
        n_valid = idx.numel()
        if n_valid == N:
            idx, hv, yv = None, hidden, labels
        else:
            hv, yv = hidden.index_select(0, idx), labels.index_select(0, idx)
        want_h, want_w, _, want_b = ctx.needs_input_grad[:4]
        want_b = want_b and bias is not None
        cdt = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        chunk = chunk_size or default_chunk_rows(max(n_valid, 1), weight.shape[0], cdt.itemsize)
        now = reduction != "none"
        loss_v, gh, gw, gb = _chunked(hv, yv, weight, bias, opts, chunk,
                                      want_h and now, want_w and now, want_b and now)
        loss_rows = _scatter_rows(loss_v, idx, N)
        norm = None
        if reduction == "mean":
            norm = normaliser(labels, ignore_index, num_items_in_batch, hidden.device)
            out = loss_rows.sum() / norm
        elif reduction == "sum":
            out = loss_rows.sum()
        else:
            out = loss_rows
        ctx.meta = (N, hidden.dtype, weight.dtype, None if bias is None else bias.dtype, reduction, opts, chunk)
        if now:
            ctx.save_for_backward(gh, gw, gb, norm, idx)
        else:
            ctx.save_for_backward(hv, weight, bias, yv, idx)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        N, h_dtype, w_dtype, b_dtype, reduction, opts, chunk = ctx.meta
        want_h, want_w, _, want_b = ctx.needs_input_grad[:4]
        if reduction == "none":
            hv, weight, bias, yv, idx = ctx.saved_tensors
            row_scale = grad_out.reshape(-1).float()
            if idx is not None:
                row_scale = row_scale.index_select(0, idx)
            want_b = want_b and bias is not None
            _, gh, gw, gb = _chunked(hv, yv, weight, bias, opts, chunk, want_h, want_w, want_b, row_scale)
            g = torch.ones((), dtype=torch.float32, device=grad_out.device)
        else:
            gh, gw, gb, norm, idx = ctx.saved_tensors
            g = grad_out.float() / norm if reduction == "mean" else grad_out.float()
        grad_h = _scatter_rows(_scaled(gh, g, h_dtype), idx, N) if want_h else None
        grad_w = _scaled(gw, g, w_dtype) if want_w else None
        grad_b = _scaled(gb, g, b_dtype) if want_b and gb is not None else None
        return grad_h, grad_w, None, grad_b, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None,
                               logit_scale=None, num_items_in_batch=None, reduction="mean", chunk_size=None):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, chunked over tokens.

    hidden [N, H] or [B, S, H]; weight [V, H] (the lm_head); labels [N] or [B, S]
    (already shifted). Same options and normaliser as ``cross_entropy``; ``chunk_size``
    overrides the rows per chunk (default: a chunk's logits stay under CHUNK_BYTES).
    Loss in fp32; gradients in each input's dtype. Works on any device: the chunked
    matmuls are PyTorch's, the loss kernel dispatches like ``cross_entropy``.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ConfigError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree: "
                          "expected hidden [..., H] and weight [V, H] (the lm_head weight)")
    if hidden.shape[:-1].numel() != labels.numel():
        raise ConfigError(f"hidden {tuple(hidden.shape)} has {hidden.shape[:-1].numel()} tokens but labels "
                          f"{tuple(labels.shape)} has {labels.numel()}: shift and flatten them alike")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ConfigError(f"bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive int (or None), got {chunk_size!r}")
    check_options(labels, weight.shape[0], ignore_index, softcap, logit_scale, num_items_in_batch, reduction)
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
        h = h.to(weight.dtype)
    y = labels.reshape(-1).contiguous()
    out = FusedLinearCrossEntropyFunction.apply(h, weight, y, bias, ignore_index, softcap, logit_scale,
                                                num_items_in_batch, reduction, chunk_size)
    return out.view(labels.shape) if reduction == "none" else out


def fused_linear_cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None,
                                         logit_scale=None, num_items_in_batch=None, reduction="mean"):
    """Plain F.linear + log_softmax + nll in the inputs' dtype (pass float64 for a reference)."""
    from .cross_entropy import cross_entropy_reference
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    out = cross_entropy_reference(logits, labels.reshape(-1), ignore_index, softcap, logit_scale,
                                  num_items_in_batch, reduction)
    return out.view(labels.shape) if reduction == "none" else out
