"""Find a model (embedded default, local folder, .gguf file, or hub name), pick its dtype and load it.

Only safetensors checkpoints are loaded: unpickling a ``.bin`` can run arbitrary code. Hub names go
through huggingface_hub's ``snapshot_download`` (which honours its cache, tokens and
``HF_HUB_OFFLINE``), then load like a local folder.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import torch

from slothnb.errors import HardwareError, ModelNotFoundError
from slothnb.models import default_model, name_map
from slothnb.models.rope_scaling import apply_rope_scaling, check_max_seq_length
from slothnb.models.tokenizer_fixes import fix_tokenizer as _fix_tokenizer

logger = logging.getLogger("slothnb")

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.py"]


def resolve_dtype(dtype=None, device: str | None = None) -> torch.dtype:
    """``None``/"auto" -> bf16 on a GPU that has it, else fp16 on CUDA, fp32 on CPU; refuse what the hardware lacks."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None or dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") not in _DTYPE_NAMES:
            raise HardwareError(f"dtype {dtype!r} is not supported for training: use 'bfloat16', 'float16', "
                                "'float32' or None (automatic).")
        dtype = _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise HardwareError(f"dtype {dtype} is not supported for training: use torch.bfloat16, torch.float16, "
                            "torch.float32 or None (automatic).")
    if dtype == torch.bfloat16 and device == "cuda" and not _cuda_has_bf16():
        name = torch.cuda.get_device_name()
        raise HardwareError(f"{name} has no native bfloat16 (needs an Ampere or newer GPU): pass dtype=torch.float16 "
                            "or dtype=None.")
    return dtype


def _cuda_has_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the keyword
        return torch.cuda.is_bf16_supported()


def check_4bit_support() -> None:
    """4-bit NF4 needs bitsandbytes and a CUDA GPU; say which is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HardwareError("load_in_4bit=True needs bitsandbytes: pip install bitsandbytes "
                            "(or pass load_in_4bit=False for 16-bit LoRA).")
    if not torch.cuda.is_available():
        raise HardwareError("load_in_4bit=True needs a CUDA GPU (bitsandbytes NF4); none is visible. "
                            "Pass load_in_4bit=False to load in 16/32-bit on this machine.")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a broken install fails at import time with many error types
        raise HardwareError(f"bitsandbytes is installed but cannot be imported ({error}); reinstall it "
                            "or pass load_in_4bit=False.") from error


def bnb_4bit_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def check_local_dir(path: Path) -> Path:
    """Return the safetensors folder to load, or raise saying why it cannot be used."""
    files = [f.name for f in path.iterdir()]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    if "config.json" in files and has_safetensors:
        return path
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles and not has_safetensors:
        raise ModelNotFoundError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}): slothnb loads safetensors only, "
            "because unpickling can run arbitrary code. Convert once with transformers "
            "(model.save_pretrained(dir, safe_serialization=True)) from a source you trust.")
    if "adapter_config.json" in files and "config.json" not in files:
        raise ModelNotFoundError(f"{path} is a LoRA adapter, not a model: load its base model, then the adapter "
                                 "(peft.PeftModel.from_pretrained(model, path)).")
    raise ModelNotFoundError(f"{path} is not a model folder: it needs config.json and *.safetensors weights.")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".gguf")


def download_from_hub(name: str, token=None) -> Path:
    """``snapshot_download`` of the files a model needs; every failure becomes a ModelNotFoundError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, token=token, allow_patterns=_HUB_PATTERNS))
    except GatedRepoError as error:
        raise ModelNotFoundError(f"{name} is gated on the hub: accept its licence on huggingface.co and pass "
                                 "token=... (or run `hf auth login`).") from error
    except RepositoryNotFoundError as error:
        raise ModelNotFoundError(f"{name} does not exist on the hub (or is private: pass token=...). "
                                 "Check the spelling, or pass a local folder / .gguf file.") from error
    except HFValidationError as error:
        raise ModelNotFoundError(f"{name!r} is neither an existing local path nor a valid hub name "
                                 "('owner/model').") from error
    except Exception as error:  # offline mode, no network, DNS, timeouts...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub is unreachable ({type(error).__name__})"
        raise ModelNotFoundError(
            f"{name} was not found locally and {why}. Pass a local folder or .gguf file, use the embedded "
            f"default model 'smollm2-135m', or connect and unset HF_HUB_OFFLINE to download it.") from error


def resolve_source(model_name, load_in_4bit: bool = False, token=None) -> Path:
    """The local safetensors folder for ``model_name`` (converting a GGUF, downloading a hub model)."""
    if isinstance(model_name, os.PathLike):
        model_name = os.fspath(model_name)
    if not isinstance(model_name, str) or not model_name.strip():
        raise ModelNotFoundError(f"model_name must be a path or a hub name, got {model_name!r}.")
    if default_model.is_default_name(model_name):
        return default_model.ensure_default_model()
    path = Path(model_name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return default_model.convert_gguf(path)
        raise ModelNotFoundError(f"{path} is a file, not a model folder: pass the folder holding config.json "
                                 "and *.safetensors, or a .gguf file.")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").exists():
            return default_model.convert_gguf(ggufs[0])
        return check_local_dir(path)
    if _looks_like_path(model_name):
        raise ModelNotFoundError(f"{model_name} does not exist (no such file or folder).")
    if load_in_4bit:
        twin = name_map.to_4bit_name(model_name)
        if twin != model_name:
            try:
                return check_local_dir(download_from_hub(twin, token))
            except ModelNotFoundError:
                logger.info("slothnb: pre-quantised %s unavailable; quantising %s at load time.", twin, model_name)
    else:
        model_name = name_map.to_16bit_name(model_name)
    return check_local_dir(download_from_hub(model_name, token))


def _is_bnb_prequantized(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def load_model_and_tokenizer(model_name, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False,
                             token=None, device_map=None, trust_remote_code: bool = False,
                             fix_tokenizer: bool = True, attn_implementation: str | None = "sdpa", **kw):
    """Load ``(model, tokenizer)``: a plain transformers causal LM (on CUDA when there is one) + fixed tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_max_seq_length(max_seq_length)
    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(dtype, "cuda" if cuda else "cpu")
    if load_in_4bit:
        check_4bit_support()
    folder = resolve_source(model_name, load_in_4bit=load_in_4bit, token=token)
    config = AutoConfig.from_pretrained(folder, token=token, trust_remote_code=trust_remote_code)
    prequantized = _is_bnb_prequantized(config)
    if prequantized and not load_in_4bit:
        check_4bit_support()  # a bnb-4bit checkpoint cannot load any other way
    apply_rope_scaling(config, max_seq_length)
    if device_map is None and cuda:
        device_map = {"": torch.cuda.current_device()}
    kwargs = dict(config=config, dtype=dtype, device_map=device_map, token=token,
                  trust_remote_code=trust_remote_code, use_safetensors=True, **kw)
    if load_in_4bit and not prequantized:
        kwargs["quantization_config"] = bnb_4bit_config(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation, **kwargs)
    except ValueError as error:  # e.g. Gemma 2 has no SDPA path: eager is always there
        if attn_implementation in (None, "eager") or "attention" not in str(error).lower():
            raise
        logger.info("slothnb: %s unavailable for this model (%s); using eager attention.", attn_implementation, error)
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, token=token, trust_remote_code=trust_remote_code)
    model.max_seq_length = max_seq_length
    tokenizer.model_max_length = max_seq_length
    if fix_tokenizer:
        _fix_tokenizer(tokenizer, model)
    model._slothnb_tokenizer = tokenizer  # lets for_inference/for_training flip the padding side
    return model, tokenizer


def parameter_count(model: torch.nn.Module) -> int:
    """The parameters ``model`` stands for. A 4-bit weight stores two values to a byte, so its
    ``quant_state`` gives its real shape; ``numel()`` alone counts an 8B QLoRA model as ~4.8B."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total
