"""FastLanguageModel facade on a tiny saved model: load hooks, mode switches, LoRA delegation."""
import pytest
import torch
from tiny_models import save_tiny_model

from slothnb import FastLanguageModel
from slothnb.models import checkpointing


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("fl") / "m")


def test_from_pretrained_runs_the_load_hooks(folder, monkeypatch):
    import slothnb.memory as memory

    patched, stages = [], []
    monkeypatch.setattr("slothnb.models.patching.patch_model", lambda m: patched.append(m) or True)
    monkeypatch.setattr(memory, "record_stage", lambda name: stages.append(name))
    model, tok = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64)
    assert patched == [model] and model._slothnb_patched and stages == ["load"]
    model2, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=64, patch=False)
    assert len(patched) == 1 and not model2._slothnb_patched


def test_real_patching_keeps_logits(folder):
    plain, _ = FastLanguageModel.from_pretrained(str(folder), patch=False)
    fast, _ = FastLanguageModel.from_pretrained(str(folder), patch=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def test_inference_and_training_switches(folder):
    model, tok = FastLanguageModel.from_pretrained(str(folder), patch=False)
    checkpointing.apply_gradient_checkpointing(model, True)
    model.train()
    FastLanguageModel.for_inference(model)
    assert not model.training and model.config.use_cache and tok.padding_side == "left"
    assert not checkpointing.is_checkpointing(model)
    FastLanguageModel.for_training(model)
    assert model.training and not model.config.use_cache and tok.padding_side == "right"
    assert checkpointing.is_checkpointing(model)
    FastLanguageModel.for_training(model, use_gradient_checkpointing=False)
    assert not checkpointing.is_checkpointing(model)


def test_get_peft_model_delegates_and_switches_work_on_peft(folder, monkeypatch):
    import slothnb.models.lora as lora

    seen = {}

    def fake(model, **kw):
        seen.update(kw)
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=kw["r"], target_modules=kw["target_modules"]))

    monkeypatch.setattr(lora, "get_peft_model", fake)
    model, tok = FastLanguageModel.from_pretrained(str(folder), max_seq_length=96, patch=False)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"], lora_alpha=8)
    assert seen["r"] == 4 and seen["lora_alpha"] == 8 and seen["max_seq_length"] == 96
    assert seen["use_gradient_checkpointing"] == "slothnb" and seen["random_state"] == 3407
    FastLanguageModel.for_training(peft_model)
    assert peft_model.training and tok.padding_side == "right"
    FastLanguageModel.for_inference(peft_model)
    assert not peft_model.training and tok.padding_side == "left"
