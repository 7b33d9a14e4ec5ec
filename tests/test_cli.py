"""The ``slothnb`` command line on a tiny random Llama saved to disk: help, finetune, generate, export, errors."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slothnb.cli import build_parser, main
from slothnb.errors import DatasetError
from tiny_models import save_tiny_model

TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model("llama", root / "tiny")
    text = root / "plays.txt"
    text.write_text(TEXT)
    return root, model_dir, text


@pytest.fixture(scope="module")
def finetuned(files):
    """One real 2-step CLI run (kernels on, Triton interpreter on CPU), shared by the tests that read its output."""
    root, model_dir, text = files
    out = root / "run"
    capture = _Capture()
    with capture:
        code = main(["finetune", "--model", str(model_dir), "--raw-text", str(text), "--max-seq-length", "64",
                     "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "0",
                     "--lr", "1e-2", "--r", "4", "--output", str(out), "--no-progress", "--seed", "0"])
    return code, capture.out.getvalue(), out


class _Capture:
    """Redirect stdout (module-scoped fixtures cannot use capsys)."""

    def __enter__(self):
        import io

        self.out, self._old = io.StringIO(), sys.stdout
        sys.stdout = self.out

    def __exit__(self, *exc):
        sys.stdout = self._old


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["finetune", "generate", "export", "demo"])
def test_help_documents_every_option(command, capsys):
    sub = _subparsers(build_parser())[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"{command}: {action.dest} has no help"
        for option in action.option_strings:
            assert option in text, f"{command} --help does not list {option}"
    if command != "demo":
        assert "examples:" in text and f"slothnb {command}" in text


def test_top_level_help_lists_commands_through_the_console_script():
    done = subprocess.run([sys.executable, "-m", "slothnb", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("finetune", "generate", "export", "demo", "examples:"):
        assert command in done.stdout


def test_finetune_writes_a_trained_adapter_and_a_summary(finetuned):
    code, out, run = finetuned
    assert code == 0
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        b_norms = [f.get_tensor(k).abs().max().item() for k in f.keys() if "lora_B" in k]
    assert len(b_norms) == 2 * 7  # 2 layers x 7 projections
    assert min(b_norms) > 0, "LoRA B starts at zero: a trained adapter has moved it"
    assert "trained 2 steps in" in out and "tokens/s" in out
    for stage in ("load", "lora_added", "train_end", "saved"):
        assert any(line.startswith(stage + " ") for line in out.splitlines()), f"no memory row {stage}"
    assert f"adapter: {adapter}" in out


def test_generate_streams_the_adapter_models_text(finetuned, files, capsys):
    from slothnb.fast_language_model import FastLanguageModel
    from slothnb.models.generation import generate
    from slothnb.saving import load_adapters

    _, model_dir, _ = files
    adapter = finetuned[2] / "adapter"
    code = main(["generate", "--model", str(adapter), "--raw", "To be", "--max-new-tokens", "6", "--no-kernels"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tokens in" in captured.err  # the statistics line goes to stderr
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256, patch=False)
    expected = generate(load_adapters(model, adapter), tok, "To be", max_new_tokens=6, chat=False)
    assert captured.out == expected + "\n"


def test_export_writes_merged_checkpoint_and_gguf_equal_to_the_adapter(finetuned, files, tmp_path, capsys):
    import gguf
    from transformers import AutoModelForCausalLM

    from slothnb.fast_language_model import FastLanguageModel
    from slothnb.saving import load_adapters

    _, model_dir, _ = files
    adapter, out = finetuned[2] / "adapter", tmp_path / "export"
    code = main(["export", str(adapter), "--output", str(out), "--method", "merged_16bit", "--gguf", "f32",
                 "--no-kernels"])
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    rope = json.loads((out / "config.json").read_text()).get("rope_parameters") or {}
    assert rope.get("rope_type", "default") == "default"  # loading for export scaled nothing
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base, _ = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256, patch=False)
    lora = load_adapters(base, adapter).eval()
    ids = torch.tensor([[5, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora(ids).logits, atol=1e-4, rtol=1e-4)
    ggufs = list(out.glob("*.F32.gguf"))
    assert len(ggufs) == 1
    reader = gguf.GGUFReader(str(ggufs[0]))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert any(t.name == "blk.0.attn_q.weight" for t in reader.tensors)


def _error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def test_dataset_without_the_text_field(files, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"content": "hello"}\n{"content": "world"}\n')
    _error(capsys, ["finetune", "--model", str(files[1]), "--dataset", str(data), "--output", str(tmp_path / "o")],
           "no 'text' field", "content", "--text-field")


def test_empty_dataset(files, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    _error(capsys, ["finetune", "--model", str(files[1]), "--dataset", str(data), "--output", str(tmp_path / "o")],
           "empty")
    (tmp_path / "blank.txt").write_text("  \n")
    _error(capsys, ["finetune", "--raw-text", str(tmp_path / "blank.txt"), "--output", str(tmp_path / "o")],
           "No text found")


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_max_steps_not_positive(files, steps, capsys, tmp_path):
    _error(capsys, ["finetune", "--raw-text", str(files[2]), "--max-steps", steps, "--output", str(tmp_path)],
           f"max_steps={steps}")


def test_unwritable_output_directory(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _error(capsys, ["finetune", "--raw-text", str(files[2]), "--output", str(blocker / "run")], "not writable")
    _error(capsys, ["export", str(files[1]), "--output", str(blocker / "x")], "Cannot write")


def test_unknown_export_method_and_quantization(files, tmp_path, capsys):
    _error(capsys, ["export", str(files[1]), "--output", str(tmp_path), "--method", "zip"],
           "Unknown save_method 'zip'", "merged_16bit")
    _error(capsys, ["export", str(files[1]), "--output", str(tmp_path), "--gguf", "q3_xyz"], "q3_xyz", "q8_0")
    _error(capsys, ["finetune", "--raw-text", str(files[2]), "--output", str(tmp_path), "--save-method", "fp8"],
           "Unknown save_method")
    assert not list(tmp_path.glob("*.safetensors"))


def test_unknown_model_path(files, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    _error(capsys, ["finetune", "--model", missing, "--raw-text", str(files[2]), "--output", str(tmp_path / "o")],
           "no_such_model", "does not exist")
    _error(capsys, ["generate", "--model", missing, "hi"], "does not exist")
    _error(capsys, ["export", missing, "--output", str(tmp_path / "e")], "does not exist")


def test_responses_only_needs_chat_data(files, tmp_path, capsys):
    _error(capsys, ["finetune", "--raw-text", str(files[2]), "--train-on-responses-only", "--output", str(tmp_path)],
           "--train-on-responses-only needs chat data")


def test_debug_shows_the_exception(files, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"content": "x"}\n')
    with pytest.raises(DatasetError):
        main(["--debug", "finetune", "--dataset", str(data), "--output", str(tmp_path / "o")])
    with pytest.raises(DatasetError):
        main(["finetune", "--dataset", str(data), "--output", str(tmp_path / "o"), "--debug"])


def test_chat_rows_are_rendered_with_the_template(tmp_path):
    """--dataset with a messages column (auto-detected) and a named template becomes ChatML text rows."""
    from slothnb.cli import check_fields, prepare_dataset, read_dataset
    from tiny_models import tiny_chat_dataset_rows, tiny_tokenizer

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in tiny_chat_dataset_rows(3)) + "\n")
    args = build_parser().parse_args(["finetune", "--dataset", str(data), "--chat-template", "zephyr",
                                      "--max-samples", "2"])
    rows = read_dataset(args.dataset)
    field = check_fields(rows, args)
    assert field == "messages"
    tok = tiny_tokenizer()
    out = prepare_dataset(args, tok, rows, field)
    assert len(out) == 2
    assert out[1]["text"].startswith("<|user|>\nWhat is 1 plus 1?" + tok.eos_token)
    assert "<|assistant|>\n1 plus 1 is 2." in out[1]["text"]
    pair = build_parser().parse_args(["finetune", "--dataset", str(data), "--messages-field", "question,answer"])
    with pytest.raises(DatasetError, match="no 'question' field"):
        check_fields(rows, pair)


def test_raw_text_becomes_full_token_windows(files):
    from slothnb.cli import prepare_dataset
    from tiny_models import tiny_tokenizer

    args = build_parser().parse_args(["finetune", "--raw-text", str(files[2]), "--max-seq-length", "64"])
    tok = tiny_tokenizer()
    rows = prepare_dataset(args, tok, None, None)
    ids = tok(TEXT)["input_ids"] + [tok.eos_token_id]
    assert [len(r) for r in rows["input_ids"]][:-1] == [64] * (len(ids) // 64)
    assert sum(rows["input_ids"], []) == ids  # every token once, in order, EOS at the end


def test_resolve_adapter_reads_the_base_model(tmp_path):
    from slothnb.cli import resolve_adapter
    from slothnb.errors import ModelNotFoundError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    assert resolve_adapter(str(tmp_path)) == ("/models/base", Path(tmp_path))
    assert resolve_adapter(str(tmp_path), base_model="other") == ("other", Path(tmp_path))
    assert resolve_adapter("smollm2-135m") == ("smollm2-135m", None)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="--base-model"):
        resolve_adapter(str(tmp_path))


def test_finetune_chat_jsonl_on_responses_only(files, tmp_path, capsys):
    """A chat dataset through the whole command: template, response-only labels, 1 step, adapter saved."""
    from tiny_models import tiny_chat_dataset_rows

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in tiny_chat_dataset_rows(6)) + "\n")
    out = tmp_path / "chat_run"
    code = main(["finetune", "--model", str(files[1]), "--dataset", str(data), "--train-on-responses-only",
                 "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--max-seq-length", "64",
                 "--output", str(out), "--no-progress", "--no-kernels"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trained 1 step in" in captured.out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cuda_graphs_flag_reaches_the_recipe_and_the_model(monkeypatch):
    from slothnb.cli import _finetune_config
    from slothnb.training import recipe

    args = build_parser().parse_args(["finetune", "--dataset", "x.jsonl", "--cuda-graphs"])
    config = _finetune_config(args)
    assert config.cuda_graphs is True and config.use_gradient_checkpointing == "slothnb"
    assert _finetune_config(build_parser().parse_args(["finetune", "--dataset", "x.jsonl"])).cuda_graphs is None
    assert _finetune_config(build_parser().parse_args(["finetune", "--dataset", "x.jsonl",
                                                       "--no-cuda-graphs"])).cuda_graphs is False
    seen = {}
    monkeypatch.setattr("slothnb.models.lora.get_peft_model", lambda model, **kw: seen.update(kw) or model)
    recipe._add_lora(object(), config)
    assert seen["cuda_graphs"] is True
    forward = _finetune_config(build_parser().parse_args(["finetune", "--cuda-graphs", "Forward", "--dataset", "x.jsonl"]))
    assert forward.cuda_graphs == "forward"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--dataset", "x.jsonl", "--cuda-graphs", "backward"])
