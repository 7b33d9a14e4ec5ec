"""Two-way map between popular 16-bit models and their pre-quantised bitsandbytes 4-bit twins.

Downloading a pre-quantised NF4 checkpoint is ~4x smaller and skips quantising at load time, so a
4-bit request prefers the twin; a 16-bit request for a twin goes back to the full-precision model.
Names not listed pass through unchanged (a ``-bnb-4bit`` suffix is stripped for 16-bit requests,
which is how the unsloth mirrors are named).
"""
from __future__ import annotations

# (16-bit name, pre-quantised 4-bit twin)
PAIRS: tuple[tuple[str, str], ...] = (
    # Llama 3.x
    ("meta-llama/Llama-3.1-8B", "unsloth/Meta-Llama-3.1-8B-bnb-4bit"),
    ("meta-llama/Llama-3.1-8B-Instruct", "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"),
    ("meta-llama/Meta-Llama-3-8B", "unsloth/llama-3-8b-bnb-4bit"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "unsloth/llama-3-8b-Instruct-bnb-4bit"),
    ("meta-llama/Llama-3.2-1B", "unsloth/Llama-3.2-1B-bnb-4bit"),
    ("meta-llama/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"),
    ("meta-llama/Llama-3.2-3B", "unsloth/Llama-3.2-3B-bnb-4bit"),
    ("meta-llama/Llama-3.2-3B-Instruct", "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"),
    ("meta-llama/Llama-3.3-70B-Instruct", "unsloth/Llama-3.3-70B-Instruct-bnb-4bit"),
    # Mistral
    ("mistralai/Mistral-7B-v0.3", "unsloth/mistral-7b-v0.3-bnb-4bit"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "unsloth/mistral-7b-instruct-v0.3-bnb-4bit"),
    ("mistralai/Mistral-Nemo-Instruct-2407", "unsloth/Mistral-Nemo-Instruct-2407-bnb-4bit"),
    # Qwen 2.5 / Qwen 3
    ("Qwen/Qwen2.5-0.5B-Instruct", "unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-1.5B-Instruct", "unsloth/Qwen2.5-1.5B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-3B-Instruct", "unsloth/Qwen2.5-3B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-7B", "unsloth/Qwen2.5-7B-bnb-4bit"),
    ("Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-14B-Instruct", "unsloth/Qwen2.5-14B-Instruct-bnb-4bit"),
    ("Qwen/Qwen2.5-Coder-7B-Instruct", "unsloth/Qwen2.5-Coder-7B-Instruct-bnb-4bit"),
    ("Qwen/Qwen3-0.6B", "unsloth/Qwen3-0.6B-bnb-4bit"),
    ("Qwen/Qwen3-1.7B", "unsloth/Qwen3-1.7B-bnb-4bit"),
    ("Qwen/Qwen3-4B", "unsloth/Qwen3-4B-bnb-4bit"),
    ("Qwen/Qwen3-8B", "unsloth/Qwen3-8B-bnb-4bit"),
    ("Qwen/Qwen3-14B", "unsloth/Qwen3-14B-bnb-4bit"),
    # Gemma / Gemma 2
    ("google/gemma-7b", "unsloth/gemma-7b-bnb-4bit"),
    ("google/gemma-7b-it", "unsloth/gemma-7b-it-bnb-4bit"),
    ("google/gemma-2-2b", "unsloth/gemma-2-2b-bnb-4bit"),
    ("google/gemma-2-2b-it", "unsloth/gemma-2-2b-it-bnb-4bit"),
    ("google/gemma-2-9b", "unsloth/gemma-2-9b-bnb-4bit"),
    ("google/gemma-2-9b-it", "unsloth/gemma-2-9b-it-bnb-4bit"),
    ("google/gemma-2-27b-it", "unsloth/gemma-2-27b-it-bnb-4bit"),
    # Phi-3 / Phi-3.5
    ("microsoft/Phi-3-mini-4k-instruct", "unsloth/Phi-3-mini-4k-instruct-bnb-4bit"),
    ("microsoft/Phi-3-medium-4k-instruct", "unsloth/Phi-3-medium-4k-instruct-bnb-4bit"),
    ("microsoft/Phi-3.5-mini-instruct", "unsloth/Phi-3.5-mini-instruct-bnb-4bit"),
    # SmolLM2
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "unsloth/SmolLM2-135M-Instruct-bnb-4bit"),
    ("HuggingFaceTB/SmolLM2-360M-Instruct", "unsloth/SmolLM2-360M-Instruct-bnb-4bit"),
    ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "unsloth/SmolLM2-1.7B-Instruct-bnb-4bit"),
)

_TO_4BIT = {a.lower(): b for a, b in PAIRS}
_TO_16BIT = {b.lower(): a for a, b in PAIRS}
_SUFFIXES = ("-bnb-4bit", "-unsloth-bnb-4bit")


def to_4bit_name(name: str) -> str:
    """The pre-quantised twin of a 16-bit model, or ``name`` itself (already 4-bit or unknown)."""
    return _TO_4BIT.get(name.lower(), name)


def to_16bit_name(name: str) -> str:
    """The full-precision model behind a 4-bit twin, or ``name`` itself (already 16-bit or unknown)."""
    known = _TO_16BIT.get(name.lower())
    if known is not None:
        return known
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_4bit_name(name: str) -> bool:
    return name.lower() in _TO_16BIT or name.lower().endswith("-bnb-4bit")
