"""The magics through a real IPython InteractiveShell (no browser), on a tiny saved llama."""
import base64
import os
import sys
import types

import datasets
import pytest
from IPython.core.interactiveshell import InteractiveShell
from tiny_models import save_tiny_model

from slothnb.errors import ConfigError
from slothnb.memory import RECORDER
from slothnb.notebook import api
from slothnb.notebook.frontend import choose_renderer, detect_frontend
from slothnb.notebook.panel import LivePanel, PanelState, WidgetView, render_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("nb") / "tiny")


@pytest.fixture
def shell(monkeypatch):
    monkeypatch.delenv("SLOTHNB_PANEL", raising=False)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "slothnb")
    RECORDER.reset()
    yield sh
    sh.run_line_magic("unload_ext", "slothnb")
    for name in ("model", "tokenizer", "m", "t", "dataset", "finetune_result"):
        sh.user_ns.pop(name, None)


@pytest.fixture
def loaded(shell, folder):
    shell.run_line_magic("load_model", f"{folder} --max-seq-length 64")
    shell.user_ns["dataset"] = datasets.Dataset.from_dict(
        {"text": [f"The quick brown fox {i} jumps over the lazy dog." for i in range(16)]})
    return shell


def _one_error_line(capsys):
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("slothnb: "), err
    assert "Traceback" not in out + err
    return lines[0]


@pytest.mark.parametrize("magic, kind, options", [
    ("load_model", "line", ["--max-seq-length", "--4bit", "--16bit", "--dtype", "--as"]),
    ("vram", "line", ["--reset", "--stage", "--plot"]),
    ("generate", "line", ["--max-new-tokens", "--temperature", "--model", "--tokenizer"]),
    ("finetune", "cell", ["--model", "--tokenizer", "--dataset", "--output"]),
])
def test_help_lists_every_option(shell, capsys, magic, kind, options):
    if kind == "line":
        shell.run_line_magic(magic, "--help")
    else:
        shell.run_cell_magic(magic, "--help", "max_steps: 1")
    out = capsys.readouterr().out
    assert f"%{magic}" in out
    for option in options:
        assert option in out
    assert "finetune_result" not in shell.user_ns  # --help never runs the magic


def test_load_model_fills_namespace_and_records_load(shell, folder, capsys):
    shell.run_line_magic("load_model", f"{folder} --max-seq-length 64 --dtype fp32 --as m,t")
    ns = shell.user_ns
    assert type(ns["m"]).__name__ == "LlamaForCausalLM" and ns["t"].eos_token == "<|im_end|>"
    assert "model" not in ns
    assert [r["stage"] for r in RECORDER.to_rows()] == ["load"]
    out = capsys.readouterr().out
    assert f"Loaded {folder}" in out and "LlamaForCausalLM" in out and "memory after load" in out


def test_load_summary_counts_a_4bit_weight_by_its_real_shape():
    import torch
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000, bias=False), torch.nn.Linear(1000, 1000, bias=False))
    assert "2.0M parameters, float32 on cpu" in api.describe_model(model)
    packed = torch.nn.Parameter(torch.zeros(500_000, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = types.SimpleNamespace(shape=torch.Size([1000, 1000]))  # bitsandbytes' Params4bit
    model[1].weight = packed
    assert "2.0M parameters" in api.describe_model(model)  # not 1.5M: two 4-bit values a byte


@pytest.mark.parametrize("line, cell, expected", [
    ("load_model --as onlyone", None, "--as wants MODEL_VAR,TOKENIZER_VAR"),
    ("load_model --4bit --16bit", None, "choose one of --4bit and --16bit"),
    ("load_model --dtype int3", None, "dtype 'int3' is not one of"),
    ("load_model /nonexistent/model/folder", None, "/nonexistent/model/folder"),
    ("vram --bogus", None, "unrecognized arguments: --bogus"),
    ("generate --model nope hello", None, "no variable 'nope' (the model)"),
    ("generate", None, "no prompt"),
    ("finetune", "max_steps 3", "line 1: 'max_steps 3' is not a 'key: value' line"),
    ("finetune", "max_steps: 3\nlerning_rate: 1e-4", "Unknown finetune option(s) ['lerning_rate']. Valid options:"),
    ("finetune", "max_steps: [1, 2", "cannot read the configuration"),
    ("finetune", "max_steps: 0", "max_steps"),
    ("finetune", "learning_rate: fast", "learning_rate: 'fast' is not a number"),
    ("finetune --dataset missing", "max_steps: 2", "no variable 'model' (the model)"),
])
def test_bad_input_gives_one_clear_line(shell, capsys, line, cell, expected):
    name, _, rest = line.partition(" ")
    if cell is None:
        shell.run_line_magic(name, rest)
    else:
        shell.run_cell_magic(name, rest, cell)
    assert expected in _one_error_line(capsys)


def test_missing_dataset_named_after_model_and_tokenizer_exist(loaded, capsys):
    capsys.readouterr()
    loaded.run_cell_magic("finetune", "--dataset corpus", "max_steps: 2")
    line = _one_error_line(capsys)
    assert "no variable 'corpus' (the dataset)" in line and "--dataset VAR" in line


def test_finetune_magic_trains_and_returns_result(loaded, tmp_path, capsys):
    body = """
# a comment line
max_steps: 3
learning_rate: 1e-3
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
warmup_steps: 0
max_seq_length: 32
target_modules:
  - q_proj
  - v_proj
"""
    loaded.run_cell_magic("finetune", f"--output {tmp_path / 'run'}", body)
    out = capsys.readouterr().out
    result = loaded.user_ns["finetune_result"]
    assert not result.interrupted and result.output_dir == str(tmp_path / "run")
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert os.path.isfile(os.path.join(result.adapter_dir, "adapter_config.json"))
    assert type(loaded.user_ns["model"]).__name__.startswith("Peft")  # the namespace holds the LoRA model
    state = result.panel_state
    assert state.status == "done" and state.step == 3 and state.losses == losses
    assert state.learning_rates and state.tokens_seen > 0 and state.eta_seconds == 0
    stages = [r["stage"] for r in RECORDER.to_rows()]
    assert stages[:4] == ["load", "lora_added", "train_start", "train_end"]
    assert "[done] step 3/3" in out and "result in `finetune_result`" in out  # text view in a bare shell


def test_interrupt_keeps_adapter_and_history(loaded, tmp_path, monkeypatch, capsys):
    original = api.PanelCallback.on_log

    def interrupt_at_two(self, args, state, control, logs=None, **kw):
        original(self, args, state, control, logs=logs, **kw)
        if state.global_step == 2:
            raise KeyboardInterrupt  # what the kernel's interrupt raises mid-training

    monkeypatch.setattr(api.PanelCallback, "on_log", interrupt_at_two)
    loaded.run_cell_magic("finetune", f"--output {tmp_path / 'stop'}",
                          "max_steps: 6\ngradient_accumulation_steps: 1\nmax_seq_length: 32\nwarmup_steps: 0")
    out = capsys.readouterr().out
    result = loaded.user_ns["finetune_result"]
    assert result.interrupted and "interrupted: adapter and history kept" in out
    assert len([r for r in result.history if "loss" in r]) == 2
    assert os.path.isfile(os.path.join(result.adapter_dir, "adapter_config.json"))
    assert result.panel_state.status == "interrupted" and result.panel_state.losses == [
        r["loss"] for r in result.history if "loss" in r]
    assert result.checkpoint_dir.endswith("checkpoint-2")  # resumable from where it stopped


def test_generate_magic_streams_the_same_text_as_generate(loaded, capsys):
    from slothnb.models.generation import generate

    model, tok = loaded.user_ns["model"], loaded.user_ns["tokenizer"]
    expected = generate(model, tok, "What's up? The fox", max_new_tokens=6, chat=False)
    capsys.readouterr()
    loaded.run_line_magic("generate", "--max-new-tokens 6 --raw What's up? The fox")
    out = capsys.readouterr().out
    assert out.startswith(expected) and " tokens in " in out and "tok/s" in out
    assert RECORDER.to_rows()[-1]["stage"] == "generate"
    loaded.run_cell_magic("generate", "--max-new-tokens 6 --raw", "What's up? The fox\n")
    assert capsys.readouterr().out.startswith(expected)


def test_vram_without_gpu_shows_cpu_and_stages(shell, capsys):
    shell.run_line_magic("vram", "--stage weights")
    out = capsys.readouterr().out
    assert "No CUDA GPU visible" in out and "This process" in out
    assert out.splitlines()[-1].startswith("weights")
    shell.run_line_magic("vram", "--reset")
    assert "(stages cleared)" in capsys.readouterr().out and RECORDER.to_rows() == []
    shell.run_line_magic("vram", "")
    assert "No stage recorded yet" in capsys.readouterr().out


def test_vram_html_has_table_and_bar_chart(shell, monkeypatch):
    from slothnb.notebook.vram import report_html, vram_report

    RECORDER.record("a")
    RECORDER.record("b")
    report = vram_report(show=False)
    page = report_html(report, plot=True)
    assert page.count("<tr>") == 3 and "<td>a</td>" in page and "<td>b</td>" in page
    png = base64.b64decode(page.split("base64,")[1].split('"')[0])
    assert png.startswith(PNG_MAGIC)


def test_panel_state_numbers():
    state = PanelState()
    state.start(10, now=100.0)
    state.log(2, {"loss": 3.0, "learning_rate": 1e-4, "num_tokens": 400}, now=104.0)
    state.log(4, {"loss": 2.5, "learning_rate": 2e-4, "num_tokens": 800}, now=108.0)
    assert state.losses == [3.0, 2.5] and state.loss_steps == [2, 4] and state.learning_rates == [1e-4, 2e-4]
    assert state.tokens_per_second == pytest.approx(100.0)
    assert state.progress == pytest.approx(0.4)
    assert state.eta_seconds == pytest.approx(12.0)  # 6 steps left at 2 s/step
    summary = state.summary()
    assert "step 4/10" in summary and "loss 2.5000" in summary and "100 tok/s" in summary and "ETA 0:12" in summary


def test_rendered_html_has_header_and_two_pngs():
    state = PanelState(title="run <1>")
    state.start(4, now=0.0)
    state.log(1, {"loss": 2.0, "learning_rate": 1e-4}, now=1.0)
    state.memory_rows = [{"stage": "load", "has_gpu": False, "cpu_rss": 2**30}]
    page = render_html(state)
    assert page.startswith('<div class="slothnb-panel">') and "run &lt;1&gt;" in page
    assert 'width:25%' in page  # the progress bar
    images = [part.split('"')[0] for part in page.split("base64,")[1:]]
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert 'class="slothnb-loss-plot"' in page and 'class="slothnb-memory-bars"' in page


def test_live_panel_throttles_to_min_interval(monkeypatch):
    now = [0.0]
    panel = LivePanel(renderer="text", min_interval=0.25, clock=lambda: now[0])
    drawn = []
    panel.view = types.SimpleNamespace(show=lambda s: drawn.append("show"), update=lambda s: drawn.append("update"))
    for i in range(100):  # 100 updates over one second
        now[0] = i * 0.01
        panel.refresh()
    assert drawn[0] == "show" and len(drawn) == 4  # t = 0, 0.25, 0.5, 0.75
    assert panel.refresh(force=True) and len(drawn) == 5


def test_widget_view_holds_pngs_and_classes():
    state = PanelState()
    state.log(1, {"loss": 1.0}, now=1.0)
    view = WidgetView()
    view.update(state)
    assert bytes(view.loss.value).startswith(PNG_MAGIC) and bytes(view.memory.value).startswith(PNG_MAGIC)
    assert "slothnb-panel" in view.box._dom_classes and "step 1/?" in view.header.value


def test_frontend_is_read_from_the_kernel(monkeypatch):
    for name in list(os.environ):
        if name.startswith("VSCODE_") or name in ("KAGGLE_KERNEL_RUN_TYPE", "SLOTHNB_PANEL"):
            monkeypatch.delenv(name)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert detect_frontend(InteractiveShell.instance()).name == "ipython-terminal"
    assert choose_renderer(shell=InteractiveShell.instance()) == "text"
    zmq = type("ZMQInteractiveShell", (), {"kernel": object()})()
    assert detect_frontend(zmq).name == "jupyter" and choose_renderer(shell=zmq) == "widgets"
    monkeypatch.setenv("VSCODE_PID", "1")  # an env var only names a client the kernel says exists
    assert detect_frontend(zmq).name == "vscode"
    assert detect_frontend(InteractiveShell.instance()).name == "ipython-terminal"
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert detect_frontend(InteractiveShell.instance()).name == "colab"
    monkeypatch.setenv("SLOTHNB_PANEL", "html")
    assert choose_renderer(shell=zmq) == "html"
    with pytest.raises(ConfigError, match="not one of widgets, html, text"):
        choose_renderer("fancy")


def test_config_parser_reads_yaml_lists_and_names_bad_lines():
    assert api.parse_finetune_config("max_steps: 5\ntarget_modules:\n  - q_proj\n") == {
        "max_steps": 5, "target_modules": ["q_proj"]}
    with pytest.raises(ConfigError, match="line 2: 'oops' is not"):
        api.parse_finetune_config("max_steps: 5\noops\n")
    config = api.make_config("max_steps: 7\nlearning_rate: 1e-3\nembedding_learning_rate: 5e-5", output_dir="elsewhere")
    assert config.max_steps == 7 and config.output_dir == "elsewhere"
    assert config.learning_rate == 1e-3 and config.embedding_learning_rate == 5e-5  # YAML 1.1 reads 1e-3 as text


def test_wrap_text_keeps_line_breaks():
    text = "word " * 30 + "\n\nshort"
    wrapped = api.wrap_text(text, width=20)
    assert all(len(line) <= 20 for line in wrapped.splitlines())
    assert wrapped.endswith("\n\nshort") and wrapped.split() == text.split()


def test_unload_removes_the_magics(shell):
    shell.run_line_magic("unload_ext", "slothnb")
    assert "vram" not in shell.magics_manager.magics["line"]
    shell.run_line_magic("load_ext", "slothnb")
    assert "finetune" in shell.magics_manager.magics["cell"]
