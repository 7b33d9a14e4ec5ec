"""SlothTrainer: optimizer groups, exact gradient accumulation, packing, trl trainers on slothnb models."""
import datasets
import pytest
import torch
from training_helpers import lora_model, sloth_args, text_dataset
from transformers import TrainerCallback

from slothnb.training import SlothTrainer


def test_embedding_learning_rate_groups(tmp_path):
    model, tok = lora_model(modules_to_save=["embed_tokens", "lm_head"])
    args = sloth_args(tmp_path, learning_rate=2e-4, embedding_learning_rate=5e-5, weight_decay=0.1)
    trainer = SlothTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tok)
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], set()).update(names[id(p)] for p in g["params"])
    assert set(by_lr) == {2e-4, 5e-5}
    embed = by_lr[5e-5]
    assert embed and all("embed_tokens" in n or "lm_head" in n for n in embed)
    assert all("modules_to_save" in n for n in embed)  # the trainable copies, not the frozen originals
    assert all("lora_" in n for n in by_lr[2e-4])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert embed | by_lr[2e-4] == trainable
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.1} or decays == {0.0, 0.1}


def test_no_embedding_lr_keeps_trl_groups(tmp_path):
    model, tok = lora_model()
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path), train_dataset=text_dataset(), processing_class=tok)
    assert {g["lr"] for g in trainer.create_optimizer().param_groups} == {1e-3}


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _grads_after_one_step(tmp_path, batch, accum, model_loss):
    model, tok = lora_model(seed=1)
    if model_loss:
        model.get_base_model().__dict__["_slothnb_patched"] = True  # take the model-loss path
    data = datasets.Dataset.from_dict({"text": ["a b c d e f g h i j k l m n o p", "xyz"]})  # uneven lengths
    capture = GradCapture()
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_steps=1, per_device_train_batch_size=batch,
                                                        gradient_accumulation_steps=accum, learning_rate=0.0),
                           train_dataset=data, processing_class=tok, callbacks=[capture])
    assert trainer.use_model_loss is model_loss
    import gc

    gc.unfreeze()  # a test may train twice
    trainer.train()
    assert gc.get_freeze_count() > 10_000  # what was alive at the start is out of full collections
    return capture.grads, trainer


@pytest.mark.parametrize("model_loss", [True, False], ids=["model-loss", "trl-fused"])
def test_exact_gradient_accumulation(tmp_path, model_loss):
    one, _ = _grads_after_one_step(tmp_path, batch=2, accum=1, model_loss=model_loss)
    acc, trainer = _grads_after_one_step(tmp_path, batch=1, accum=2, model_loss=model_loss)
    assert one.keys() == acc.keys() and len(one) > 0
    for n in one:
        torch.testing.assert_close(acc[n], one[n], rtol=1e-5, atol=1e-7, msg=n)
    # the naive per-micro-batch mean would differ (so the check above can fail)
    model = trainer.model
    model.zero_grad()
    for text in ["a b c d e f g h i j k l m n o p", "xyz"]:
        ids = trainer.processing_class(text + trainer.processing_class.eos_token, return_tensors="pt")["input_ids"]
        (model(input_ids=ids, labels=ids).loss / 2).backward()
    name = next(n for n in one if "lora_B" in n)
    naive = dict(model.named_parameters())[name].grad
    assert not torch.allclose(naive, one[name], rtol=1e-3, atol=0)


def _loss_of_single_batch(tmp_path, model_loss=False, **kw):
    model, tok = lora_model(seed=2)
    if model_loss:
        model.get_base_model().__dict__["_slothnb_patched"] = True
    data = text_dataset(4)
    kw.setdefault("max_length", 128)
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, per_device_train_batch_size=4, **kw),
                           train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        return trainer.compute_loss(model, batch).item(), batch


@pytest.mark.parametrize("model_loss", [True, False], ids=["model-loss", "trl-fused"])
@pytest.mark.parametrize("kw", [{"packing": True}, {"padding_free": True, "max_length": None}],
                         ids=["packing", "padding-free"])
def test_packed_loss_equals_unpacked(tmp_path, kw, model_loss):
    plain, plain_batch = _loss_of_single_batch(tmp_path / "a", model_loss)
    packed, batch = _loss_of_single_batch(tmp_path / "b", model_loss, **kw)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one padding-free row
    pos = batch["position_ids"][0]
    assert int((pos == 0).sum()) == 4  # positions restart for each of the 4 sequences
    assert plain_batch["input_ids"].shape[0] == 4
    assert packed == pytest.approx(plain, rel=1e-5)
