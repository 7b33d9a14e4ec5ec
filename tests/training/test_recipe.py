"""finetune(): config validation, LoRA added when missing, history, adapter saved, Ctrl-C returns cleanly."""
import peft
import pytest
from safetensors.torch import load_file
from tiny_models import tiny_model, tiny_tokenizer
from training_helpers import chat_dataset, text_dataset
from transformers import TrainerCallback

from slothnb.errors import ConfigError
from slothnb.training import FinetuneConfig, finetune


def _config(tmp_path, **kw):
    base = dict(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_seq_length=32,
                output_dir=str(tmp_path / "run"), lora_r=4, lora_alpha=8, warmup_steps=0, learning_rate=1e-2,
                use_gradient_checkpointing=False, extra_args={"use_cpu": True, "disable_tqdm": True})
    base.update(kw)
    return FinetuneConfig(**base)


def test_from_mapping_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ConfigError, match=r"Unknown finetune option\(s\) \['lr'\].*learning_rate"):
        FinetuneConfig.from_mapping({"lr": 1e-4})
    assert FinetuneConfig.from_mapping({"max_steps": 5}).max_steps == 5


@pytest.mark.parametrize("bad", [{"max_steps": 0}, {"per_device_train_batch_size": 0}, {"learning_rate": 0},
                                 {"eval_fraction": 1.0}, {"max_steps": None, "num_train_epochs": 0}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        FinetuneConfig(**bad)


def test_finetune_raw_text_adds_lora_and_saves_adapter(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", tokenizer=tok, num_hidden_layers=1)
    result = finetune(model, tok, text_dataset(6, chars=30), _config(tmp_path))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 3 and not result.interrupted
    assert result.metrics["train_loss"] > 0
    assert isinstance(result.trainer.model, peft.PeftModel)
    weights = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained away from zero
    # the default optimizer is the fused AdamW (transformers' own default on recent torch)
    opt = result.trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    assert type(opt).__name__ == "AdamW" and all(g.get("fused") for g in opt.param_groups)


def test_finetune_chat_responses_only_with_eval(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", tokenizer=tok, num_hidden_layers=1)
    config = _config(tmp_path, train_on_responses_only=True, eval_fraction=0.25, max_steps=2, max_seq_length=80)
    result = finetune(model, tok, chat_dataset(8), config)
    labels = result.trainer.train_dataset["labels"][0]
    assert tok.decode([t for t in labels if t != -100]).startswith("It is ")
    assert any("eval_loss" in h for h in result.history) or "eval_loss" in str(result.trainer.evaluate())


def test_finetune_interrupted_returns_result_with_checkpoint(tmp_path):
    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    tok = tiny_tokenizer()
    model = tiny_model("llama", tokenizer=tok, num_hidden_layers=1)
    result = finetune(model, tok, text_dataset(8, chars=20), _config(tmp_path, max_steps=5), callbacks=[CtrlC()])
    assert result.interrupted and result.checkpoint_dir.endswith("checkpoint-2")
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2]
    # resume from the checkpoint with a fresh model: continues to the end
    model = tiny_model("llama", tokenizer=tok, num_hidden_layers=1)
    again = finetune(model, tok, text_dataset(8, chars=20),
                     _config(tmp_path, max_steps=5, resume_from_checkpoint=result.checkpoint_dir))
    assert [h["step"] for h in again.history if "loss" in h] == [1, 2, 3, 4, 5] and not again.interrupted


def test_finetune_accepts_a_dict_config_and_text_files(tmp_path):
    (tmp_path / "play.txt").write_text("Shall I compare thee to a summer's day? " * 3)
    tok = tiny_tokenizer()
    model = tiny_model("llama", tokenizer=tok, num_hidden_layers=1)
    cfg = {"max_steps": 1, "output_dir": str(tmp_path / "r"), "max_seq_length": 16, "packing": True,
           "use_gradient_checkpointing": False, "extra_args": {"use_cpu": True}}
    result = finetune(model, tok, [tmp_path / "play.txt"], cfg)
    assert [h["step"] for h in result.history if "loss" in h] == [1]


def test_finetune_on_pretokenized_windows(tmp_path):
    """The CLI's raw-text path: max_length windows with stride-masked labels, text_field='input_ids'."""
    from slothnb.training import raw_text_dataset

    tok = tiny_tokenizer()
    model = tiny_model("llama", tokenizer=tok, num_hidden_layers=1)
    windows = raw_text_dataset(text_dataset(2), tok, max_length=16, stride=4)
    result = finetune(model, tok, windows, _config(tmp_path, max_steps=2, max_seq_length=16, text_field="input_ids"))
    assert result.trainer.train_dataset["labels"][1][:4] == [-100] * 4  # trl kept the stride mask
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2]
