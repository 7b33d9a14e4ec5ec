"""GGUF export: readable by gguf's reader and by transformers' GGUF loader, with matching logits."""
import gguf
import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, logits, tiny_base, tiny_lora

from slothnb.errors import ConfigError
from slothnb.saving import save_pretrained_gguf
from slothnb.saving.gguf_export import permute_for_rope

TEXT = "The quick sloth, 123 jumps!<|im_end|>  over GGUF files\n"
# max |logits - merged| / max |merged|: the storage type's rounding, amplified through two layers.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 1e-1}


@pytest.fixture(scope="module")
def llama_lora(tokenizer):
    return tiny_lora(tokenizer, arch="llama")


def _field(reader, key):
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def test_reader_sees_metadata_tokenizer_and_tensors(tmp_path, tokenizer, llama_lora):
    path = save_pretrained_gguf(llama_lora, tmp_path, tokenizer, "f16")
    reader = gguf.GGUFReader(str(path))
    config = llama_lora.get_base_model().config
    expected = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
        "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.context_length": 256, "llama.rope.dimension_count": 16, "llama.vocab_size": len(tokenizer),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.chat_template": CHAT_TEMPLATE,
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_token_id, "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert len(_field(reader, "tokenizer.ggml.merges")) > 100

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * 9  # embd, output_norm, output + 9 per block
    assert tensors["blk.1.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # gguf lists shapes innermost-first: attn_k is [hidden, kv_heads * head_dim]
    assert list(tensors["blk.1.attn_k.weight"].shape) == [64, 32]
    # v_proj is not permuted, so it is the merged weight itself
    merged_v = llama_lora.base_model.model.model.layers[0].self_attn.v_proj
    expected_v = merged_v.base_layer.weight + merged_v.get_delta_weight("default")
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight"].data, expected_v.detach().half().numpy())


@pytest.mark.parametrize("method", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_gguf_loader_matches_merged_logits(tmp_path, tokenizer, llama_lora, sample_ids, method):
    path = save_pretrained_gguf(llama_lora, tmp_path, tokenizer, method)
    assert path.name == f"model.{method.upper()}.gguf"
    expected = logits(llama_lora, sample_ids)
    error = (logits(_load(path), sample_ids) - expected).abs().max() / expected.abs().max()
    assert error <= TOLERANCE[method], (method, error)


def test_q8_0_weights_quantised_blockwise(tmp_path, tokenizer, llama_lora):
    path = save_pretrained_gguf(llama_lora, tmp_path, tokenizer, "q8_0")
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    layer = llama_lora.base_model.model.model.layers[0].mlp.down_proj
    exact = (layer.base_layer.weight + layer.get_delta_weight("default")).detach().numpy()
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # Q8_0: 32 values share one scale = block max / 127, stored in fp16: each is off by about half a step.
    step = np.abs(exact.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(values.reshape(-1, 32) - exact.reshape(-1, 32)) <= 0.6 * step)


def test_tokenizer_and_chat_template_roundtrip(tmp_path, tokenizer, llama_lora):
    from transformers import AutoTokenizer

    path = save_pretrained_gguf(llama_lora, tmp_path, tokenizer, "f16")
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert reloaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert reloaded.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    messages = [{"role": "user", "content": "hi sloth"}, {"role": "assistant", "content": "hello"}]
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert reloaded.eos_token == "<|im_end|>" and reloaded.bos_token == "<|im_start|>"


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_load_with_matching_logits(tmp_path, tokenizer, sample_ids, arch):
    model = tiny_lora(tokenizer, arch=arch)
    path = save_pretrained_gguf(model, tmp_path, tokenizer, "f32")
    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "general.architecture") == {"qwen2": "qwen2", "mistral": "llama"}[arch]
    if arch == "qwen2":  # Qwen2 keeps its q/k/v biases
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= {t.name for t in reader.tensors}
    expected = logits(model, sample_ids)
    torch.testing.assert_close(logits(_load(path), sample_ids), expected, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_write_no_output_tensor(tmp_path, tokenizer, sample_ids):
    model = tiny_lora(tokenizer, tie=True)
    path = save_pretrained_gguf(model, tmp_path, tokenizer, "f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    torch.testing.assert_close(logits(_load(path), sample_ids), logits(model, sample_ids), rtol=1e-4, atol=1e-4)


def test_rope_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = permute_for_rope(weight, 8)
    assert not np.array_equal(permuted, weight)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 8})
    np.testing.assert_array_equal(undo.process(permuted, "blk.0.attn_q.weight").weights, weight)


def test_errors_name_the_valid_choices(tmp_path, tokenizer, llama_lora):
    with pytest.raises(ConfigError, match="f16, bf16, q8_0, f32"):
        save_pretrained_gguf(llama_lora, tmp_path, tokenizer, "q4_k_m")
    with pytest.raises(ConfigError, match="tokenizer"):
        save_pretrained_gguf(llama_lora, tmp_path, None)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(ConfigError, match="'gpt2'.*llama, mistral, qwen2"):
        save_pretrained_gguf(gpt2, tmp_path, tokenizer)


def test_slothnb_loads_its_own_gguf_export_without_losing_precision(tmp_path, tokenizer, llama_lora, sample_ids,
                                                                     monkeypatch):
    """An exported f32 GGUF loads back through FastLanguageModel (converted to a cached safetensors
    folder) with the LoRA model's logits: the conversion must keep the file's precision."""
    from slothnb import FastLanguageModel

    monkeypatch.setenv("SLOTHNB_CACHE", str(tmp_path / "cache"))
    path = save_pretrained_gguf(llama_lora, tmp_path / "gguf", tokenizer, quantization_method="f32")
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=64, patch=False)
    assert model.dtype == torch.float32
    expected = logits(llama_lora, sample_ids)
    torch.testing.assert_close(logits(model, sample_ids), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_cached_conversions_are_reused_and_pruned(tmp_path, monkeypatch, tokenizer, llama_lora, sample_ids):
    """A reload reuses its conversion; a changed, deleted or least-recently-used source's is removed."""
    import os

    from slothnb.models import default_model

    monkeypatch.setenv("SLOTHNB_CACHE", str(tmp_path / "cache"))
    default_folder = default_model.models_cache() / default_model.DEFAULT_FOLDER
    default_folder.mkdir(parents=True)  # never pruned
    exported = save_pretrained_gguf(llama_lora, tmp_path / "a", tokenizer, "f32")
    first = default_model.convert_gguf(exported)
    assert first.parent == default_model.models_cache() and default_model.is_converted(first)
    torch.testing.assert_close(logits(_load_folder(first), sample_ids), logits(llama_lora, sample_ids), rtol=1e-4, atol=1e-4)
    with monkeypatch.context() as patched:
        patched.setattr(default_model, "load_gguf", lambda *a, **k: pytest.fail("reconverted"))
        assert default_model.convert_gguf(exported) == first

    copies = []
    for name in "bcd":  # three more sources; with keep=2 only the two newest conversions stay
        copies.append(tmp_path / name / exported.name)
        copies[-1].parent.mkdir()
        copies[-1].write_bytes(exported.read_bytes())
    os.utime(exported, ns=(0, 0))  # `first`'s source changed: its key can never hit again
    monkeypatch.setattr(default_model, "GGUF_CACHE_KEEP", 2)
    folders = [default_model.convert_gguf(path) for path in copies]
    kept = sorted(default_model.models_cache().glob("gguf-*"))
    assert kept == sorted(folders[1:]) and not first.exists() and default_folder.is_dir()
    copies[2].unlink()  # a deleted source's conversion goes at the next prune
    assert default_model.prune_conversions(keep=5) == [folders[2]] and folders[1].is_dir()


def _load_folder(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()
