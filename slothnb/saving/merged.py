"""Merging LoRA into the base weights and writing a plain transformers checkpoint.

The merge never touches the in-memory model: each layer's merged weight is built in a fresh fp32
tensor (a 4-bit base is dequantised first), cast to the output dtype, moved to the CPU and written
shard by shard, so at most one shard of merged weights lives in host memory at a time and the
model keeps training or generating afterwards exactly as before.
"""
import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from slothnb.errors import ConfigError, HardwareError
from slothnb.kernels.nf4 import dequantize_nf4

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def check_save_method(save_method):
    if save_method not in SAVE_METHODS:
        raise ConfigError(f"Unknown save_method {save_method!r}; choose one of {', '.join(SAVE_METHODS)}.")


def writable_directory(save_directory) -> Path:
    """Create `save_directory` and prove it takes a file, before any expensive merging starts."""
    path = Path(save_directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(
            f"Cannot write to {str(path)!r} ({error.strerror or error}). "
            "Pick a directory you have write permission for, with free disk space."
        ) from error
    return path


def parse_size(size) -> int:
    """'5GB' -> 5_000_000_000 (also MB/KB/GiB/MiB/KiB, or a plain number of bytes)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'.") from None


def base_model_of(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def dequantized(weight, dtype=torch.float32) -> torch.Tensor:
    """A plain tensor for `weight`, unpacking bitsandbytes 4-bit storage."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        if getattr(weight, "SCB", None) is not None or weight.dtype == torch.int8:
            raise ConfigError("8-bit (LLM.int8) bases cannot be merged; load the model in 4-bit or 16-bit.")
        return weight.detach().to(dtype, copy=True)  # a copy: the merge adds into it
    return dequantize_nf4(weight.data, quant_state, dtype=dtype)


def _merged_lora_weight(layer) -> torch.Tensor:
    """base + sum of active, not-yet-merged deltas, in fp32 (peft's own `get_delta_weight`)."""
    weight = dequantized(layer.get_base_layer().weight)
    if layer.disable_adapters:
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.merged_adapters or adapter not in layer.scaling:
            continue
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise ConfigError("Merging DoRA adapters is not supported; train with use_dora=False to export.")
        weight += layer.get_delta_weight(adapter).to(weight.device, torch.float32)
    return weight


def merged_tensors(model, dtype):
    """Yield (name, CPU tensor) of the merged model, named like the base model's state_dict.

    Tied parameters are yielded once; a tied partner whose sibling was changed by the merge (a LoRA
    or trained copy of the embedding) is yielded separately, so the merged model computes what the
    LoRA model computed.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = base_model_of(model)
    handled, raw_params = [], set()

    def out(tensor):
        return tensor.detach().to(device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype)

    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in handled):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, ModulesToSaveWrapper):
            handled.append(prefix)
            use_copy = not module.disable_adapters and module.active_adapters
            inner = module.modules_to_save[module.active_adapters[0]] if use_copy else module.original_module
            for key, tensor in inner.state_dict().items():
                yield prefix + key, out(tensor)
        elif isinstance(module, LoraLayer):
            handled.append(prefix)
            yield prefix + "weight", out(_merged_lora_weight(module))
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                yield prefix + "bias", out(bias)
        else:
            for key, param in module.named_parameters(recurse=False):
                if id(param) in raw_params:
                    continue  # tied to a weight already written unchanged
                raw_params.add(id(param))
                yield prefix + key, out(dequantized(param))
            for key, buffer in module.named_buffers(recurse=False):
                if buffer is not None and key not in module._non_persistent_buffers_set:
                    yield prefix + key, out(buffer)


def write_safetensors_shards(tensors, save_directory, max_shard_size="5GB") -> dict:
    """Write (name, tensor) pairs as `model.safetensors` or numbered shards plus an index.

    Returns {name: file}. Shard count is unknown until the end, so shards get their final names then.
    """
    limit, directory = parse_size(max_shard_size), Path(save_directory)
    shards, current, current_bytes = [], {}, 0

    def flush():
        nonlocal current, current_bytes
        if current:
            temp = directory / f".partial-{len(shards)}.safetensors"
            save_file(current, str(temp), metadata={"format": "pt"})
            shards.append((temp, list(current), current_bytes))
            current, current_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > limit:
            flush()
        current[name] = tensor.contiguous()
        current_bytes += size
    flush()
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    weight_map = {}
    for index, (temp, names, _) in enumerate(shards, start=1):
        final = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        os.replace(temp, directory / final)
        weight_map.update({name: final for name in names})
    if len(shards) > 1:
        index_json = {"metadata": {"total_size": sum(s[2] for s in shards)}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    return weight_map


def default_dtype(model) -> torch.dtype:
    """The dtype the merged weights are written in: the model's floating dtype (the compute dtype of
    a 4-bit base). Real models are bf16/fp16 so this is '16-bit'; a fp32 test model stays fp32."""
    base = base_model_of(model)
    quant = getattr(base.config, "quantization_config", None)
    compute = getattr(quant, "bnb_4bit_compute_dtype", None) if quant is not None else None
    if isinstance(quant, dict):
        compute = quant.get("bnb_4bit_compute_dtype")
    if isinstance(compute, str):
        compute = getattr(torch, compute)
    if compute is not None:
        return compute
    floating = [p.dtype for p in base.parameters() if p.is_floating_point()]
    return floating[0] if floating else torch.float16


def merged_config(model, dtype, tied: bool):
    config = copy.deepcopy(base_model_of(model).config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = dtype
    config.architectures = [type(base_model_of(model)).__name__]
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = tied
    return config


def _output_embedding_name(base):
    head = base.get_output_embeddings()
    return next((f"{name}.weight" for name, module in base.named_modules() if module is head), None)


def save_merged_16bit(model, save_directory, tokenizer=None, max_shard_size="5GB", dtype=None) -> Path:
    directory = writable_directory(save_directory)
    dtype = dtype or default_dtype(model)
    base = base_model_of(model)
    head_name = _output_embedding_name(base)
    weight_map = write_safetensors_shards(merged_tensors(model, dtype), directory, max_shard_size)
    tied = head_name is not None and head_name not in weight_map
    merged_config(model, dtype, tied).save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def save_merged_4bit(model, save_directory, tokenizer=None, max_shard_size="5GB") -> Path:
    """Merge in 16-bit into a temporary folder, then reload it quantised to NF4 and save that."""
    if not torch.cuda.is_available():
        raise HardwareError("save_method='merged_4bit' re-quantises with bitsandbytes, which needs a CUDA GPU; "
                            "use save_method='merged_16bit' on this machine.")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    directory = writable_directory(save_directory)
    dtype = default_dtype(model)
    dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        save_merged_16bit(model, staging, None, max_shard_size, dtype)
        quantized = AutoModelForCausalLM.from_pretrained(
            staging, quantization_config=quant, dtype=dtype, device_map={"": torch.cuda.current_device()})
        quantized.save_pretrained(directory, max_shard_size=max_shard_size)
        del quantized
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def save_pretrained_merged(model, save_directory, tokenizer=None, save_method="merged_16bit",
                           max_shard_size="5GB", dtype=None) -> Path:
    """Save the fine-tuned model: 'lora' (adapter only), 'merged_16bit' or 'merged_4bit' (NF4, CUDA)."""
    check_save_method(save_method)
    if save_method == "lora":
        from slothnb.saving.adapters import save_adapters

        return save_adapters(model, save_directory, tokenizer)
    if save_method == "merged_4bit":
        return save_merged_4bit(model, save_directory, tokenizer, max_shard_size)
    return save_merged_16bit(model, save_directory, tokenizer, max_shard_size, dtype)
