"""``finetune()``: the one-call LoRA recipe behind the CLI and the notebook magic.

    result = finetune(model, tokenizer, dataset, FinetuneConfig(max_steps=60))
    result.history      # trainer log rows ({"loss", "learning_rate", "step", ...})
    result.adapter_dir  # the saved LoRA adapter + tokenizer

Ctrl-C (or the notebook's stop button, which raises KeyboardInterrupt) does not lose the run: a
checkpoint is saved, the adapter is saved, and the result comes back with ``interrupted=True``;
``FinetuneConfig(resume_from_checkpoint=result.checkpoint_dir)`` continues the same loss curve.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slothnb import memory
from slothnb.errors import ConfigError
from slothnb.training.chat import apply_chat_template, train_on_responses_only
from slothnb.training.data import raw_text_dataset, require_field
from slothnb.training.guards import check_max_steps
from slothnb.training.trainer import SlothTrainer, SlothTrainingArguments


@dataclass
class FinetuneConfig:
    """Every knob of the recipe, with defaults that fine-tune a small model in minutes."""

    max_steps: int | None = 60  # optimizer steps; None trains num_train_epochs instead
    num_train_epochs: float = 1.0
    learning_rate: float = 2e-4  # LoRA weights
    embedding_learning_rate: float | None = None  # embed_tokens/lm_head when trained (2-10x below learning_rate)
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4  # exact: the loss is normalised over the whole window's tokens
    warmup_steps: int = 5
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.01
    optim: str = "adamw_torch_fused"  # transformers' own default on torch >= 2.8
    logging_steps: int = 1
    save_steps: int | None = None  # None: checkpoints only at the end and on interruption
    seed: int = 3407
    max_seq_length: int = 512  # tokens per sample (or per packed row)
    packing: bool = False  # pack short samples into max_seq_length rows (padding-free)
    text_field: str = "text"  # dataset column with the text (chat data: a 'messages' column)
    output_dir: str = "outputs"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False  # scale adapters by alpha/sqrt(r) instead of alpha/r
    target_modules: list[str] | None = None  # None: every attention and MLP projection
    use_gradient_checkpointing: bool | str = "slothnb"
    cuda_graphs: bool | str | None = None  # CUDA graphs of the checkpointed layers (True, False, "adaptive", "forward"); None: layer_graphs.default_for
    train_on_responses_only: bool = False  # chat data: train on assistant replies only
    eval_fraction: float = 0.0  # share of the dataset held out for evaluation (0 = none)
    resume_from_checkpoint: str | bool | None = None
    extra_args: dict = field(default_factory=dict)  # any other SlothTrainingArguments/SFTConfig field

    def __post_init__(self):
        check_max_steps(-1 if self.max_steps is None else self.max_steps)
        if self.max_steps is None and not self.num_train_epochs > 0:
            raise ConfigError(f"num_train_epochs={self.num_train_epochs} must be > 0 when max_steps is None.")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_r"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0 (typically 1e-5 to 5e-4).")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be in [0, 1).")

    @classmethod
    def from_mapping(cls, mapping) -> "FinetuneConfig":
        """Build from a dict (CLI flags, a magic's options); unknown keys raise ConfigError listing valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(valid))
        if unknown:
            raise ConfigError(f"Unknown finetune option(s) {unknown}. Valid options: {', '.join(valid)}.")
        return cls(**dict(mapping))


@dataclass
class FinetuneResult:
    history: list[dict]
    metrics: dict
    output_dir: str
    adapter_dir: str | None
    interrupted: bool = False
    checkpoint_dir: str | None = None
    trainer: object = field(default=None, repr=False)


def _record(stage: str) -> None:
    memory.record_stage(stage)


def _add_lora(model, config: FinetuneConfig):
    if hasattr(model, "peft_config"):
        return model
    from slothnb.models.lora import get_peft_model

    kw = dict(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
              use_rslora=config.use_rslora)
    if config.target_modules is not None:
        kw["target_modules"] = config.target_modules
    return get_peft_model(model, use_gradient_checkpointing=config.use_gradient_checkpointing,
                          random_state=config.seed, max_seq_length=config.max_seq_length,
                          cuda_graphs=config.cuda_graphs, **kw)


def _as_dataset(dataset, tokenizer, config: FinetuneConfig):
    """Files -> raw text rows; chat rows -> rendered text; anything else must have the text field."""
    if isinstance(dataset, (str, os.PathLike, list, tuple)):
        return raw_text_dataset(dataset, tokenizer, text_field=config.text_field)
    names = dataset.column_names
    if "input_ids" in names:  # already tokenized (e.g. raw_text_dataset windows): train on it as is
        return dataset
    if config.text_field not in names and "messages" in names:
        return apply_chat_template(dataset, tokenizer, "messages", text_field=config.text_field)
    require_field(dataset, config.text_field)
    return dataset


def build_arguments(config: FinetuneConfig, model) -> SlothTrainingArguments:
    dtype = next(model.parameters()).dtype
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        output_dir=config.output_dir,
        max_steps=-1 if config.max_steps is None else config.max_steps,
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        embedding_learning_rate=config.embedding_learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        optim=config.optim,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_seq_length,
        packing=config.packing,
        dataset_text_field=config.text_field,
        eval_strategy="steps" if config.eval_fraction > 0 else "no",
        eval_steps=max(1, (config.max_steps or 100) // 5),
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        report_to="none",
        # slothnb's LoRA layer installs its own (cheaper) checkpointing; HF's would wrap it a second time
        gradient_checkpointing=False,
    )
    kwargs.update(config.extra_args)
    return SlothTrainingArguments(**kwargs)


def finetune(model, tokenizer, dataset, config: FinetuneConfig | dict | None = None, callbacks=()) -> FinetuneResult:
    """Add LoRA (if the model has none), train with SlothTrainer, save the adapter, return the history."""
    if config is None:
        config = FinetuneConfig()
    elif isinstance(config, dict):
        config = FinetuneConfig.from_mapping(config)
    data = _as_dataset(dataset, tokenizer, config)
    eval_data = None
    if config.eval_fraction > 0:
        split = data.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        data, eval_data = split["train"], split["test"]
    model = _add_lora(model, config)
    _record("lora_added")
    trainer = SlothTrainer(model=model, args=build_arguments(config, model), train_dataset=data,
                           eval_dataset=eval_data, processing_class=tokenizer, callbacks=list(callbacks))
    if config.train_on_responses_only:
        train_on_responses_only(trainer)
    _record("train_start")
    interrupted, metrics = False, {}
    try:
        output = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        metrics = dict(output.metrics)
    except KeyboardInterrupt:
        interrupted = True
    _record("train_end")
    adapter_dir = str(Path(config.output_dir) / "adapter")
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return FinetuneResult(
        history=list(trainer.state.log_history), metrics=metrics, output_dir=str(config.output_dir),
        adapter_dir=adapter_dir, interrupted=interrupted, checkpoint_dir=trainer.last_checkpoint, trainer=trainer,
    )
