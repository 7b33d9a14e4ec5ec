"""A checkpoint's recompute skips the MLP's down projection where the layer only adds the MLP output
to the residual (every supported decoder but Gemma-2), and the gradients stay bit-identical."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from slothnb.kernels import lora as lora_kernels
from slothnb.kernels import lora_chunked
from slothnb.models.arch import common
from slothnb.models.checkpointing import apply_gradient_checkpointing, recomputing
from slothnb.models.patching import patch_model
from tiny_models import tiny_model


def _lora_model(arch, layers=2):
    model = tiny_model(arch, seed=0, num_hidden_layers=layers).train()
    patch_model(model)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
    model = get_peft_model(model, cfg)
    apply_gradient_checkpointing(model, "slothnb")  # every layer but the last offload-checkpointed
    return model


def _loss_and_grads(model, seq=16):
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _spy(monkeypatch, cls, index):
    """Records argument ``index`` of every ``cls.forward`` call."""
    seen = []
    real = cls.forward
    monkeypatch.setattr(cls, "forward", staticmethod(lambda ctx, *a: seen.append(a[index]) or real(ctx, *a)))
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma", "phi3", "gemma2"])
def test_recompute_skips_the_down_projection_with_identical_gradients(arch, monkeypatch):
    model = _lora_model(arch)
    monkeypatch.setattr(common, "RECOMPUTE_SKIP", False)
    ref_loss, ref = _loss_and_grads(model)
    monkeypatch.setattr(common, "RECOMPUTE_SKIP", True)
    output_needed = _spy(monkeypatch, lora_kernels.LoraMLPFunction, 2)
    loss, got = _loss_and_grads(model)

    # 2 layers: 2 forwards + 1 recompute (layer 0), which skips unless Gemma-2 normalises the MLP output
    skips = 0 if arch == "gemma2" else 1
    assert output_needed.count(False) == skips and output_needed.count(True) == 3 - skips
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys() and any("down_proj.lora_A" in n for n in got)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_token_chunked_mlp_skips_its_whole_forward_in_the_recompute(monkeypatch):
    model = _lora_model("llama", layers=3)
    ref_loss, ref = _loss_and_grads(model, seq=24)  # unchunked
    monkeypatch.setattr(common, "MLP_CHUNK_TOKENS", 16)  # 48 tokens: three chunks
    out_features = _spy(monkeypatch, lora_chunked.TokenChunkedFunction, 5)
    loss, got = _loss_and_grads(model, seq=24)
    # layers 0 and 1 run their forward without grad (plain chunked loop, no node); layer 2 (kept) builds a
    # computing node; the recomputes of 0 and 1 build nodes that only allocate the output
    hidden = model.config.hidden_size
    assert out_features == [None, hidden, hidden]
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_recomputing_is_true_only_inside_the_recompute(monkeypatch):
    model = _lora_model("llama")
    states = []
    mlp = model.get_base_model().model.layers[0].mlp
    real = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x: states.append(recomputing()) or real(x))
    _loss_and_grads(model)
    assert states == [False, True] and not recomputing()
