"""trl's SFTTrainer / DPOTrainer and SlothTrainer on a slothnb (kernel-patched, peft-wrapped) model."""
import datasets
import pytest
import torch
from training_helpers import lora_model, sloth_args, text_dataset

from slothnb.training import SlothTrainer

patching = pytest.importorskip("slothnb.models.patching")
COMMON = dict(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
              save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)


def test_trl_sft_and_dpo_run_on_slothnb_model(tmp_path):
    """trl's own trainers on a kernel-patched peft model: both train (finite loss, adapter moves)."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    common = COMMON

    model, tok = lora_model(seed=3, num_hidden_layers=1)
    assert patching.patch_model(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sft = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=16, **common),
                     train_dataset=text_dataset(2, chars=12), processing_class=tok)
    losses = [h["loss"] for h in sft.train() and sft.state.log_history if "loss" in h]
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    model, tok = lora_model(seed=4, num_hidden_layers=1)
    assert patching.patch_model(model)
    prefs = datasets.Dataset.from_dict({"prompt": ["Yes?", "No?"], "chosen": [" yes", " no"],
                                        "rejected": [" hmm", " nah"]})
    dpo = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=16, **common),
                     train_dataset=prefs, processing_class=tok)
    dpo.train()
    logs = [h for h in dpo.state.log_history if "loss" in h]
    assert len(logs) == 1 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    # the reference is the adapter-disabled model, so the first step starts at the DPO loss log(2)
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=2e-3)
    assert "rewards/margins" in logs[-1]


def test_sloth_trainer_uses_the_patched_model_loss(tmp_path):
    """A patched model's own (fused linear cross-entropy) loss drives SlothTrainer, equal to the
    unpatched model's loss on the same batch, and training logs work without logits."""
    model, tok = lora_model(seed=5, num_hidden_layers=1)
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_steps=1, gradient_accumulation_steps=2,
                                                        max_length=16),
                           train_dataset=text_dataset(4, chars=12), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        reference = model(**batch).loss.item()
    assert patching.patch_model(model)
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_steps=1, gradient_accumulation_steps=2,
                                                        max_length=16),
                           train_dataset=text_dataset(4, chars=12), processing_class=tok)
    assert trainer.use_model_loss
    model.train()
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(reference, rel=1e-4)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))


def test_slothnb_checkpointing_is_not_overridden_by_the_trainer(tmp_path):
    lora = pytest.importorskip("slothnb.models.lora")
    from tiny_models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = lora.get_peft_model(tiny_model("llama", tokenizer=tok, num_hidden_layers=1), r=4,
                                use_gradient_checkpointing="slothnb")
    layer = model.get_base_model().model.layers[0]
    func = layer._gradient_checkpointing_func
    args = sloth_args(tmp_path, max_steps=1, max_length=16, gradient_checkpointing=True)
    trainer = SlothTrainer(model=model, args=args, train_dataset=text_dataset(2, chars=10), processing_class=tok)
    assert not trainer.args.gradient_checkpointing
    trainer.train()
    assert layer._gradient_checkpointing_func is func and layer.gradient_checkpointing
