"""Shared builders for the training tests: a peft-wrapped tiny Llama and small datasets."""
from __future__ import annotations

import datasets
import peft
import torch

from tiny_models import tiny_model, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TEXTS = [
    "To be, or not to be, that is the question.",
    "All the world's a stage.",
    "Now is the winter of our discontent made glorious summer.",
    "The quality of mercy is not strained; it droppeth as the gentle rain.",
    "Friends, Romans, countrymen, lend me your ears.",
    "What's in a name? That which we call a rose.",
    "If music be the food of love, play on.",
    "Brevity is the soul of wit.",
]


def lora_model(seed=0, tok=None, modules_to_save=None, r=4, **config_overrides):
    tok = tok or tiny_tokenizer()
    model = tiny_model("llama", seed=seed, tokenizer=tok, **config_overrides)
    config = peft.LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                             modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, config)
    # non-zero B so the adapter changes outputs and every LoRA weight gets a gradient
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tok


def text_dataset(n=8, chars=None):
    return datasets.Dataset.from_dict({"text": [TEXTS[i % len(TEXTS)][:chars] for i in range(n)]})


def chat_dataset(n=6):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]
    return datasets.Dataset.from_list(rows)


def sloth_args(tmp_path, **kw):
    from slothnb.training import SlothTrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, data_seed=0, max_length=64,
                use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    base.update(kw)
    return SlothTrainingArguments(**base)
