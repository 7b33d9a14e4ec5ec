"""GGUF export with the `gguf` package (no llama.cpp build): merge, rename, permute, quantise, write.

Follows llama.cpp's convert_hf_to_gguf.py for the supported architectures: Llama-family q/k
projections are permuted from Hugging Face's half-split rotary layout to llama.cpp's interleaved
one (transformers' GGUF loader undoes exactly this), 1-D tensors (norms, biases) stay float32, and
a tied output projection is left out (readers reuse token_embd).
"""
from pathlib import Path

import gguf
import numpy as np
import torch

from slothnb.errors import ConfigError
from slothnb.saving.gguf_tokenizer import add_tokenizer
from slothnb.saving.merged import base_model_of, merged_tensors, writable_directory

_F32, _F16, _BF16, _Q8_0 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                            gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0)
# quantization_method -> (type of 2-D weights, general.file_type)
QUANTIZATION_METHODS = {
    "f16": (_F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (_BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (_Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "f32": (_F32, gguf.LlamaFileType.ALL_F32),
}
# transformers model_type -> (llama.cpp architecture, whether q/k get the rotary permutation)
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),  # llama.cpp converts Mistral as "llama"
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}


def check_quantization_method(method):
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"Unknown quantization_method {method!r}; choose one of "
                          f"{', '.join(QUANTIZATION_METHODS)}.")


def gguf_architecture(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"GGUF export does not support architecture {model_type!r} yet; supported: "
                          f"{', '.join(ARCHITECTURES)}. Save with save_pretrained_merged and convert "
                          "with llama.cpp's convert_hf_to_gguf.py instead.")
    return ARCHITECTURES[model_type]


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half layout -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope_theta_and_scaling(config):
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", None):
        raise ConfigError(f"GGUF export does not handle rope_type {rope_type!r} yet (only default and linear).")
    return float(theta), (float(params["factor"]) if rope_type == "linear" else None)


def add_architecture_metadata(writer, config, name: str):
    head_count = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // head_count
    theta, linear_factor = _rope_theta_and_scaling(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(head_count)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or head_count)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_factor)
    if head_dim * head_count != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _encode(array: np.ndarray, weight_type):
    """(data, raw_dtype) for one tensor: 1-D stays f32; blocks that don't divide fall back to f16."""
    if array.ndim == 1 or weight_type == _F32:
        return array.astype(np.float32), None
    if weight_type == _F16:
        return array.astype(np.float16), None
    if weight_type == _Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[_Q8_0][0] != 0:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), weight_type), weight_type


def gguf_tensors(model, permute: bool, arch):
    """(gguf name, float32 numpy array) of the merged model, q/k permuted where llama.cpp expects it."""
    config = base_model_of(model).config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for hf_name, tensor in merged_tensors(model, torch.float32):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"No GGUF name for tensor {hf_name!r}; this model has modules GGUF export "
                              "does not know (a custom head?). Save with save_pretrained_merged instead.")
        array = tensor.numpy()
        if permute and ".self_attn.q_proj." in hf_name:
            array = permute_for_rope(array, n_head)
        elif permute and ".self_attn.k_proj." in hf_name:
            array = permute_for_rope(array, n_kv)
        yield gguf_name, array


def save_pretrained_gguf(model, save_directory, tokenizer, quantization_method="f16", file_name=None) -> Path:
    """Merge the adapters and write one `.gguf` file (weights, architecture, tokenizer, chat template).

    Returns the path of the file, `<save_directory>/<name>.<QUANT>.gguf` unless `file_name` is given.
    """
    check_quantization_method(quantization_method)
    if tokenizer is None:
        raise ConfigError("save_pretrained_gguf needs the tokenizer: a GGUF file carries its own vocabulary.")
    config = base_model_of(model).config
    arch, permute = gguf_architecture(config)
    directory = writable_directory(save_directory)
    # Not the bare model_type: transformers' loader would then look for a gguf-py arch "mistral".
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or "model"
    path = directory / (file_name or f"{name}.{quantization_method.upper()}.gguf")
    weight_type, file_type = QUANTIZATION_METHODS[quantization_method]

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        add_architecture_metadata(writer, config, name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        for gguf_name, array in gguf_tensors(model, permute, arch):
            data, raw_dtype = _encode(array, weight_type)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
