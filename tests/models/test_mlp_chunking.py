"""Patched MLPs above SLOTHNB_MLP_CHUNK_TOKENS run in token chunks and give the unchunked numbers.

The chunk is forced to 5 tokens over 17 (2 x 17 = 34 for the whole-model test); fp32 on CPU.
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from slothnb.models.arch import common
from slothnb.models.patching import patch_model
from tiny_models import tiny_model

TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(arch, dropout=0.0):
    model = tiny_model(arch, seed=0)
    assert patch_model(model)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                     target_modules=TARGETS.get(arch, SEVEN))
    torch.manual_seed(3)
    return get_peft_model(model, cfg).train()


def loss_and_grads(model, chunk, monkeypatch):
    monkeypatch.setattr(common, "MLP_CHUNK_TOKENS", chunk)
    ids = torch.randint(8, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3"])  # SwiGLU, GeGLU, fused gate_up
def test_fused_path_chunked_matches_unchunked(arch, monkeypatch):
    model = lora_model(arch)
    calls = []
    real = common.token_chunked
    monkeypatch.setattr(common, "token_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref_loss, ref = loss_and_grads(model, 10**9, monkeypatch)
    assert not calls
    loss, got = loss_and_grads(model, 5, monkeypatch)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys() and any("gate" in n for n in got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_generic_path_with_dropout_replays_the_masks(arch, monkeypatch):
    """LoRA dropout > 0 is the generic (module) path; the backward recompute must draw the forward's
    masks. Reference: the unpatched-size MLP called chunk by chunk from the same seed."""
    model = lora_model(arch, dropout=0.3)
    mlp = model.get_base_model().model.layers[0].mlp
    hidden = model.config.hidden_size
    x = torch.randn(1, 17, hidden, generator=torch.Generator().manual_seed(2)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    params = [p for p in mlp.parameters() if p.requires_grad]
    dy = torch.randn(1, 17, hidden, generator=torch.Generator().manual_seed(4))

    torch.manual_seed(7)
    want = torch.cat([common._mlp(mlp, x_ref[0, s:s + 5]) for s in range(0, 17, 5)])[None]
    want.backward(dy)
    ref_grads = [p.grad.clone() for p in params]
    mlp.zero_grad(set_to_none=True)

    monkeypatch.setattr(common, "MLP_CHUNK_TOKENS", 5)
    torch.manual_seed(7)
    got = mlp(x)
    assert type(got.grad_fn).__name__ == "TokenChunkedFunctionBackward"
    torch.manual_seed(99)  # the recompute restores the forward's RNG state by itself
    got.backward(dy)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for p, ref in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # dropout really bites, or the test above could not fail
        assert not torch.allclose(common._mlp(copy.deepcopy(mlp).eval(), x), got)
