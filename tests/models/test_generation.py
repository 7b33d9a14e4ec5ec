"""stream/generate against model.generate on a tiny random model (greedy is deterministic)."""
import pytest
import torch
from tiny_models import tiny_model_and_tokenizer, tiny_tokenizer

from slothnb.errors import ConfigError
from slothnb.models.generation import build_prompt_ids, generate, stream


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model_and_tokenizer("qwen3", seed=3)
    model.generation_config.eos_token_id = None  # random weights: never stop early, compare full length
    return model, tok


def reference(model, tok, prompt_ids, n):
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, prompt_ids.shape[1]:].tolist()


def test_stream_pieces_equal_greedy_generate(tiny):
    model, tok = tiny
    ids = build_prompt_ids(tok, "Hello there", chat=False)
    ref_ids = reference(model, tok, ids, 12)
    ref_ids = ref_ids[: ref_ids.index(tok.eos_token_id)] if tok.eos_token_id in ref_ids else ref_ids
    pieces = list(stream(model, tok, "Hello there", max_new_tokens=12, chat=False))
    stats = stream.last_stats
    assert len(pieces) >= 2
    assert "".join(pieces) == tok.decode(ref_ids, skip_special_tokens=True)
    assert generate(model, tok, "Hello there", max_new_tokens=12, chat=False) == "".join(pieces)
    assert stats.prompt_tokens == ids.shape[1] and stats.new_tokens >= len(ref_ids)
    assert stats.seconds > 0 and stats.tokens_per_second > 0 and stats.stop_reason in ("length", "eos")


def test_chat_template_applied_by_default():
    tok = tiny_tokenizer()
    ids = build_prompt_ids(tok, "hi", system="be brief")
    assert tok.decode(ids[0]) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert tok.decode(build_prompt_ids(tok, messages)[0]).endswith("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(build_prompt_ids(tok, "hi", chat=False)[0]) == "hi"


def test_stop_string_cuts_the_text(tiny):
    model, tok = tiny
    full = generate(model, tok, "abc", max_new_tokens=16, chat=False)
    stop = full[5:7]
    cut = generate(model, tok, "abc", max_new_tokens=16, chat=False, stop=[stop, "never-there"])
    assert cut == full[: full.find(stop)] and stream.last_stats.stop_reason == "stop"


def test_early_close_stops_the_worker(tiny):
    import threading

    model, tok = tiny
    gen = stream(model, tok, "abc", max_new_tokens=50, chat=False)
    next(gen)
    gen.close()
    assert not any(t.name == "slothnb-generate" and t.is_alive() for t in threading.enumerate())


def test_errors_in_generate_reach_the_caller(tiny):
    model, tok = tiny
    with pytest.raises(Exception, match="bogus_option|not used by the model|model_kwargs"):
        generate(model, tok, "abc", max_new_tokens=3, chat=False, bogus_option=1)


def test_training_mode_restored(tiny):
    model, tok = tiny
    model.train()
    generate(model, tok, "abc", max_new_tokens=2, chat=False)
    assert model.training
    model.eval()


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(prompt=5), "prompt must be"),
    (dict(chat=False, system="x"), "system="), (dict(chat=False, prompt=[{"role": "user", "content": "x"}]), "messages"),
])
def test_bad_input(tiny, kw, match):
    model, tok = tiny
    kw = {"prompt": "hi", **kw}
    with pytest.raises(ConfigError, match=match):
        generate(model, tok, **kw)


def test_no_chat_template_with_chat_true(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match="no chat template"):
        generate(model, tiny_tokenizer(chat_template=None), "hi", chat=True)
