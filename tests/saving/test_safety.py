"""Only safetensors are read: pickle checkpoints are refused before anything unpickles them."""
import pytest
import torch
from conftest import tiny_base, tiny_lora
from safetensors.torch import save_file

from slothnb.errors import ConfigError, ModelNotFoundError
from slothnb.saving import assert_safetensors_only, load_adapters


def test_safetensors_accepted_pickle_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert assert_safetensors_only(tmp_path) == [tmp_path / "model.safetensors"]
    assert assert_safetensors_only(tmp_path / "model.safetensors") == [tmp_path / "model.safetensors"]
    with pytest.raises(ConfigError, match="pickle.*safe_serialization=True"):
        assert_safetensors_only(tmp_path / "pytorch_model.bin")

    only_pickle = tmp_path / "old"
    only_pickle.mkdir()
    torch.save({"w": torch.zeros(2)}, only_pickle / "adapter_model.bin")
    torch.save({"w": torch.zeros(2)}, only_pickle / "weights.pt")
    with pytest.raises(ConfigError, match=r"only pickle checkpoints \(adapter_model.bin, weights.pt\)"):
        assert_safetensors_only(only_pickle)


def test_missing_or_empty(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        assert_safetensors_only(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="No .safetensors"):
        assert_safetensors_only(tmp_path)


def test_load_adapters_refuses_a_pickled_adapter(tmp_path, tokenizer):
    model = tiny_lora(tokenizer)
    model.save_pretrained(str(tmp_path), safe_serialization=False)  # peft writes adapter_model.bin
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(ConfigError, match="pickle"):
        load_adapters(tiny_base(tokenizer), tmp_path)
