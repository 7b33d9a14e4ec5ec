"""Loader: sources, refusals, dtype choice, 4-bit guards, RoPE scaling, name map (tiny models, CPU)."""
import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import save_tiny_model, tiny_config, tiny_model

from slothnb.errors import ConfigError, HardwareError, ModelNotFoundError
from slothnb.models import default_model, loader, name_map
from slothnb.models.loader import load_model_and_tokenizer, resolve_dtype, resolve_source
from slothnb.models.rope_scaling import apply_rope_scaling

IDS = torch.tensor([[10, 20, 30, 40, 50, 60]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "m", seed=1)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_local_folder_loads_the_saved_weights(tmp_path, arch):
    path = save_tiny_model(arch, tmp_path / arch, seed=2)
    model, tok = load_model_and_tokenizer(str(path), max_seq_length=128)
    reference = tiny_model(arch, seed=2)
    assert type(model) is type(reference) and model.dtype == torch.float32  # fp32 on CPU
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
    assert model.max_seq_length == 128 and tok.model_max_length == 128
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_pickle_only_folder_is_refused(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match="safetensors only"):
        load_model_and_tokenizer(str(tmp_path))


def test_adapter_folder_and_non_model_folder_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(ModelNotFoundError, match="LoRA adapter"):
        resolve_source(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_source(str(empty))


def test_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "download_from_hub", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source("./models/x.gguf")


def test_bogus_hub_name_offline_says_why():
    with pytest.raises(ModelNotFoundError, match="not found locally and HF_HUB_OFFLINE is set"):
        load_model_and_tokenizer("slothnb-test/definitely-not-a-model-xyz")
    with pytest.raises(ModelNotFoundError, match="hub name"):
        resolve_source("not a valid/name??")


def test_gguf_file_and_gguf_folder_are_converted(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(default_model, "convert_gguf", lambda p, folder=None: calls.append(p.name) or tmp_path)
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(tmp_path / "w.gguf")) == tmp_path
    assert resolve_source(str(tmp_path)) == tmp_path  # folder holding only a .gguf
    assert calls == ["w.gguf", "w.gguf"]


def test_dtype_choice_and_refusals(monkeypatch):
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("torch.float16", "cpu") == torch.float16
    for bad in ("float8", torch.float64, torch.float8_e4m3fn):
        with pytest.raises(HardwareError, match="not supported"):
            resolve_dtype(bad, "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert resolve_dtype(None, "cuda") == torch.float16
    with pytest.raises(HardwareError, match="Tesla T4 has no native bfloat16"):
        resolve_dtype(torch.bfloat16, "cuda")


def test_4bit_needs_bitsandbytes_and_cuda(monkeypatch, llama_dir):
    real_find_spec = loader.importlib.util.find_spec
    monkeypatch.setattr(loader.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(HardwareError, match="pip install bitsandbytes"):
        load_model_and_tokenizer(str(llama_dir), load_in_4bit=True)
    monkeypatch.setattr(loader.importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HardwareError, match="needs a CUDA GPU"):
        load_model_and_tokenizer(str(llama_dir), load_in_4bit=True)


def test_4bit_config_is_nf4_double_quant():
    cfg = loader.bnb_4bit_config(torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [0, -5, 2.5, "2048", True])
def test_bad_max_seq_length(bad, llama_dir):
    with pytest.raises(ConfigError, match="max_seq_length"):
        load_model_and_tokenizer(str(llama_dir), max_seq_length=bad)


def test_long_max_seq_length_turns_on_rope_scaling(llama_dir, caplog):
    with caplog.at_level("WARNING", logger="slothnb"):
        model, _ = load_model_and_tokenizer(str(llama_dir), max_seq_length=1024)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    assert model.config.max_position_embeddings == 1024 and model.max_seq_length == 1024
    assert any("linear RoPE scaling, factor 4" in r.message for r in caplog.records)
    assert model(torch.randint(0, 200, (1, 600))).logits.shape == (1, 600, 320)


def test_rope_scaling_keeps_llama3_and_yarn_types():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    cfg = tiny_config("llama", rope_parameters=dict(llama3))
    assert "llama3 RoPE scaling, factor 16" in apply_rope_scaling(cfg, 512)
    assert cfg.rope_parameters == {**llama3, "factor": 16.0}
    cfg = tiny_config("qwen2", rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6})
    apply_rope_scaling(cfg, 1024)
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["factor"] == 8.0
    assert cfg.rope_parameters["original_max_position_embeddings"] == 256
    cfg = tiny_config("llama")
    assert apply_rope_scaling(cfg, 256) is None and cfg.rope_parameters["rope_type"] == "default"
    cfg.rope_parameters = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [2.0]}
    with pytest.raises(ConfigError, match="longrope"):
        apply_rope_scaling(cfg, 512)


def test_name_map_round_trips():
    for sixteen, four in name_map.PAIRS:
        assert name_map.to_4bit_name(sixteen) == four and name_map.to_16bit_name(four) == sixteen
        assert name_map.is_4bit_name(four) and not name_map.is_4bit_name(sixteen)
    assert name_map.to_4bit_name("qwen/qwen2.5-7b-instruct") == "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"
    assert name_map.to_16bit_name("unsloth/Foo-7B-bnb-4bit") == "unsloth/Foo-7B"
    assert name_map.to_4bit_name("someone/unknown") == "someone/unknown"
    assert name_map.to_16bit_name("someone/unknown") == "someone/unknown"


def test_4bit_request_prefers_the_prequantised_twin(monkeypatch, tmp_path):
    asked = []

    def fake_download(name, token=None):
        asked.append(name)
        raise ModelNotFoundError(name)

    monkeypatch.setattr(loader, "download_from_hub", fake_download)
    with pytest.raises(ModelNotFoundError):
        resolve_source("meta-llama/Llama-3.1-8B-Instruct", load_in_4bit=True)
    assert asked == ["unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "meta-llama/Llama-3.1-8B-Instruct"]
    asked.clear()
    with pytest.raises(ModelNotFoundError):
        resolve_source("unsloth/mistral-7b-v0.3-bnb-4bit", load_in_4bit=False)
    assert asked == ["mistralai/Mistral-7B-v0.3"]


def test_parameter_count_takes_a_4bit_weight_by_its_real_shape():
    """The graphs' default and the load summaries count with it: packed NF4 bytes would halve an 8B model."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 8, bias=False))
    assert loader.parameter_count(model) == 64 * 32 + 32 * 8
    packed = torch.nn.Parameter(torch.zeros(32 * 8 // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([8, 32]))  # bitsandbytes' Params4bit: two to a byte
    model[1].weight = packed
    assert sum(p.numel() for p in model.parameters()) == 64 * 32 + 32 * 8 // 2
    assert loader.parameter_count(model) == 64 * 32 + 32 * 8
