"""Guards that stop a run that cannot learn anything, before or while it wastes GPU time.

- Before training: if (nearly) every sample has all its labels masked, the loss would be 0 and
  nothing would train; the usual cause is a chat template or response marker that was not found.
- While training: a micro-batch whose loss is NaN/inf stops the run *before* the optimizer step
  (so the weights stay finite) and an optimizer step whose whole accumulation window had loss
  exactly 0 stops it too; both save a checkpoint of the last good weights first.
- Arguments: an explicit max_steps of 0 (or below -1, HF's "unset"), an unwritable output dir.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings

import datasets
import torch

from slothnb.errors import ConfigError, DatasetError, TrainingStopped

# A dataset is refused when at least this share of the checked samples has no trainable token.
MASKED_SAMPLES_LIMIT = 0.99
# Only the first rows are checked: enough to catch a template problem, cheap on huge datasets.
MAX_CHECKED_ROWS = 2000


def count_trainable_labels(dataset, max_rows: int = MAX_CHECKED_ROWS) -> tuple[int, int, int]:
    """(rows checked, rows with no trainable label, trainable label tokens) over the first rows.

    A label is trainable when it is not -100 and is not at position 0 (causal LMs predict
    label i from tokens < i, so the first label is never a target).
    """
    if not isinstance(dataset, datasets.Dataset) or "labels" not in dataset.column_names:
        return 0, 0, 0  # nothing to count up front (streaming) or no labels yet
    n = min(len(dataset), max_rows)
    rows_without, tokens = 0, 0
    for labels in dataset.select(range(n))["labels"]:
        trainable = sum(1 for x in labels[1:] if x != -100)
        tokens += trainable
        rows_without += trainable == 0
    return n, rows_without, tokens


def check_trainable_labels(dataset, markers=None) -> None:
    """Raise DatasetError when all or nearly all samples have every label masked."""
    n, rows_without, tokens = count_trainable_labels(dataset)
    if n == 0:
        return
    hint = (
        "The usual cause: the chat template did not render the assistant turns, or the response marker "
        "given to train_on_responses_only does not occur in the tokenized text"
        + (f" (instruction_part={markers[0]!r}, response_part={markers[1]!r})" if markers else "")
        + ", or max_length truncates the replies away."
    )
    if tokens == 0 or rows_without >= MASKED_SAMPLES_LIMIT * n:
        raise DatasetError(
            f"{rows_without} of the {n} samples checked have every label masked (-100), so the loss would be 0 "
            f"and nothing would train. {hint}"
        )
    if rows_without > 0.1 * n:
        warnings.warn(f"{rows_without} of {n} samples have no trainable token and will teach nothing. {hint}")


def check_max_steps(max_steps) -> None:
    """HF uses max_steps=-1 for "train by epochs"; 0 or below -1 is a mistake, not a choice."""
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ConfigError(
            f"max_steps={max_steps} would train nothing. Use a positive number of optimizer steps, or -1 "
            f"(None in FinetuneConfig) to train for num_train_epochs."
        )


def check_output_dir(path) -> None:
    """Create the output folder and prove a file can be written there (checkpoints come much later)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".slothnb-write-test"):
            pass
    except OSError as e:
        raise ConfigError(
            f"The output directory {path!s} is not writable ({e.strerror or e}). Choose another output_dir "
            f"or fix its permissions."
        ) from e


class LossGuard:
    """Per-step loss checks, called by SlothTrainer (kept out of the callback list so they run first)."""

    def __init__(self):
        self.window_sum = None
        self.micro_batches = 0

    def after_micro_batch(self, loss: torch.Tensor, step: int) -> None:
        value = loss.detach().float()
        if not torch.isfinite(value).all():
            raise TrainingStopped(
                f"The loss became {value.item()} at step {step + 1}, before the optimizer step. Lower the learning "
                f"rate, use bf16 instead of fp16, or check the data for empty/garbled samples. The checkpoint "
                f"of step {step} (the last good weights) was saved."
            )
        self.window_sum = value if self.window_sum is None else self.window_sum + value
        self.micro_batches += 1

    def after_optimizer_step(self, step: int) -> None:
        total, self.window_sum, self.micro_batches = self.window_sum, None, 0
        if total is not None and float(total) == 0.0:
            raise TrainingStopped(
                f"The loss was exactly 0 for the whole of step {step}: no label is trained (all masked) or the "
                f"model already predicts the data perfectly. Check train_on_responses_only markers and the chat "
                f"template. The checkpoint of step {step} was saved."
            )

    @staticmethod
    def is_bad(loss: float) -> bool:
        return loss == 0.0 or not math.isfinite(loss)
