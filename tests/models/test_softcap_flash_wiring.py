"""Gemma-2's attention through the soft-capped flash kernel (the default; SLOTHNB_SOFTCAP_FLASH=0 turns it off).

The kernel itself is tested in tests/ops/test_softcap_attention.py; here: the patched model takes it
exactly where it applies (no padding, packing or cache, no dropout; sliding layers beyond their window
included) and gives the eager path's loss and gradients, and keeps transformers' masks otherwise.
"""
import pytest
import torch

from slothnb.models.arch import _ops, common
from slothnb.models.patching import patch_model
from tiny_models import tiny_model


def _gemma2(flash, monkeypatch):
    monkeypatch.setattr(common, "SOFTCAP_FLASH", flash)
    model = tiny_model("gemma2", seed=0).train()
    model.config._attn_implementation = "sdpa"  # what the loader asks for: no mask when nothing is padded
    patch_model(model)
    return model


def _loss_and_grads(model, seq=24, **kw):
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seq, windows", [
    (24, [32, None]),  # both layers: the sliding one (window 32) and the full one
    (40, [32, None]),  # longer than the window: the sliding layer's window is applied by the kernel
])
def test_flash_path_matches_the_eager_path_and_is_taken(seq, windows, monkeypatch):
    calls = []
    real = _ops.softcap_attention
    monkeypatch.setattr(_ops, "softcap_attention", lambda *a, **k: calls.append(k.get("window")) or real(*a, **k))
    loss_ref, grads_ref = _loss_and_grads(_gemma2(False, monkeypatch), seq)
    assert calls == []
    loss, grads = _loss_and_grads(_gemma2(True, monkeypatch), seq)
    assert calls == windows
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5)


def test_padding_keeps_the_eager_path(monkeypatch):
    calls = []
    monkeypatch.setattr(_ops, "softcap_attention", lambda *a, **k: calls.append(1))
    model = _gemma2(True, monkeypatch)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    _loss_and_grads(model, 40, attention_mask=mask)
    assert calls == []


def test_eager_path_applies_the_window_itself_beyond_it(monkeypatch):
    """Without the kernel, a sliding layer that gets no mask (plain causal input) still sees only its
    window: same loss and gradients as transformers' own eager Gemma-2 with its materialised masks."""
    from slothnb.models.patching import unpatch_model

    model = _gemma2(False, monkeypatch)
    loss, grads = _loss_and_grads(model, 40)
    unpatch_model(model)
    model.config._attn_implementation = "eager"  # transformers' own soft-capped path, with its masks
    ref_loss, ref = _loss_and_grads(model, 40)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", ["packed", "cache", "output_attentions", "flex"])
def test_packed_sequences_and_generation_keep_transformers_masks(extra, monkeypatch):
    from slothnb.models.arch import common as arch_common

    seen = []
    real = arch_common._plain_causal
    monkeypatch.setattr(arch_common, "_plain_causal", lambda *a: seen.append(real(*a)) or seen[-1])
    model = _gemma2(True, monkeypatch)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    if extra == "packed":  # two sequences of 20 in one row
        pos = torch.cat([torch.arange(20), torch.arange(20)])[None]
        model(input_ids=ids, labels=ids, position_ids=pos)
    elif extra == "cache":
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=True)
    elif extra == "output_attentions":  # transformers' own attention forward runs: it needs its masks
        model.config._attn_implementation = "eager"
        model(input_ids=ids, output_attentions=True)
        model.config._attn_implementation = "sdpa"
    else:  # flex / flash implementations are transformers' own forwards too
        model.config._attn_implementation = "flex_attention"
        assert not arch_common._plain_causal(model, ids, None, None, None, None, False)
        model.config._attn_implementation = "sdpa"
    assert seen == ([] if extra == "output_attentions" else [False])  # with output_attentions: not even asked
    model.train()
    model(input_ids=ids, labels=ids, position_ids=torch.arange(40)[None])
    assert seen[-1] is True
