"""A checkpoint's recompute skips the MLP's down projection where the layer only adds the MLP output
to the residual (every supported decoder but Gemma-2), and the gradients stay bit-identical."""
import pytest
import torch

from checkpoint_checks import checkpointed_lora_model as _lora_model
from checkpoint_checks import loss_and_grads as _loss_and_grads
from checkpoint_checks import spy as _spy
from slothnb.kernels import lora as lora_kernels
from slothnb.kernels import lora_chunked
from slothnb.models.arch import common
from slothnb.models.checkpointing import recomputing


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
