"""cross_entropy vs a float64 log_softmax + nll reference (Triton interpreter on CPU)."""
import pytest
import torch

import slothnb.kernels.cross_entropy as ce_mod
from slothnb.errors import ConfigError, DatasetError
from slothnb.kernels import use_triton
from slothnb.kernels.cross_entropy import cross_entropy, cross_entropy_reference

OPTIONS = [(None, None), (30.0, None), (None, 0.0625), (4.0, 1.7)]  # (softcap, logit_scale)


def make(n, v, dtype=torch.float32, ignored=(1,), seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU there: 4096 x 256k is 1G values
    logits = (torch.randn(n, v, generator=g, device=device) * 4).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    for i in ignored:
        if i < n:
            labels[i] = -100
    return logits, labels


def run(logits, labels, fn, **kw):
    """Loss and d(loss)/d(logits) through a non-leaf copy (the usual in-place case)."""
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf * 1, labels, **kw)
    (loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 2, loss.numel()).view(loss.shape)).sum()).backward()
    return loss.detach(), leaf.grad


def test_kernels_run_under_triton_here():
    # Without CUDA, conftest switches the interpreter on: these tests exercise the Triton kernel.
    assert use_triton(torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("softcap,logit_scale", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(softcap, logit_scale, reduction):
    logits, labels = make(7, 1003, ignored=(1, 4))
    kw = dict(softcap=softcap, logit_scale=logit_scale, reduction=reduction)
    loss, grad = run(logits, labels, cross_entropy, **kw)
    ref_loss, ref_grad = run(logits.double(), labels, cross_entropy_reference, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[1] == 0) and torch.all(grad[4] == 0)
    if reduction == "none":
        assert loss[1] == 0 and loss[4] == 0


@pytest.mark.parametrize("softcap,logit_scale", [(None, None), (4.0, 1.7)])
def test_pytorch_path_matches_reference(monkeypatch, softcap, logit_scale):
    monkeypatch.setattr(ce_mod, "use_triton", lambda t: False)
    monkeypatch.setattr(ce_mod, "TORCH_CHUNK_BYTES", 3 * 4 * 500)  # several row chunks
    logits, labels = make(7, 500, ignored=(0, 5))
    for reduction in ("mean", "none"):
        kw = dict(softcap=softcap, logit_scale=logit_scale, reduction=reduction)
        loss, grad = run(logits, labels, cross_entropy, **kw)
        ref_loss, ref_grad = run(logits.double(), labels, cross_entropy_reference, **kw)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_bf16_logits_odd_vocab():
    logits, labels = make(3, 32003, dtype=torch.bfloat16, ignored=(2,))
    loss, grad = run(logits, labels, cross_entropy)
    ref_loss, ref_grad = run(logits.double(), labels, cross_entropy_reference)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)  # fp32 math on exact bf16 values
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-5)  # one bf16 rounding


@pytest.mark.parametrize("vocab,rows", [(128256, 2), (256000, 1)])
def test_real_vocab_sizes(vocab, rows):
    logits, labels = make(rows, vocab, ignored=())
    logits[0, 7] = 40.0  # a dominant logit far from the label
    loss, grad = run(logits, labels, cross_entropy, softcap=30.0)
    ref_loss, ref_grad = run(logits.double(), labels, cross_entropy_reference, softcap=30.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_with_external_normaliser_sum_to_full_batch(as_tensor):
    logits, labels = make(10, 301, ignored=(0, 1, 2, 7))
    full_loss, full_grad = run(logits, labels, cross_entropy)
    n_items = int((labels != -100).sum())
    n_items = torch.tensor(n_items) if as_tensor else n_items
    parts = [run(logits[s], labels[s], cross_entropy, num_items_in_batch=n_items) for s in (slice(0, 4), slice(4, 10))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, rtol=1e-6, atol=1e-9)
    # (each micro-batch's own mean would instead weight its 1 token like the other's 5)
    ref = cross_entropy_reference(logits.double(), labels, num_items_in_batch=n_items)
    torch.testing.assert_close(full_loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_grad():
    logits, labels = make(4, 97, ignored=range(4))
    for reduction in ("mean", "sum"):
        loss, grad = run(logits, labels, cross_entropy, reduction=reduction)
        assert loss.item() == 0.0 and torch.all(grad == 0)


def test_inplace_backward_reuses_intermediate_logits():
    logits, labels = make(5, 203)
    leaf = logits.clone().requires_grad_()
    inter = leaf * 2  # an intermediate result: its buffer is ours to overwrite in backward
    cross_entropy(inter, labels).backward()
    ref_leaf = logits.double().requires_grad_()
    cross_entropy_reference(ref_leaf * 2, labels).backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(inter.detach() * 2, leaf.grad)  # the buffer now holds dlogits


def test_leaf_logits_are_not_overwritten():
    logits, labels = make(5, 203)
    leaf = logits.clone().requires_grad_()
    cross_entropy(leaf, labels).backward()
    assert torch.equal(leaf.detach(), logits)
    inter = logits.clone().requires_grad_() * 1
    cross_entropy(inter, labels, inplace_backward=False).backward()
    assert torch.equal(inter.detach(), logits)


def test_inplace_backward_fails_loudly_when_another_node_saved_the_logits():
    logits, labels = make(3, 50)
    raw = logits.clone().requires_grad_()
    capped = torch.tanh(raw)  # tanh's backward reads its output, which we would overwrite
    with pytest.raises(RuntimeError, match="inplace"):
        cross_entropy(capped, labels).backward()


def test_batched_and_non_contiguous_logits():
    logits, labels = make(2 * 6, 129)
    logits3, labels2 = logits.view(2, 6, 129), labels.view(2, 6)
    shifted, targets = logits3[:, :-1], labels2[:, 1:]  # the usual causal-LM shift: non-contiguous
    loss, grad = run(shifted, targets, cross_entropy, reduction="none")
    ref_loss, ref_grad = run(shifted.double(), targets, cross_entropy_reference, reduction="none")
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-8)


def test_bad_input_raises_actionable_errors():
    logits, labels = make(3, 10)
    bad = labels.clone()
    bad[0] = 10
    with pytest.raises(DatasetError, match="outside the vocabulary"):
        cross_entropy(logits, bad)
    with pytest.raises(DatasetError, match="integer"):
        cross_entropy(logits, labels.float())
    with pytest.raises(ConfigError, match="reduction"):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ConfigError, match="num_items_in_batch"):
        cross_entropy(logits, labels, num_items_in_batch=4, reduction="sum")
    with pytest.raises(ConfigError, match="disagree"):
        cross_entropy(logits, labels[:2])
    with pytest.raises(ConfigError, match="softcap"):
        cross_entropy(logits, labels, softcap=0.0)


# ---- GPU: real sizes in half precision -------------------------------------------------------

@pytest.mark.gpu
# Each (dtype, softcap) is a Triton compilation: every dtype meets every vocab and every softcap once.
@pytest.mark.parametrize("dtype,vocab,softcap", [(torch.bfloat16, 128256, None), (torch.bfloat16, 256000, 30.0),
                                                 (torch.float16, 128256, 30.0), (torch.float16, 256000, None)])
def test_gpu_real_sizes(dtype, vocab, softcap):
    logits, labels = make(4096, vocab, dtype=dtype, ignored=range(0, 4096, 5), device="cuda")
    logits = logits / 2
    loss, grad = run(logits, labels, cross_entropy, softcap=softcap)
    ref_loss, ref_grad = run(logits.float(), labels, cross_entropy_reference, softcap=softcap)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert grad.dtype == dtype
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=1e-2, atol=1e-3 * scale)
