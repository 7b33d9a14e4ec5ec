"""Raw text for continued pre-training, and the checks that give a dataset a clear error.

``raw_text_dataset`` turns text files (or a text column) into training samples. With
``max_length`` each document is tokenized and cut into windows; ``stride`` tokens of overlap
give every window some left context, and those overlapping tokens are masked in ``labels`` so
every token is still trained exactly once.
"""
from __future__ import annotations

from pathlib import Path

import datasets

from slothnb.errors import ConfigError, DatasetError

# Columns trl's trainers know how to turn into training samples.
KNOWN_SAMPLE_FIELDS = ("input_ids", "messages", "prompt", "completion", "chosen", "rejected")


def _read_documents(files_or_dataset, text_field: str) -> list[str]:
    if isinstance(files_or_dataset, (datasets.Dataset,)):
        require_field(files_or_dataset, text_field)
        return [t for t in files_or_dataset[text_field] if t]
    if isinstance(files_or_dataset, (str, Path)):
        files_or_dataset = [files_or_dataset]
    paths = []
    for item in files_or_dataset:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(path.glob("*.txt")))
        elif path.is_file():
            paths.append(path)
        else:
            raise DatasetError(
                f"Text file {path} does not exist. Pass existing files, a folder of *.txt, or a Dataset."
            )
    return [t for t in (p.read_text(encoding="utf-8", errors="replace") for p in paths) if t.strip()]


def raw_text_dataset(
    files_or_dataset,
    tokenizer=None,
    text_field: str = "text",
    max_length: int | None = None,
    stride: int = 0,
    add_eos: bool = True,
) -> datasets.Dataset:
    """Documents -> samples for continued pre-training.

    Without ``max_length`` the result has one ``text`` row per document (EOS appended), which
    the trainer tokenizes and truncates or packs. With ``max_length`` it has ``input_ids`` and
    ``labels`` windows of at most ``max_length`` tokens, consecutive windows overlapping by
    ``stride`` tokens (masked in the labels of the later window).
    """
    if max_length is not None and max_length <= 1:
        raise ConfigError(f"max_length={max_length} is too small; use at least 2 tokens (typically 512-4096).")
    if not 0 <= stride < (max_length or 1 << 62):
        raise ConfigError(f"stride={stride} must be >= 0 and smaller than max_length={max_length}.")
    docs = _read_documents(files_or_dataset, text_field)
    if not docs:
        raise DatasetError("No text found: the files or the column are empty. Pass at least one non-empty document.")
    eos = getattr(tokenizer, "eos_token", None) if add_eos else None
    if add_eos and tokenizer is not None and eos is None:
        raise ConfigError("add_eos=True but the tokenizer has no eos_token; set tokenizer.eos_token or add_eos=False.")
    if max_length is None:
        return datasets.Dataset.from_dict({"text": [d + eos if eos and not d.endswith(eos) else d for d in docs]})
    if tokenizer is None:
        raise ConfigError("Chunking into max_length windows needs a tokenizer; pass tokenizer=...")

    rows = {"input_ids": [], "labels": []}
    step = max_length - stride
    for doc in docs:
        ids = tokenizer(doc)["input_ids"]
        if add_eos:
            ids = ids + [tokenizer.eos_token_id]
        start = 0
        while True:
            window = ids[start : start + max_length]
            labels = list(window)
            if start > 0:
                labels[:stride] = [-100] * min(stride, len(labels))
            rows["input_ids"].append(window)
            rows["labels"].append(labels)
            if start + max_length >= len(ids):
                break
            start += step
    return datasets.Dataset.from_dict(rows)


def require_field(dataset, field: str) -> None:
    """Raise a DatasetError naming the fields the dataset does have when ``field`` is missing."""
    names = list(getattr(dataset, "column_names", None) or [])
    if field not in names:
        raise DatasetError(
            f"The dataset has no '{field}' field; its fields are {names}. Pass text_field=<one of them> "
            f"(dataset_text_field for SFTConfig) or rename the column."
        )


def check_dataset(dataset, text_field: str = "text", has_formatting_func: bool = False, name: str = "train") -> None:
    """Fail early, with the fix in the message, on an empty dataset or one without usable fields."""
    if dataset is None:
        return
    try:
        n = len(dataset)
    except TypeError:  # an IterableDataset: nothing to count up front
        return
    if n == 0:
        raise DatasetError(f"The {name} dataset is empty (0 rows). Check the file path or the split/filter you used.")
    names = list(getattr(dataset, "column_names", None) or [])
    if has_formatting_func or not names:
        return
    if text_field not in names and not any(f in names for f in KNOWN_SAMPLE_FIELDS):
        raise DatasetError(
            f"The {name} dataset has no '{text_field}' field; its fields are {names}. Set "
            f"dataset_text_field (text_field in FinetuneConfig) to the column holding the text, or give a "
            f"'messages' column for chat data."
        )
