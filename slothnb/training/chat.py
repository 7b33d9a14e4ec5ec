"""Chat data: named chat templates, rendering conversations to text, and response-only loss.

``train_on_responses_only`` trains on what the assistant says and nothing else: every token
from an instruction marker (the header of a user/system turn) up to the next response marker
(the header of an assistant turn) gets label -100. When the markers are not given they are
read off the tokenizer's own chat template by rendering a probe conversation.
"""
from __future__ import annotations

import datasets

from slothnb.errors import ConfigError, DatasetError

# Jinja templates for tokenizers that have none (or to override theirs). No BOS token is emitted:
# the trainer's tokenizer adds it when the model wants one, so it is never doubled.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
        "+ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "gemma": (
        "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


def set_chat_template(tokenizer, template: str) -> None:
    """Install a named template (or a raw Jinja string) on the tokenizer."""
    if template in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[template]
    elif "{%" in template or "{{" in template:
        tokenizer.chat_template = template
    else:
        raise ConfigError(
            f"Unknown chat template {template!r}; named ones are {sorted(CHAT_TEMPLATES)} (or pass a Jinja string)."
        )


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def apply_chat_template(
    dataset,
    tokenizer,
    messages_field="messages",
    template: str | None = None,
    system_prompt: str | None = None,
    text_field: str = "text",
) -> datasets.Dataset:
    """Render conversations to a ``text`` column with the tokenizer's (or a named) chat template.

    ``messages_field`` is the column of ``[{"role", "content"}, ...]`` lists, or a pair of column
    names ``(user_field, assistant_field)`` for instruction/response data.
    """
    if template is not None:
        set_chat_template(tokenizer, template)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"The tokenizer has no chat template; pass template= one of {sorted(CHAT_TEMPLATES)}."
        )
    pair = not isinstance(messages_field, str)
    fields = list(messages_field) if pair else [messages_field]
    if pair and len(fields) != 2:
        raise ConfigError(f"messages_field as pairs must be (user_field, assistant_field), got {messages_field!r}.")
    for f in fields:
        if f not in dataset.column_names:
            raise DatasetError(f"The dataset has no '{f}' field; its fields are {dataset.column_names}.")
    bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)

    def render(row):
        messages = (
            [{"role": "user", "content": str(row[fields[0]])}, {"role": "assistant", "content": str(row[fields[1]])}]
            if pair
            else list(row[fields[0]])
        )
        if system_prompt and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        text = _render(tokenizer, messages)
        if bos and text.startswith(bos):  # the trainer's tokenizer adds BOS itself
            text = text[len(bos) :]
        if eos and text.rstrip().endswith(eos):  # else trl appends a second EOS after the trailing newline
            text = text.rstrip()
        return {text_field: text}

    return dataset.map(render, remove_columns=[c for c in dataset.column_names if c != text_field])


def detect_markers(tokenizer) -> tuple[str, str]:
    """(instruction_part, response_part) of the tokenizer's chat template, e.g. for ChatML
    ('<|im_start|>user\\n', '<|im_start|>assistant\\n')."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("Cannot detect response markers: the tokenizer has no chat template. Pass them explicitly.")
    u1, a1, u2 = "XQXUSERONEXQX", "XQXASSISTANTXQX", "XQXUSERTWOXQX"
    one = _render(tokenizer, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}])
    three = _render(
        tokenizer,
        [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}],
    )
    try:
        between_user_and_reply = one[one.index(u1) + len(u1) : one.index(a1)]
        end_of_reply = one[one.index(a1) + len(a1) :]
        between_reply_and_user = three[three.index(a1) + len(a1) : three.index(u2)]
    except ValueError as e:
        raise ConfigError("The chat template drops message contents; pass instruction_part/response_part.") from e
    # The user turn's end-of-turn text precedes the assistant header; the reply's end precedes the next user header.
    prompt_only = _render(tokenizer, [{"role": "user", "content": u1}], add_generation_prompt=True)
    response = prompt_only[prompt_only.index(u1) + len(u1) :]
    user_end = _render(tokenizer, [{"role": "user", "content": u1}])
    user_end = user_end[user_end.index(u1) + len(u1) :]
    response_part = response[len(user_end) :] if response.startswith(user_end) else between_user_and_reply
    instruction_part = between_reply_and_user
    if end_of_reply and instruction_part.startswith(end_of_reply):
        instruction_part = instruction_part[len(end_of_reply) :]
    instruction_part, response_part = instruction_part.lstrip("\n") or instruction_part, response_part
    if not response_part.strip() or not instruction_part.strip():
        raise ConfigError("Could not read turn markers off the chat template; pass instruction_part/response_part.")
    return instruction_part, response_part


def _marker_ids(tokenizer, marker: str) -> list[list[int]]:
    """Token spellings of a marker: alone, and with trailing whitespace dropped (BPE may merge it onward)."""
    spellings = []
    for text in (marker, marker.rstrip()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in spellings:
            spellings.append(ids)
    return spellings


def _find_all(ids: list[int], spellings: list[list[int]]) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of any spelling in ids, first spelling wins at a position."""
    spans, i = [], 0
    while i < len(ids):
        for pat in spellings:
            if ids[i : i + len(pat)] == pat:
                spans.append((i, i + len(pat)))
                i += len(pat) - 1
                break
        i += 1
    return spans


def response_only_labels(input_ids: list[int], instruction_ids, response_ids) -> list[int]:
    """Labels that keep only the assistant replies (everything after a response marker, up to the
    next instruction marker); the rest, markers included, is -100."""
    marks = [(s, e, "r") for s, e in _find_all(input_ids, response_ids)]
    marks += [(s, e, "i") for s, e in _find_all(input_ids, instruction_ids)]
    labels, keep_from = [-100] * len(input_ids), None
    for start, end, kind in sorted(marks) + [(len(input_ids), len(input_ids), "i")]:
        if keep_from is not None:
            labels[keep_from:start] = input_ids[keep_from:start]
            keep_from = None
        if kind == "r":
            keep_from = end
    return labels


def train_on_responses_only(trainer_or_dataset, instruction_part=None, response_part=None, tokenizer=None):
    """Mask everything but the assistant replies (labels -100 on system/user turns).

    Takes a trainer (its tokenized train/eval datasets are rewritten; the trainer is returned) or
    a tokenized dataset with ``input_ids`` (a new dataset with ``labels`` is returned; pass
    ``tokenizer``). Markers default to those of the tokenizer's chat template.
    """
    trainer = trainer_or_dataset if hasattr(trainer_or_dataset, "train_dataset") else None
    tokenizer = tokenizer or (getattr(trainer, "processing_class", None) if trainer else None)
    if tokenizer is None:
        raise ConfigError("train_on_responses_only needs the tokenizer: pass tokenizer=... with a dataset.")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    if instruction_part is None or response_part is None:
        found_instruction, found_response = detect_markers(tokenizer)
        instruction_part = instruction_part or found_instruction
        response_part = response_part or found_response
    instruction_ids = _marker_ids(tokenizer, instruction_part)
    response_ids = _marker_ids(tokenizer, response_part)

    def mask(dataset):
        if dataset is None or not hasattr(dataset, "map"):
            return dataset
        if "input_ids" not in (dataset.column_names or []):
            raise DatasetError(
                f"train_on_responses_only needs a tokenized dataset (an 'input_ids' field); its fields are "
                f"{dataset.column_names}. Build the trainer first and pass the trainer."
            )
        return dataset.map(
            lambda row: {"labels": response_only_labels(row["input_ids"], instruction_ids, response_ids)}
        )

    if trainer is None:
        return mask(trainer_or_dataset)
    trainer.train_dataset = mask(trainer.train_dataset)
    if isinstance(trainer.eval_dataset, dict):
        trainer.eval_dataset = {k: mask(v) for k, v in trainer.eval_dataset.items()}
    else:
        trainer.eval_dataset = mask(trainer.eval_dataset)
    trainer._slothnb_markers = (instruction_part, response_part)
    return trainer
