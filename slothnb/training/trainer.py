"""SlothTrainer: trl's SFTTrainer, plus what LoRA fine-tuning on one GPU needs.

Everything a trl user knows (SFTConfig fields, callbacks, packing, resume) works unchanged.
Added:
- ``embedding_learning_rate``: embed_tokens / lm_head parameters (and peft's modules_to_save
  copies of them) get their own optimizer group at that rate (continued pre-training trains them
  2-10x slower than the LoRA weights).
- The loss of a slothnb-patched model comes from the model's own forward (its fused linear
  cross-entropy kernel, normalised by ``num_items_in_batch`` for exact gradient accumulation),
  not from trl's fused LM head; token accuracy/entropy are logged only when logits exist.
- Guards: bad input fails at construction with a clear error; NaN / all-zero losses stop the run
  with TrainingStopped after saving a checkpoint; Ctrl-C (KeyboardInterrupt) saves a checkpoint
  (adapter + optimizer + trainer state) and is re-raised, so ``train(resume_from_checkpoint=...)``
  continues the same loss curve.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from slothnb import python_gc
from slothnb.errors import HardwareError, TrainingStopped
from slothnb.training.data import check_dataset
from slothnb.training.guards import LossGuard, check_max_steps, check_output_dir, check_trainable_labels

logger = logging.getLogger(__name__)

EMBEDDING_NAME_PARTS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


@dataclass
class SlothTrainingArguments(SFTConfig):
    """SFTConfig plus ``embedding_learning_rate``."""

    embedding_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of embed_tokens/lm_head (continued pre-training: 2-10x below learning_rate)."},
    )
    guard_loss: bool = field(
        default=True,
        metadata={"help": "Stop with TrainingStopped on a NaN/inf loss or a step whose loss is exactly 0."},
    )

    def __post_init__(self):
        check_max_steps(self.max_steps)
        if self.embedding_learning_rate is not None and self.embedding_learning_rate < 0:
            from slothnb.errors import ConfigError

            raise ConfigError(f"embedding_learning_rate={self.embedding_learning_rate} must be >= 0.")
        if self.bf16 is None:  # trl defaults to bf16, which fails on CPU and pre-Ampere GPUs: only where it works
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()


def is_slothnb_patched(model) -> bool:
    """Whether the CausalLM under any peft wrapper carries slothnb's kernel-patched forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "_slothnb_patched", False) or getattr(model, "_slothnb_patched", False))


def _leave_checkpointing_to_slothnb(model, args) -> None:
    """A model whose checkpointing slothnb's LoRA layer set up keeps it: HF's Trainer (trl defaults to
    gradient_checkpointing=True) would re-enable standard checkpointing and undo the offloaded one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "_slothnb_checkpointing" not in getattr(base, "__dict__", {}):
        return
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if getattr(args, name, None):
            setattr(args, name, False)
            logger.info("slothnb manages gradient checkpointing for this model; %s=False for the Trainer", name)


def embedding_parameter_names(model) -> set[str]:
    """Names of trainable parameters that belong to the input or output embeddings."""
    names = set()
    modules = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            modules.add(id(module))
    for module_name, module in model.named_modules():
        hit = id(module) in modules or any(part in module_name.split(".") for part in EMBEDDING_NAME_PARTS)
        if hit:
            for name, p in module.named_parameters(prefix=module_name):
                if p.requires_grad:
                    names.add(name)
    return names


class SlothTrainer(SFTTrainer):
    def __init__(self, model=None, args: SlothTrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        if args is not None:
            check_max_steps(args.max_steps)
            check_output_dir(args.output_dir)
            text_field = getattr(args, "dataset_text_field", "text")
            formatting = kwargs.get("formatting_func") is not None
            check_dataset(train_dataset, text_field, formatting, "train")
            for name, ds in (eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]):
                check_dataset(ds, text_field, formatting, name)
            _leave_checkpointing_to_slothnb(model, args)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        self.use_model_loss = is_slothnb_patched(self.model)
        self.loss_guard = LossGuard() if getattr(self.args, "guard_loss", True) else None
        if self.loss_guard is not None:
            self.add_callback(_StepEndGuard(self))

    # ---- optimizer -----------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        lr_embed = getattr(self.args, "embedding_learning_rate", None)
        if lr_embed is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        embed = embedding_parameter_names(opt_model)
        groups = {}
        for name, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            key = (name in embed, name in decay)
            groups.setdefault(key, []).append(p)
        param_groups = []
        for (is_embed, is_decay), params in sorted(groups.items()):
            group = {"params": params, "weight_decay": self.args.weight_decay if is_decay else 0.0}
            if is_embed:
                group["lr"] = lr_embed
            param_groups.append(group)
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        logger.info("embedding_learning_rate=%s for %d parameter tensors", lr_embed, len(embed))
        return self.optimizer

    # ---- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.use_model_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs = {**inputs, "use_cache": False}
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        logits = getattr(outputs, "logits", None)
        labels = inputs.get("labels")
        if logits is not None and labels is not None:  # the fused kernel returns no logits: skip the metrics
            with torch.no_grad():
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                mask = shift_labels != -100
                n = mask.sum()
                if n > 0:
                    correct = (shift_logits.argmax(-1) == shift_labels) & mask
                    self._metrics[mode]["mean_token_accuracy"].append((correct.sum() / n).item())
                    logp = torch.log_softmax(shift_logits.float(), dim=-1)
                    entropy = -(logp.exp() * logp).sum(-1)
                    self._metrics[mode]["entropy"].append((entropy[mask].sum() / n).item())
        if mode == "train":
            if "attention_mask" in inputs:
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            elif "position_ids" in inputs:
                self._total_train_tokens += int(inputs["position_ids"].size(1))
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_guard is not None:
            try:
                self.loss_guard.after_micro_batch(loss, self.state.global_step)
            except TrainingStopped:
                self.model.zero_grad(set_to_none=True)  # drop the poisoned gradients; the weights are still good
                self.save_checkpoint_now()
                raise
        return loss

    # ---- checkpoints, interruption ---------------------------------------------------------------
    def save_checkpoint_now(self) -> str:
        """Save ``checkpoint-<global_step>`` (adapter/model, optimizer, scheduler, RNG, trainer state)."""
        self._save_checkpoint(self.model, trial=None)
        path = f"{self.args.output_dir}/checkpoint-{self.state.global_step}"
        self.last_checkpoint = path
        return path

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train; on KeyboardInterrupt save a checkpoint and re-raise (``finetune`` returns cleanly). What is
        alive at the start is frozen out of Python's full collections (``slothnb.python_gc``)."""
        check_trainable_labels(self.train_dataset, getattr(self, "_slothnb_markers", None))
        self.last_checkpoint = None
        python_gc.freeze_for_training()
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        except KeyboardInterrupt:
            if self.optimizer is not None and self.state.global_step > 0:
                path = self.save_checkpoint_now()
                logger.warning("Interrupted at step %d; saved %s (resume with resume_from_checkpoint=...)",
                               self.state.global_step, path)
            raise
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
            raise self._out_of_memory(error) from error

    def _out_of_memory(self, error) -> HardwareError:
        """Free what the failed step held, keep the steps done so far, and say what to change."""
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        saved = ""
        if self.optimizer is not None and self.state.global_step > 0:
            try:
                saved = f" Steps 1-{self.state.global_step} are saved in {self.save_checkpoint_now()}."
            except Exception:  # saving needs memory too; the error below matters more
                saved = " Saving a checkpoint failed as well."
        args = self.args
        return HardwareError(
            f"Out of memory at step {self.state.global_step + 1} (batch {args.per_device_train_batch_size} x "
            f"{getattr(args, 'max_length', None) or 'full'} tokens).{saved} To fit: lower "
            "per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective batch), "
            "lower max_length / max_seq_length, use use_gradient_checkpointing=\"slothnb\", or load the model "
            f"with load_in_4bit=True. ({str(error).splitlines()[0][:200]})")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError text older paths raise for it."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class _StepEndGuard(TrainerCallback):
    """Callback half of the loss guard: checks the finished optimizer step's summed loss."""

    def __init__(self, trainer: SlothTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        try:
            self.trainer.loss_guard.after_optimizer_step(state.global_step)
        except TrainingStopped:
            self.trainer.save_checkpoint_now()
            raise
