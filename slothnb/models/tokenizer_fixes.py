"""Repairs for the tokenizer mistakes that silently ruin fine-tunes.

- wrong eos in a chat model: the model must learn to emit the template's end-of-turn token
  (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``...), and generation must stop on it;
- no pad token (or pad == eos): padding with eos masks every real eos label, so the model never
  learns to stop; use an existing unused token, else add ``<|finetune_pad|>`` (resizing embeddings);
- BOS twice: the chat template writes ``bos_token`` and the tokenizer prepends it again;
- padding side: right for training (``for_inference`` switches to left for batched generation).

Each fix is announced in one line (logger "slothnb") and returned as a list of strings.
"""
from __future__ import annotations

import logging
import re

logger = logging.getLogger("slothnb")

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>", "<|end_of_turn|>", "<|endofturn|>")
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|PAD_TOKEN|>", "[PAD]", "<|fim_pad|>")
_UNUSED = re.compile(r"reserved|unused", re.IGNORECASE)
ADDED_PAD = "<|finetune_pad|>"
_BOS_IN_TEMPLATE = re.compile(r"\{\{-?\s*bos_token\s*-?\}\}")


def _token_id(tokenizer, token: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(token)


def _announce(fixes: list[str], message: str) -> None:
    fixes.append(message)
    logger.warning("slothnb: %s", message)


def _set_model_ids(model, **ids) -> None:
    if model is None:
        return
    for holder in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if holder is not None:
            for key, value in ids.items():
                setattr(holder, key, value)


def fix_eos(tokenizer, model=None, fixes=None) -> list[str]:
    fixes = [] if fixes is None else fixes
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return fixes
    for token in END_OF_TURN_TOKENS:
        if token in template and _token_id(tokenizer, token) is not None:
            if tokenizer.eos_token != token:
                old = tokenizer.eos_token
                tokenizer.eos_token = token
                _announce(fixes, f"eos token {old!r} -> {token!r} (the chat template's end-of-turn token).")
                if model is not None and getattr(model, "generation_config", None) is not None:
                    # stop on either: the chat turn end, or the base model's end of text
                    stops = [tokenizer.eos_token_id]
                    old_id = _token_id(tokenizer, old) if old else None
                    if old_id is not None and old_id not in stops:
                        stops.append(old_id)
                    model.generation_config.eos_token_id = stops
            return fixes
    return fixes


def _free_pad_candidate(tokenizer) -> str | None:
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for token in PAD_CANDIDATES:
        if token not in taken and token not in template and _token_id(tokenizer, token) is not None:
            return token
    for token in sorted(getattr(tokenizer, "added_tokens_encoder", {}) or {}):
        if _UNUSED.search(token) and token not in taken:
            return token
    unk = tokenizer.unk_token
    if unk is not None and unk not in taken and unk not in template:
        return unk
    return None


def fix_pad(tokenizer, model=None, fixes=None) -> list[str]:
    fixes = [] if fixes is None else fixes
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        _set_model_ids(model, pad_token_id=tokenizer.pad_token_id)
        return fixes
    old = tokenizer.pad_token
    token = _free_pad_candidate(tokenizer)
    if token is not None:
        tokenizer.pad_token = token
        reason = "missing" if old is None else f"was eos {old!r}, which would mask every eos label"
        _announce(fixes, f"pad token {reason}: using the unused token {token!r}.")
    else:
        tokenizer.add_special_tokens({"pad_token": ADDED_PAD})
        _announce(fixes, f"pad token missing: added {ADDED_PAD!r} (id {tokenizer.pad_token_id}).")
        embeddings = model.get_input_embeddings() if model is not None else None
        if embeddings is not None and embeddings.num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            _announce(fixes, f"resized the embeddings to {len(tokenizer)} rows for the new pad token.")
    _set_model_ids(model, pad_token_id=tokenizer.pad_token_id)
    return fixes


def adds_bos(tokenizer) -> bool:
    """Whether plain ``tokenizer(text)`` prepends the BOS token."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def fix_double_bos(tokenizer, fixes=None) -> list[str]:
    """Drop ``{{ bos_token }}`` from the chat template when the tokenizer prepends BOS itself.

    Then ``tokenizer(apply_chat_template(..., tokenize=False))`` -- what trainers do with
    templated text -- has exactly one BOS.
    """
    fixes = [] if fixes is None else fixes
    template = tokenizer.chat_template
    if not isinstance(template, str) or not _BOS_IN_TEMPLATE.search(template) or not adds_bos(tokenizer):
        return fixes
    tokenizer.chat_template = _BOS_IN_TEMPLATE.sub("", template, count=1)
    _announce(fixes, "BOS twice: removed bos_token from the chat template (the tokenizer adds it already).")
    return fixes


def fix_padding_side(tokenizer, side: str = "right", fixes=None) -> list[str]:
    fixes = [] if fixes is None else fixes
    if tokenizer.padding_side != side:
        tokenizer.padding_side = side
        _announce(fixes, f"padding side -> {side!r} (for training).")
    return fixes


def fix_tokenizer(tokenizer, model=None) -> list[str]:
    """Apply every fix in place (tokenizer, and the model's ids/embeddings); returns the announcements."""
    fixes: list[str] = []
    fix_eos(tokenizer, model, fixes)
    fix_pad(tokenizer, model, fixes)
    fix_double_bos(tokenizer, fixes)
    fix_padding_side(tokenizer, "right", fixes)
    return fixes
