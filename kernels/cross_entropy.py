"""Cross-entropy over a large vocabulary, one row per program, the vocabulary in chunks.

Each Triton program owns one token row and walks the vocabulary in BLOCK-wide chunks
with an online logsumexp (running max + rescaled running sum), so a row of 128,256 or
256,000 logits never has to fit in registers and nothing of size [N, V] is allocated
in fp32. The same kernel, with COMPUTE_GRAD, writes

    dlogits = scale_row * (softmax(z) - onehot(label)) * dz/dx,
    z = c * tanh(s * x / c)  (softcap c, logit_scale s; either may be absent),

in a second pass over the row, optionally into the logits buffer itself (the fused
linear cross-entropy uses this on each chunk of logits it makes).

In-place backward. ``cross_entropy`` writes dlogits over the saved logits when that is
safe, which saves an [N, V] allocation: the logits must be an intermediate result of
the autograd graph (their storage has a grad_fn, not a user-made leaf or a view of
one) and must not overlap in memory. Afterwards the logits hold gradients, so the
caller must not read them after backward; any other autograd node that saved the same
tensor fails loudly (its version counter is bumped) instead of silently using
gradients as logits. ``inplace_backward=False`` always allocates a fresh gradient.

Normaliser (reduction="mean"): the count of non-ignored labels in this call, or
``num_items_in_batch`` when given: the non-ignored tokens across all micro-batches of
one optimizer step, so that the accumulated gradient equals the full-batch one. With
no external normaliser an all-ignored batch gives loss 0 and zero gradients.
"""
import torch
import triton
import triton.language as tl

from ._utils import fast_launch, next_power_of_2, tanh, use_triton
from ..errors import ConfigError, DatasetError

MAX_BLOCK = 16384  # vocabulary chunk one program handles per loop step
TORCH_CHUNK_BYTES = 64 << 20  # fp32 working set of the PyTorch path per chunk of rows
REDUCTIONS = ("mean", "sum", "none")


@fast_launch
@triton.jit
def _ce_kernel(
    logits_ptr, logits_stride, labels_ptr, loss_ptr, lse_ptr, grad_ptr, grad_stride,
    scale_ptr, scale_stride, V, ignore_index, softcap, logit_scale,
    HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
    COMPUTE_LSE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    grad_ptr += row * grad_stride
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)

    if label == ignore_index:
        if COMPUTE_LSE:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK):
                offs = start + cols
                tl.store(grad_ptr + offs, tl.zeros([BLOCK], tl.float32).to(grad_ptr.dtype.element_ty),
                         mask=offs < V)
        return

    if COMPUTE_LSE:
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                z = z * logit_scale
            if HAS_SOFTCAP:
                z = softcap * tanh(z / softcap)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        z_label = tl.load(logits_ptr + label).to(tl.float32)
        if HAS_SCALE:
            z_label = z_label * logit_scale
        if HAS_SOFTCAP:
            z_label = softcap * tanh(z_label / softcap)
        tl.store(loss_ptr + row, lse - z_label)
        tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)

    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            y = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                y = y * logit_scale
            if HAS_SOFTCAP:
                t = tanh(y / softcap)
                z = softcap * t
            else:
                z = y
            g = tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            if HAS_SCALE:
                g = g * logit_scale
            g = g * scale
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _transform(x, softcap, logit_scale):
    if logit_scale is not None:
        x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x


def _rows_torch(logits, labels, loss, lse, grad, scale, ignore_index, softcap, logit_scale, compute_lse):
    """The kernel's work in PyTorch, a chunk of rows at a time (fp32 working set bounded)."""
    n, V = logits.shape
    cdt = torch.promote_types(logits.dtype, torch.float32)
    rows = max(1, TORCH_CHUNK_BYTES // (4 * V))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        y = labels[s:e]
        valid = y != ignore_index
        safe = torch.where(valid, y, 0).unsqueeze(1)
        x = logits[s:e].to(cdt)
        if logit_scale is not None:
            x = x * logit_scale
        t = torch.tanh(x / softcap) if softcap is not None else None
        z = softcap * t if softcap is not None else x
        if compute_lse:
            lse_c = torch.logsumexp(z, dim=1)
            loss[s:e] = torch.where(valid, lse_c - z.gather(1, safe).squeeze(1), 0.0)
            lse[s:e] = torch.where(valid, lse_c, 0.0)
        else:
            lse_c = lse[s:e].to(cdt)
        if grad is not None:
            g = torch.exp(z - lse_c.unsqueeze(1))
            g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
            if softcap is not None:
                g *= 1.0 - t * t
            if logit_scale is not None:
                g *= logit_scale
            sc = (scale[s:e] if scale.dim() == 1 else scale).to(cdt).expand(e - s)
            g *= torch.where(valid, sc, 0.0).unsqueeze(1)
            grad[s:e].copy_(g)


def ce_rows(logits, labels, *, ignore_index=-100, softcap=None, logit_scale=None,
            lse=None, grad=None, grad_scale=None):
    """Row losses and logsumexps of ``logits`` [n, V]; with ``grad`` also write dlogits.

    ``lse`` given: skip the logsumexp pass and use it (backward). ``grad`` may be
    ``logits`` itself (in place). ``grad_scale``: fp32 0-d or [n] tensor multiplying each
    row's gradient. Returns (loss [n] fp32, lse [n] fp32); the loss is None when ``lse``
    was given. Labels must be in [0, V) or ``ignore_index`` (checked by the faces).
    """
    n, V = logits.shape
    compute_lse = lse is None
    if compute_lse:
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    else:
        loss = None
    if grad is not None and grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    if not use_triton(logits):
        _rows_torch(logits, labels, loss, lse, grad, grad_scale, ignore_index, softcap, logit_scale, compute_lse)
        return loss, lse
    assert logits.stride(1) == 1 and (grad is None or grad.stride(1) == 1)
    block = min(next_power_of_2(V), MAX_BLOCK)
    num_warps = 16 if block >= 8192 else (8 if block >= 2048 else 4)
    g = grad if grad is not None else logits
    sc = grad_scale if grad_scale is not None else lse
    _ce_kernel[(n,)](
        logits, logits.stride(0), labels, loss if loss is not None else lse, lse, g, g.stride(0),
        sc, (sc.stride(0) if sc.dim() == 1 else 0), V, ignore_index,
        float(softcap) if softcap is not None else 1.0,
        float(logit_scale) if logit_scale is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_SCALE=logit_scale is not None,
        COMPUTE_LSE=compute_lse, COMPUTE_GRAD=grad is not None, BLOCK=block, num_warps=num_warps,
    )
    return loss, lse


def check_options(labels, V, ignore_index, softcap, logit_scale, num_items_in_batch, reduction):
    """Validate the shared options; one host sync for the label range check."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if softcap is not None and not softcap > 0:
        raise ConfigError(f"softcap must be a positive number (or None), got {softcap}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ConfigError("num_items_in_batch is the normaliser of reduction='mean'; "
                          f"drop it or use reduction='mean' (got reduction={reduction!r})")
    if isinstance(num_items_in_batch, (int, float)) and num_items_in_batch <= 0:
        raise ConfigError(f"num_items_in_batch must be positive, got {num_items_in_batch}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DatasetError(f"labels must be integer token ids, got dtype {labels.dtype}")
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if labels.numel() and bool(bad.any()):
        first = int(labels[bad][0])
        raise DatasetError(
            f"label {first} is outside the vocabulary [0, {V}) and is not ignore_index={ignore_index}: "
            "the tokenizer and the model's vocabulary disagree (resize the embeddings) or "
            "padding was not masked with ignore_index")


def normaliser(labels, ignore_index, num_items_in_batch, device):
    """Divisor of reduction='mean' as an fp32 0-d tensor (no host sync)."""
    if num_items_in_batch is None:
        return (labels != ignore_index).sum().clamp_(min=1).to(torch.float32)
    return torch.as_tensor(num_items_in_batch).to(device=device, dtype=torch.float32)


def _inplace_safe(logits):
    base = logits._base if logits._base is not None else logits
    overlapping = logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]
    return base.grad_fn is not None and not overlapping


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, softcap, logit_scale, num_items_in_batch, reduction, inplace):
        loss_rows, lse = ce_rows(logits, labels, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale)
        if reduction == "none":
            out, norm = loss_rows, None
        elif reduction == "sum":
            out, norm = loss_rows.sum(), None
        else:
            norm = normaliser(labels, ignore_index, num_items_in_batch, logits.device)
            out = loss_rows.sum() / norm
        ctx.save_for_backward(logits, labels, lse, norm)
        ctx.options = (ignore_index, softcap, logit_scale, reduction, inplace)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse, norm = ctx.saved_tensors
        ignore_index, softcap, logit_scale, reduction, inplace = ctx.options
        scale = grad_out.float()
        if reduction == "mean":
            scale = scale / norm
        elif reduction == "none":
            scale = scale.contiguous()
        grad = logits if inplace else torch.empty_like(logits)
        ce_rows(logits, labels, ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale,
                lse=lse, grad=grad, grad_scale=scale)
        if inplace:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None, None


def cross_entropy(logits, labels, ignore_index=-100, softcap=None, logit_scale=None,
                  num_items_in_batch=None, reduction="mean", *, inplace_backward=None):
    """Cross-entropy of ``logits`` [N, V] (or [..., V]) against ``labels`` [N] (or [...]).

    Loss in fp32 whatever the logits' dtype; gradient in the logits' dtype. ``softcap``:
    ``c * tanh(z / c)`` (Gemma); ``logit_scale`` multiplies logits first (Cohere).
    ``num_items_in_batch`` (int or 0-d tensor) replaces the count of non-ignored labels
    as the mean's divisor. ``inplace_backward``: None decides (see the module docstring),
    True/False forces. reduction="none" returns per-token losses shaped like ``labels``.
    """
    V = logits.shape[-1]
    if logits.shape[:-1] != labels.shape:
        raise ConfigError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                          "expected logits [..., V] and labels [...] (did you forget to shift?)")
    check_options(labels, V, ignore_index, softcap, logit_scale, num_items_in_batch, reduction)
    x = logits.reshape(-1, V)
    y = labels.reshape(-1)
    copied = x.stride(-1) != 1 or (x.shape[0] > 1 and x.stride(0) < V)
    if copied:
        x = x.contiguous()  # our own copy: always safe to overwrite
    if inplace_backward is None:
        inplace_backward = copied or _inplace_safe(x)
    out = CrossEntropyFunction.apply(x, y, ignore_index, softcap, logit_scale, num_items_in_batch,
                                     reduction, bool(inplace_backward))
    return out.view(labels.shape) if reduction == "none" else out


def cross_entropy_reference(logits, labels, ignore_index=-100, softcap=None, logit_scale=None,
                            num_items_in_batch=None, reduction="mean"):
    """Plain log_softmax + nll in the logits' dtype (pass float64 for a reference)."""
    z = _transform(logits.reshape(-1, logits.shape[-1]), softcap, logit_scale)
    y = labels.reshape(-1)
    per_token = torch.nn.functional.cross_entropy(z, y, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return per_token.view(labels.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        return total / (y != ignore_index).sum().clamp(min=1)
    return total / num_items_in_batch
