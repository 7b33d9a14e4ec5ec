"""Tiny random-initialised models and a tiny tokenizer, shared by every test.

Import from a test file with ``from tiny_models import tiny_model, tiny_tokenizer, ...``
(pytest puts ``tests/`` on ``sys.path`` because ``tests/conftest.py`` lives there).

Everything is built in-process (no network, no files unless asked): a byte-level
BPE ``PreTrainedTokenizerFast`` that can encode any text, with a ChatML chat
template and pad/eos/bos set, and 2-layer models of every supported architecture
whose special-token ids agree with the tokenizer.

    ARCHS                                  # ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
    tok = tiny_tokenizer()                 # chat-ready: eos = <|im_end|>, pad = <|pad|>
    cfg = tiny_config("qwen3", num_hidden_layers=1)
    model = tiny_model("llama", seed=0)    # eval mode, fp32, CPU
    model, tok = tiny_model_and_tokenizer("gemma2")
    path = save_tiny_model("mistral", tmp_path / "m")   # safetensors + tokenizer on disk
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")

BOS, EOS, PAD, UNK = "<|bos|>", "<|im_end|>", "<|pad|>", "<|unk|>"
IM_START, END_OF_TEXT, RESERVED = "<|im_start|>", "<|endoftext|>", "<|reserved_0|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, END_OF_TEXT, RESERVED]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Same template, but it writes the BOS itself (Llama-3 / Gemma style).
CHATML_TEMPLATE_WITH_BOS = "{{ bos_token }}" + CHATML_TEMPLATE

VOCAB_SIZE = 320  # 256 byte symbols + 7 specials, rounded up to a multiple of 64


def tiny_tokenizer(
    *,
    pad: bool = True,
    eos: str = EOS,
    add_bos: bool = False,
    chat_template: str | None = CHATML_TEMPLATE,
    padding_side: str = "right",
):
    """A byte-level BPE tokenizer (no merges: one token per byte) with ChatML specials.

    The knobs build the broken tokenizers that ``slothnb.models.tokenizer_fixes`` repairs:
    ``pad=False`` (no pad token), ``eos=END_OF_TEXT`` (base-model eos in a chat model),
    ``add_bos=True`` with ``chat_template=CHATML_TEMPLATE_WITH_BOS`` (BOS twice).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        bos_id = vocab[BOS]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=eos,
        unk_token=UNK,
        pad_token=PAD if pad else None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (UNK, BOS, eos, PAD)],
        padding_side=padding_side,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    if not pad:
        tok.pad_token = None
    tok.chat_template = chat_template
    return tok


def _special_ids(tok) -> dict:
    ids = {
        "bos_token_id": tok.convert_tokens_to_ids(BOS),
        "eos_token_id": tok.convert_tokens_to_ids(tok.eos_token),
        # A config always needs some pad id for the embedding's padding_idx.
        "pad_token_id": tok.convert_tokens_to_ids(PAD),
    }
    return ids


_ARCH_OVERRIDES = {
    "llama": {},
    "mistral": {"sliding_window": 128},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"use_sliding_window": False},
    "gemma": {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "sliding_window": 32,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "phi3": {"original_max_position_embeddings": 256},
}


def tiny_config(arch: str, tokenizer=None, **overrides):
    """A 2-layer, 64-wide config for ``arch`` with GQA (4 query heads, 2 kv heads, head_dim 16)."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    kw = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.05,
        **_special_ids(tok),
    )
    kw.update(_ARCH_OVERRIDES[arch])
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None, **overrides):
    """A random-initialised ``*ForCausalLM`` (deterministic for a given ``seed``), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, tokenizer=tokenizer, **overrides)
    torch.manual_seed(seed)
    # Gemma 2's logit soft-capping has no SDPA path in transformers: eager there.
    attn = "eager" if arch == "gemma2" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model.eval()


def tiny_model_and_tokenizer(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    tok = tiny_tokenizer()
    return tiny_model(arch, seed=seed, dtype=dtype, tokenizer=tok, **overrides), tok


def save_tiny_model(arch: str, path, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer=None, **overrides) -> Path:
    """Write a tiny model (safetensors) and its tokenizer to ``path``; returns the folder."""
    path = Path(path)
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    model = tiny_model(arch, seed=seed, dtype=dtype, tokenizer=tok, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def tiny_chat_dataset_rows(n: int = 8) -> list[dict]:
    """A few ``{"messages": [...]}`` rows in the conversational format trl understands."""
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]})
    return rows


def describe(arch: str) -> str:
    """One-line summary of a tiny config, for test ids and failure messages."""
    c = tiny_config(arch)
    return json.dumps({"arch": arch, "layers": c.num_hidden_layers, "hidden": c.hidden_size, "vocab": c.vocab_size})


def nf4_llama(path, fresh: bool = True, device=0, **config):
    """A random-initialised bf16 Llama of ``config`` saved at ``path`` (when ``fresh``), loaded back
    NF4-quantised on ``device`` (GPU 0; bitsandbytes also quantises on the CPU) as QLoRA loads it
    (double quantisation, bf16 compute)."""
    import transformers

    if fresh:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(pad_token_id=0, **config)
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                             device_map={"": device})
