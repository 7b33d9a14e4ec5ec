"""GPU checks of SlothTrainer on a kernel-patched model (skipped without CUDA)."""
import datasets
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from training_helpers import TEXTS, sloth_args
from transformers import TrainerCallback

from slothnb.training import SlothTrainer

pytestmark = pytest.mark.gpu


def _patched_lora(dtype, seed=0, checkpointing=False):
    from slothnb.models.lora import get_peft_model
    from slothnb.models.patching import patch_model

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=seed, dtype=dtype, tokenizer=tok).cuda()
    model = get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=checkpointing, random_state=seed)
    assert patch_model(model)
    return model, tok


def test_bf16_patched_training_lowers_the_loss(tmp_path):
    model, tok = _patched_lora(torch.bfloat16, checkpointing="slothnb")
    # One text repeated: a LoRA that learns at all memorises it within a dozen steps.
    data = datasets.Dataset.from_dict({"text": TEXTS[:1] * 16})
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_steps=12, learning_rate=3e-2, use_cpu=False,
                                                        bf16=True, gradient_accumulation_steps=2, max_length=64),
                           train_dataset=data, processing_class=tok)
    assert trainer.use_model_loss
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


class GradCapture(TrainerCallback):
    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grads(tmp_path, batch, accum):
    model, tok = _patched_lora(torch.float32, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    data = datasets.Dataset.from_dict({"text": [TEXTS[2], "xyz"]})  # uneven lengths
    capture = GradCapture()
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_steps=1, use_cpu=False, learning_rate=0.0,
                                                        per_device_train_batch_size=batch, max_grad_norm=0.0,
                                                        gradient_accumulation_steps=accum),
                           train_dataset=data, processing_class=tok, callbacks=[capture])
    trainer.train()
    return capture.grads


def test_patched_exact_gradient_accumulation(tmp_path):
    one = _grads(tmp_path / "a", batch=2, accum=1)
    acc = _grads(tmp_path / "b", batch=1, accum=2)
    for n in one:  # fp32 Triton kernels (tf32-free reductions): tight, but not bitwise
        torch.testing.assert_close(acc[n], one[n], rtol=2e-3, atol=1e-6, msg=n)
