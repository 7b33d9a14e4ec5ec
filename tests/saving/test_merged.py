"""Adapters and merged checkpoints: what is written loads back and computes what the LoRA model computed."""
import json
import os

import pytest
import torch
from conftest import logits, tiny_base, tiny_lora
from safetensors import safe_open

from slothnb.errors import ConfigError, HardwareError
from slothnb.saving import attach_saving_methods, load_adapters, save_pretrained_merged


def _load(path, dtype=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def test_adapter_roundtrip_through_peft(tmp_path, tokenizer, sample_ids):
    from peft import PeftModel

    model = attach_saving_methods(tiny_lora(tokenizer))
    model.save_pretrained(tmp_path / "peft")  # peft's own, untouched
    model.save_pretrained_merged(tmp_path / "lora", tokenizer, save_method="lora")
    for folder in ("peft", "lora"):
        files = os.listdir(tmp_path / folder)
        assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
        reloaded = PeftModel.from_pretrained(tiny_base(tokenizer), str(tmp_path / folder)).eval()
        torch.testing.assert_close(logits(reloaded, sample_ids), logits(model, sample_ids), rtol=0, atol=0)
    again = load_adapters(tiny_base(tokenizer), tmp_path / "lora")
    torch.testing.assert_close(logits(again, sample_ids), logits(model, sample_ids), rtol=0, atol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_merged_fp32_equals_lora_and_leaves_model_alone(tmp_path, tokenizer, sample_ids, tie):
    model = tiny_lora(tokenizer, tie=tie, modules_to_save=["lm_head"] if not tie else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with model.disable_adapter():
        base_logits = logits(model, sample_ids)
    lora_logits = logits(model, sample_ids)
    assert (lora_logits - base_logits).abs().max() > 0.1  # the adapters matter, so a lost merge shows

    save_pretrained_merged(model, tmp_path, tokenizer, save_method="merged_16bit")
    merged = _load(tmp_path)
    torch.testing.assert_close(logits(merged, sample_ids), lora_logits, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, sample_ids), lora_logits, rtol=0, atol=0)

    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is tie
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in f.keys())
    assert (tmp_path / "tokenizer.json").exists()


def test_trained_embedding_with_tied_head_is_untied(tmp_path, tokenizer, sample_ids):
    """LoRA on a tied embedding changes the input side only; the merged model must keep the head raw."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_base(tokenizer, tie=True), LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)).eval()
    save_pretrained_merged(model, tmp_path, tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(_load(tmp_path), sample_ids), logits(model, sample_ids), rtol=1e-5, atol=1e-5)


def test_merged_bf16_within_bf16_tolerance_and_sharded(tmp_path, tokenizer, sample_ids):
    model = tiny_lora(tokenizer, dtype=torch.bfloat16)
    save_pretrained_merged(model, tmp_path, tokenizer, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    merged = _load(tmp_path)
    assert merged.dtype == torch.bfloat16
    expected = logits(model, sample_ids)
    # bf16 keeps 8 bits of mantissa; merging rounds W + BA once instead of keeping the sum in fp32.
    assert (logits(merged, sample_ids) - expected).abs().max() <= 0.05 * expected.abs().max()


def test_bad_save_method_and_unwritable_directory(tmp_path, tokenizer):
    model = tiny_lora(tokenizer)
    with pytest.raises(ConfigError, match="lora, merged_16bit, merged_4bit"):
        save_pretrained_merged(model, tmp_path, tokenizer, save_method="merged_8bit")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="Cannot write to"):
        save_pretrained_merged(model, blocker / "out", tokenizer)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_pretrained_merged(tiny_base(tokenizer), tmp_path / "x", tokenizer, save_method="lora")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_merged_4bit_needs_cuda(tmp_path, tokenizer):
    with pytest.raises(HardwareError, match="CUDA"):
        save_pretrained_merged(tiny_lora(tokenizer), tmp_path, tokenizer, save_method="merged_4bit")


def _qlora(tokenizer, tmp_path):
    """A 4-bit base (saved and reloaded through bitsandbytes) with non-zero LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_base(tokenizer, dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map={"": 0})
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()
    return model


@pytest.mark.gpu
def test_qlora_merged_16bit_dequantizes_the_base(tmp_path, tokenizer, sample_ids):
    model = _qlora(tokenizer, tmp_path)
    ids = sample_ids.cuda()
    save_pretrained_merged(model, tmp_path / "merged", tokenizer)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = _load(tmp_path / "merged").cuda()
    assert merged.dtype == torch.bfloat16
    expected = logits(model, ids)
    assert (logits(merged, ids) - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.gpu
def test_qlora_merged_4bit_reloads_quantized(tmp_path, tokenizer, sample_ids):
    model = _qlora(tokenizer, tmp_path)
    ids = sample_ids.cuda()
    save_pretrained_merged(model, tmp_path / "q4", tokenizer, save_method="merged_4bit")
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q4"), device_map={"": 0}).eval()
    expected = logits(model, ids)
    # The reference for "merged_4bit" is the merged 16-bit checkpoint quantised to NF4 by
    # transformers itself: the two must agree closely. Against the LoRA model itself only the
    # NF4 rounding error of a tiny random model remains (a sizeable share of its small logits).
    save_pretrained_merged(model, tmp_path / "m16", tokenizer, save_method="merged_16bit")
    from transformers import BitsAndBytesConfig

    requantised = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "m16"), device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16)).eval()
    got, ref4 = logits(reloaded, ids), logits(requantised, ids)
    assert (got - ref4).abs().max() <= 0.02 * ref4.abs().max()
    assert (got - expected).abs().max() <= 0.3 * expected.abs().max()
