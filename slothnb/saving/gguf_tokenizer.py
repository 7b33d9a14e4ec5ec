"""The tokenizer as GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys).

A GGUF has no tokenizer.json: it carries the vocabulary, the merges, the token types and the
special ids, and llama.cpp / transformers rebuild the tokenizer from them. Two families:
'gpt2' (byte-level BPE: SmolLM2, Qwen2, Llama 3) and 'llama' (SentencePiece-style BPE with byte
fallback: Llama 2, Mistral). Which one is read off the fast tokenizer's own JSON.
"""
import json
import re

import gguf

from slothnb.errors import ConfigError

# `tokenizer.ggml.pre` names llama.cpp (and transformers' GGUF loader) know, matched on the split
# regex of the tokenizer's pre-tokenizer; a plain ByteLevel pre-tokenizer is GPT-2's ("gpt-2").
_PRE_BY_REGEX_START = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|": "qwen2",
}


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers-backed) tokenizer; load it with "
                          "AutoTokenizer.from_pretrained(..., use_fast=True).")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(pre) -> str:
    """llama.cpp's name for how text is split before BPE (decides digit and contraction handling)."""
    if pre is None:
        return "default"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    for step in steps:
        pattern = (step.get("pattern") or {}).get("Regex", "")
        for start, name in _PRE_BY_REGEX_START.items():
            if pattern.startswith(start):
                return name
    return "default"


def _token_strings(tokenizer, vocab_size: int) -> list[str]:
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or max(by_id) >= vocab_size:
        raise ConfigError(f"The tokenizer has {len(by_id)} tokens but the model's embedding has only "
                          f"{vocab_size} rows; pass the tokenizer the model was trained with.")
    return [by_id.get(index, f"[PAD{index}]") for index in range(vocab_size)]


def _token_types(tokenizer, tokens, byte_fallback: bool) -> list[int]:
    added = tokenizer.added_tokens_decoder
    types = []
    for index, token in enumerate(tokens):
        if index in added:
            kind = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
        elif token.startswith("[PAD") and token not in tokenizer.get_vocab():
            kind = gguf.TokenType.UNUSED
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        if byte_fallback and index == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN  # SentencePiece's <unk>, as llama.cpp marks it
        types.append(int(kind))
    return types


def _merges(model: dict) -> list[str]:
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]


def _adds(tokenizer, special_id, position) -> bool:
    """Whether encoding plain text puts `special_id` at `position` (0: BOS, -1: EOS)."""
    if special_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[position] == special_id


def add_tokenizer(writer: "gguf.GGUFWriter", tokenizer, vocab_size: int) -> None:
    """Write the tokenizer metadata for `tokenizer` into `writer`."""
    data = _backend_json(tokenizer)
    model = data["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); "
                          f"this one is {model.get('type')!r}.")
    byte_fallback = bool(model.get("byte_fallback"))
    tokens = _token_strings(tokenizer, vocab_size)
    if byte_fallback:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # No SentencePiece scores in a tokenizer.json: rank by id, earlier tokens merge first.
        writer.add_token_scores([-float(index) for index in range(vocab_size)])
        writer.add_add_space_prefix("Prepend" in json.dumps(data.get("normalizer")) or
                                    "prepend_scheme" in json.dumps(data.get("pre_tokenizer")))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(_token_types(tokenizer, tokens, byte_fallback))
    merges = _merges(model)
    if merges:
        writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, 0))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, -1))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)
