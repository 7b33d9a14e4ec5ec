"""Bad input gives a clear error; NaN / zero losses stop with TrainingStopped; Ctrl-C saves and resumes."""
import math
import os

import datasets
import pytest
import torch
from training_helpers import lora_model, sloth_args, text_dataset
from transformers import TrainerCallback

from slothnb.errors import ConfigError, DatasetError, HardwareError, TrainingStopped
from slothnb.training import SlothTrainer, SlothTrainingArguments, check_trainable_labels


def _trainer(tmp_path, data=None, **kw):
    model, tok = lora_model(seed=0, num_hidden_layers=1)
    return SlothTrainer(model=model, args=sloth_args(tmp_path, max_length=24, **kw),
                        train_dataset=text_dataset(4, chars=20) if data is None else data, processing_class=tok)


def test_missing_text_field_names_the_fields(tmp_path):
    data = datasets.Dataset.from_dict({"content": ["a"], "meta": [1]})
    with pytest.raises(DatasetError, match=r"no 'text' field.*\['content', 'meta'\]"):
        _trainer(tmp_path, data)


def test_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        _trainer(tmp_path, datasets.Dataset.from_dict({"text": []}))


@pytest.mark.parametrize("steps", [0, -2])
def test_bad_max_steps(tmp_path, steps):
    with pytest.raises(ConfigError, match="max_steps"):
        SlothTrainingArguments(output_dir=str(tmp_path), max_steps=steps)
    SlothTrainingArguments(output_dir=str(tmp_path), max_steps=-1)  # HF's "unset" stays valid


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        _trainer(tmp_path, output_dir=str(blocker / "out"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            _trainer(tmp_path, output_dir=str(locked))


def test_all_labels_masked_is_refused_before_training(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train_dataset = trainer.train_dataset.map(lambda r: {"labels": [-100] * len(r["input_ids"])})
    with pytest.raises(DatasetError, match=r"4 of the 4 samples .* every label masked"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_mostly_trainable_dataset_passes_the_check():
    rows = {"labels": [[-100, -100, 5, 6]] * 3 + [[-100] * 4]}
    with pytest.warns(UserWarning, match="1 of 4 samples"):
        check_trainable_labels(datasets.Dataset.from_dict(rows))


class PoisonLoss(TrainerCallback):
    """Makes the model's embedding output NaN from step `at` on (loss NaN before the optimizer step)."""

    def __init__(self, model, at):
        self.model, self.at = model, at

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.at:
            emb = self.model.get_input_embeddings()
            emb.register_forward_hook(lambda m, i, out: out * float("nan"))


def test_nan_loss_stops_and_keeps_finite_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.add_callback(PoisonLoss(trainer.model, at=2))
    with pytest.raises(TrainingStopped, match="nan"):
        trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "trainer_state.json").exists()
    from safetensors.torch import load_file

    weights = load_file(ckpt / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_zero_loss_step_stops(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.use_model_loss = True
    real = trainer.compute_loss

    def zero_after_first(model, inputs, **kw):
        loss = real(model, inputs, **kw)
        return loss * 0 if trainer.state.global_step >= 1 else loss

    trainer.compute_loss = zero_after_first
    with pytest.raises(TrainingStopped, match="exactly 0"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").exists()


class InterruptAt(TrainerCallback):
    """Ctrl-C as step `step + 1` begins (after step `step` was logged)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _run(tmp_path, interrupt_at=None, resume=None):
    model, tok = lora_model(seed=7, num_hidden_layers=1)
    data = text_dataset(12, chars=24)
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_steps=6, max_length=24, learning_rate=5e-3,
                                                        warmup_steps=2, save_strategy="no"),
                           train_dataset=data, processing_class=tok,
                           callbacks=[InterruptAt(interrupt_at)] if interrupt_at else [])
    if interrupt_at:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    else:
        trainer.train(resume_from_checkpoint=resume)
    return trainer, {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_interrupt_saves_checkpoint_and_resume_continues_the_curve(tmp_path):
    _, full = _run(tmp_path / "full")
    stopped, partial = _run(tmp_path / "cut", interrupt_at=3)
    assert stopped.last_checkpoint.endswith("checkpoint-3")
    assert sorted(partial) == [1, 2, 3]
    _, resumed = _run(tmp_path / "cut", resume=stopped.last_checkpoint)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # the restored trainer state keeps the earlier log
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    assert not math.isclose(full[4], full[6], rel_tol=1e-3)  # the curve moves, so the match means something


class OutOfMemoryAt(TrainerCallback):
    """The GPU runs out of memory as step `step + 1` begins."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_keeps_the_steps_done_and_says_what_to_change(tmp_path):
    model, tok = lora_model(seed=7, num_hidden_layers=1)
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_steps=6, max_length=24),
                           train_dataset=text_dataset(12, chars=24), processing_class=tok,
                           callbacks=[OutOfMemoryAt(2)])
    with pytest.raises(HardwareError, match="Out of memory at step 3") as info:
        trainer.train()
    message = str(info.value)
    assert "per_device_train_batch_size" in message and "load_in_4bit" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert trainer.last_checkpoint.endswith("checkpoint-2")
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").exists()
