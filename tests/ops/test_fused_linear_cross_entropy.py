"""fused_linear_cross_entropy vs float64 F.linear + log_softmax + nll, every gradient."""
import pytest
import torch

import slothnb.kernels.cross_entropy as ce_mod
import slothnb.kernels.fused_linear_cross_entropy as flce_mod
from slothnb.errors import ConfigError, DatasetError
from slothnb.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy, fused_linear_cross_entropy_reference)

ATOL = dict(rtol=1e-5, atol=1e-6)


def make(n, h, v, dtype=torch.float32, ignored=(1,), seed=0, device="cpu", bias=True):
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU there: a 256k x 2304 head is 590M values
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) / h ** 0.5 * 3).to(dtype)
    b = (torch.randn(v, generator=g, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    for i in ignored:
        if i < n:
            labels[i] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, dtype=None, **kw):
    """(loss, grad_hidden, grad_weight, grad_bias); 'none' losses are weighted unevenly before summing."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
    total = loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 2, loss.numel()).view(loss.shape)).sum()
    total.backward()
    return (loss.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def assert_all_close(got, ref, **tol):
    for a, b in zip(got, ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a.double(), b, **(tol or ATOL))


@pytest.mark.parametrize("softcap,logit_scale", [(None, None), (30.0, None), (3.0, 0.5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(softcap, logit_scale, reduction, bias):
    hidden, weight, b, labels = make(9, 17, 301, ignored=(1, 5), bias=bias)
    kw = dict(softcap=softcap, logit_scale=logit_scale, reduction=reduction)
    got = run(fused_linear_cross_entropy, hidden, weight, b, labels, chunk_size=4, **kw)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, b, labels, dtype=torch.float64, **kw)
    assert all(g.dtype == torch.float32 for g in got if g is not None)
    assert_all_close(got, ref)
    assert torch.all(got[1][1] == 0) and torch.all(got[1][5] == 0)


def test_pytorch_path_and_default_chunking(monkeypatch):
    monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
    hidden, weight, b, labels = make(12, 8, 257, ignored=(3,))
    got = run(fused_linear_cross_entropy, hidden, weight, b, labels, softcap=5.0)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, b, labels, dtype=torch.float64, softcap=5.0)
    assert_all_close(got, ref)


def test_batched_non_contiguous_inputs():
    hidden, weight, b, labels = make(2 * 7, 11, 129, ignored=(0, 9), bias=False)
    hidden3 = hidden.view(7, 2, 11).transpose(0, 1)  # [B=2, S=7, H]: non-contiguous
    weight_t = weight.t().contiguous().t()  # [V, H] view of an [H, V] buffer (e.g. tied embeddings)
    labels2 = labels.view(7, 2).t()
    got = run(fused_linear_cross_entropy, hidden3, weight_t, None, labels2, reduction="none")
    ref = run(fused_linear_cross_entropy_reference, hidden3, weight_t, None, labels2, dtype=torch.float64,
              reduction="none")
    assert got[0].shape == (2, 7) and got[1].shape == (2, 7, 11)
    assert_all_close(got, ref)


@pytest.mark.parametrize("n,h,v", [(1, 257, 32003), (2, 257, 32003), (3, 4097, 61)])
def test_odd_sizes(n, h, v):
    hidden, weight, b, labels = make(n, h, v, ignored=())
    got = run(fused_linear_cross_entropy, hidden, weight, b, labels)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, b, labels, dtype=torch.float64)
    assert_all_close(got, ref)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_with_external_normaliser_sum_to_full_batch(as_tensor):
    hidden, weight, b, labels = make(10, 13, 211, ignored=(0, 1, 2, 7))
    full = run(fused_linear_cross_entropy, hidden, weight, b, labels, chunk_size=3)
    n_items = int((labels != -100).sum())
    n_items = torch.tensor(n_items) if as_tensor else n_items
    parts = [run(fused_linear_cross_entropy, hidden[s], weight, b, labels[s], num_items_in_batch=n_items)
             for s in (slice(0, 4), slice(4, 10))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full[1], rtol=1e-5, atol=1e-8)
    # weight and bias gradients: sums over the tokens in another grouping, so an element near zero
    # (terms that cancel) differs by fp32 rounding of the terms, not of the result (~2e-7 of the
    # largest element, on some CPUs' BLAS): the absolute tolerance follows the gradient's scale
    for i in (2, 3):
        torch.testing.assert_close(parts[0][i] + parts[1][i], full[i], rtol=1e-5,
                                   atol=4e-6 * full[i].abs().max().item())


def test_ignored_tokens_cost_no_matmul(monkeypatch):
    rows_seen = []
    real = flce_mod.ce_rows
    monkeypatch.setattr(flce_mod, "ce_rows", lambda logits, *a, **k: rows_seen.append(logits.shape[0]) or
                        real(logits, *a, **k))
    hidden, weight, b, labels = make(12, 8, 97, ignored=range(0, 12, 2))
    got = run(fused_linear_cross_entropy, hidden, weight, b, labels, chunk_size=2)
    assert sum(rows_seen) == 6 and max(rows_seen) <= 2  # only the 6 kept tokens, never more than a chunk
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, b, labels, dtype=torch.float64)
    assert_all_close(got, ref)


def test_default_chunk_keeps_logits_under_budget():
    for n, v, size in [(8192, 128256, 2), (16384, 256000, 2), (3, 32003, 4), (100000, 49152, 2)]:
        rows = flce_mod.default_chunk_rows(n, v, size)
        assert 1 <= rows <= n and rows * v * size <= flce_mod.CHUNK_BYTES
        chunks = -(-n // rows)
        assert chunks * rows - n < chunks  # balanced: no tiny last chunk


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight, b, labels = make(4, 8, 97, ignored=range(4))
    loss, gh, gw, gb = run(fused_linear_cross_entropy, hidden, weight, b, labels)
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0) and torch.all(gb == 0)


def test_frozen_weight_and_no_grad():
    hidden, weight, b, labels = make(6, 8, 97)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, labels)  # LoRA: the lm_head is frozen
    loss.backward()
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, None, labels, dtype=torch.float64)
    torch.testing.assert_close(h.grad.double(), ref[1], **ATOL)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, labels).double(), ref[0], **ATOL)


def test_bf16_inputs_and_fp32_weight_grad_accumulation():
    hidden, weight, b, labels = make(16, 32, 500, ignored=(3,))
    got = run(fused_linear_cross_entropy, hidden, weight, b, labels, dtype=torch.bfloat16, chunk_size=2)
    # the reference sees the same bf16-rounded inputs, in float64
    ref = run(fused_linear_cross_entropy_reference, hidden.bfloat16(), weight.bfloat16(), b.bfloat16(), labels,
              dtype=torch.float64)
    assert all(g.dtype == torch.bfloat16 for g in got[1:])
    torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-2, atol=1e-2)  # logits rounded to bf16
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2 * r.abs().max().item())


def test_fp16_tiny_normaliser_and_large_grad_output_do_not_underflow():
    # dlogits / 1e6 would flush to zero in fp16; the normaliser and grad_output (a GradScaler's
    # 1e6 here) are applied together in fp32 in backward, so the gradients survive.
    hidden, weight, b, labels = make(8, 16, 97, ignored=())
    h = hidden.half().requires_grad_()
    (fused_linear_cross_entropy(h, weight.half(), labels, num_items_in_batch=10**6) * 1e6).backward()
    ref_h = hidden.half().double().requires_grad_()
    (fused_linear_cross_entropy_reference(ref_h, weight.half().double(), labels, num_items_in_batch=10**6)
     * 1e6).backward()
    assert h.grad.dtype == torch.float16 and h.grad.abs().max() > 0
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=2e-2, atol=2e-2 * ref_h.grad.abs().max().item())

def test_cpu_autocast_with_fp32_weights():
    hidden, weight, b, labels = make(6, 16, 97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(fused_linear_cross_entropy, hidden, weight, b, labels)
    ref = run(fused_linear_cross_entropy_reference, hidden, weight, b, labels, dtype=torch.float64)
    assert got[2].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), ref[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1].double(), ref[1], rtol=5e-2, atol=5e-2 * ref[1].abs().max().item())


def test_bad_input_raises_actionable_errors():
    hidden, weight, b, labels = make(3, 8, 10)
    with pytest.raises(ConfigError, match="weight"):
        fused_linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ConfigError, match="tokens"):
        fused_linear_cross_entropy(hidden, weight, labels[:2])
    with pytest.raises(ConfigError, match="bias"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=b[:5])
    with pytest.raises(ConfigError, match="chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    bad = labels.clone()
    bad[1] = -1
    with pytest.raises(DatasetError, match="outside the vocabulary"):
        fused_linear_cross_entropy(hidden, weight, bad)


# ---- GPU: real sizes in half precision -------------------------------------------------------

@pytest.mark.gpu
# Llama-3 (odd hidden size: masked tails) in bf16, Gemma-2 (256k vocab) in fp16: each dtype and each
# shape once; the fp32 reference at 4096 x 256k logits is the expensive half of this test.
@pytest.mark.parametrize("dtype,vocab,hidden_size", [(torch.bfloat16, 128256, 4097), (torch.float16, 256000, 2304)])
def test_gpu_real_sizes_and_peak_memory(dtype, vocab, hidden_size):
    n = 4096
    hidden, weight, b, labels = make(n, hidden_size, vocab, dtype=dtype, ignored=range(0, n, 3), device="cuda",
                                     bias=False)
    got = run(fused_linear_cross_entropy, hidden, weight, None, labels, softcap=30.0)
    ref = run(fused_linear_cross_entropy_reference, hidden.float(), weight.float(), None, labels, softcap=30.0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-2, atol=1e-2)
    for g, r in zip(got[1:3], ref[1:3]):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=2e-2 * r.abs().max().item())
    del got, ref
    # LoRA case (frozen lm_head): the extra peak stays far below one fp32 copy of the logits.
    h = hidden.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(h, weight, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n * vocab * 4 / 6, f"extra peak {extra / 2**20:.0f} MiB"
    assert h.grad is not None and torch.isfinite(h.grad).all()
