"""Hub pushes, up to the network call: HfApi is replaced by a recorder that keeps what it was sent."""
import logging
from pathlib import Path

import pytest
from conftest import tiny_lora

import slothnb.saving.hub as hub
from slothnb.errors import ConfigError, HardwareError
from slothnb.saving import attach_saving_methods

TOKEN = "hf_SECRETtoken1234567890abcdef"


class RecordingApi:
    calls = []

    def __init__(self, token=None):
        RecordingApi.calls.append(("init", token))

    def create_repo(self, **kwargs):
        RecordingApi.calls.append(("create_repo", kwargs))

    def upload_folder(self, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        RecordingApi.calls.append(("upload_folder", kwargs, files))
        return "commit-info"


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    return RecordingApi


def _assert_token_nowhere(capsys, caplog, files):
    out, err = capsys.readouterr()
    assert TOKEN not in out + err + caplog.text
    assert all(TOKEN.encode() not in data for data in files.values())


def test_push_merged_uploads_a_saved_folder_without_leaking_the_token(recorder, tokenizer, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    model = attach_saving_methods(tiny_lora(tokenizer))
    assert model.push_to_hub_merged("me/tiny-merged", tokenizer, token=TOKEN) == "commit-info"
    (_, token), (_, create), (_, upload, files) = recorder.calls
    assert token == TOKEN  # the token goes to HfApi and nowhere else
    assert create == {"repo_id": "me/tiny-merged", "private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "me/tiny-merged"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    _assert_token_nowhere(capsys, caplog, files)


def test_push_lora_and_gguf(recorder, tokenizer, capsys, caplog):
    model = attach_saving_methods(tiny_lora(tokenizer))
    model.push_to_hub_merged("me/tiny-lora", tokenizer, save_method="lora", token=TOKEN, private=False)
    assert recorder.calls[1][1]["private"] is False
    assert "adapter_model.safetensors" in recorder.calls[2][2]
    model.push_to_hub_gguf("me/tiny-gguf", tokenizer, quantization_method="q8_0", token=TOKEN)
    files = recorder.calls[-1][2]
    assert list(files) == ["model.Q8_0.gguf"] and files["model.Q8_0.gguf"][:4] == b"GGUF"
    _assert_token_nowhere(capsys, caplog, files)


def test_offline_and_bad_arguments_fail_before_any_work(monkeypatch, tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    RecordingApi.calls = []
    model = tiny_lora(tokenizer)
    with pytest.raises(HardwareError, match="HF_HUB_OFFLINE"):
        hub.push_to_hub_merged(model, "me/x", tokenizer, token=TOKEN)
    with pytest.raises(HardwareError, match="HF_HUB_OFFLINE"):
        hub.push_to_hub_gguf(model, "me/x", tokenizer, token=TOKEN)
    with pytest.raises(ConfigError, match="merged_16bit"):
        hub.push_to_hub_merged(model, "me/x", tokenizer, save_method="gguf")
    with pytest.raises(ConfigError, match="q8_0"):
        hub.push_to_hub_gguf(model, "me/x", tokenizer, quantization_method="q2_k")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ConfigError, match="username/my-model"):
        hub.push_to_hub_merged(model, "a/b/c", tokenizer)
    assert RecordingApi.calls == []
