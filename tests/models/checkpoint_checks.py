"""Shared by the tests of what a checkpoint's recompute may skip (test_recompute_skip, test_carry):
a tiny LoRA model with every layer but the last offload-checkpointed, one loss + gradients, and a spy."""
import torch
from peft import LoraConfig, get_peft_model

from slothnb.models.checkpointing import apply_gradient_checkpointing
from slothnb.models.patching import patch_model
from tiny_models import tiny_model


def checkpointed_lora_model(arch, layers=2, device="cpu"):
    model = tiny_model(arch, seed=0, num_hidden_layers=layers).to(device).train()
    patch_model(model)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
    model = get_peft_model(model, cfg)
    apply_gradient_checkpointing(model, "slothnb")  # every layer but the last offload-checkpointed
    return model


def loss_and_grads(model, seq=16, device="cpu"):
    """One forward + backward on fixed ids (bf16 autocast on CUDA): the loss and every LoRA gradient."""
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def spy(monkeypatch, cls, index):
    """Records argument ``index`` of every ``cls.forward`` call (an autograd Function's, after ctx)."""
    seen = []
    real = cls.forward
    monkeypatch.setattr(cls, "forward", staticmethod(lambda ctx, *a: seen.append(a[index]) or real(ctx, *a)))
    return seen
