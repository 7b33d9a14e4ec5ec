"""The plain-Python functions behind the magics (call them from any script or notebook).

    model, tokenizer = load_model("smollm2-135m", max_seq_length=256)
    result = finetune_cell(model, tokenizer, dataset, "max_steps: 20\nlearning_rate: 2e-4")
    text = stream_to_display(result.trainer.model, tokenizer, "To be, or not to be")
    vram_report(plot=True)

Each one shows its output in the richest form the front end supports and returns plain data.
"""
from __future__ import annotations

import dataclasses
import html
import textwrap
import time

import yaml
from transformers import TrainerCallback

from slothnb.errors import ConfigError, TrainingStopped
from slothnb.models.loader import parameter_count
from slothnb.notebook.frontend import choose_renderer
from slothnb.notebook.panel import LivePanel, PanelState, memory_rows_now

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32", "float": "float32", "auto": None}


def parse_dtype(dtype):
    """``"bf16"``/``"float16"``/``"auto"``/a torch dtype -> torch dtype or None (auto)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    return None if DTYPES[key] is None else getattr(torch, DTYPES[key])


def _emit(text: str, html_text: str | None = None, renderer: str | None = None) -> None:
    if html_text is not None and choose_renderer(renderer) != "text":
        from IPython.display import display

        display({"text/html": html_text, "text/plain": text}, raw=True)
    else:
        print(text)


# ---- load ---------------------------------------------------------------------------------------

def describe_model(model) -> str:
    params = parameter_count(model)  # a 4-bit weight by its real shape, not its packed bytes
    p = next(model.parameters())
    patched = getattr(model, "_slothnb_patched", False)
    return (f"{type(model).__name__}: {params / 1e6:.1f}M parameters, {str(p.dtype).replace('torch.', '')} "
            f"on {p.device}, slothnb kernels {'on' if patched else 'off'}")


def load_model(name: str = "smollm2-135m", max_seq_length: int = 2048, load_in_4bit: bool = False, dtype=None,
               show: bool = True, renderer: str | None = None, **kw):
    """``FastLanguageModel.from_pretrained`` plus a one-line summary and the "load" memory stage."""
    from slothnb.fast_language_model import FastLanguageModel
    from slothnb.memory import RECORDER

    if not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ConfigError(f"max_seq_length={max_seq_length!r} must be a positive integer (tokens).")
    model, tokenizer = FastLanguageModel.from_pretrained(name, max_seq_length=max_seq_length, dtype=parse_dtype(dtype),
                                                         load_in_4bit=load_in_4bit, **kw)
    if show:
        rows = [r for r in RECORDER.to_rows() if r["stage"] == "load"][-1:]
        mem = ""
        if rows:
            from slothnb.notebook.plots import memory_value

            value, what = memory_value(rows[0])
            mem = f"; memory after load: {value:.2f} GiB ({what})"
        _emit(f"Loaded {name} -> {describe_model(model)}{mem}", renderer=renderer)
    return model, tokenizer


# ---- finetune -----------------------------------------------------------------------------------

def config_keys() -> list[str]:
    from slothnb.training import FinetuneConfig

    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def parse_finetune_config(text: str) -> dict:
    """The ``%%finetune`` cell body (``key: value`` lines, YAML) -> dict; errors name the line."""
    for number, line in enumerate((text or "").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or line[:1].isspace():
            continue  # blank, comment, or a continuation of the previous key (YAML list/dict)
        key, sep, _ = stripped.partition(":")
        if not sep or not key.strip() or " " in key.strip():
            raise ConfigError(f"line {number}: {stripped!r} is not a 'key: value' line "
                              f"(e.g. 'max_steps: 30'). Valid keys: {', '.join(config_keys())}.")
    try:
        data = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}cannot read the configuration ({getattr(error, 'problem', error)}); "
                          "write one 'key: value' per line.") from None
    if not isinstance(data, dict):
        raise ConfigError("the cell body must be 'key: value' lines, e.g. 'max_steps: 30'.")
    return data


def coerce_numbers(mapping: dict) -> dict:
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``): numeric fields get numbers back,
    and a value that is not a number gets a ConfigError naming the key."""
    from slothnb.training import FinetuneConfig

    types = {f.name: str(f.type) for f in dataclasses.fields(FinetuneConfig)}
    out = dict(mapping)
    for key, value in mapping.items():
        kind = types.get(key, "")
        numeric = kind.startswith(("int", "float")) or kind in ("float | None", "int | None")
        if not numeric or value is None or isinstance(value, bool):
            continue
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: {value!r} is not a number ({kind}).") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number ({kind}).")
        out[key] = int(value) if kind.startswith("int") and float(value).is_integer() else value
    return out


def make_config(config=None, output_dir: str | None = None):
    """A ``FinetuneConfig`` from None, a dict, cell text or a config (``output_dir`` overrides)."""
    from slothnb.training import FinetuneConfig

    if config is None:
        config = FinetuneConfig()
    elif isinstance(config, str):
        config = FinetuneConfig.from_mapping(coerce_numbers(parse_finetune_config(config)))
    elif isinstance(config, dict):
        config = FinetuneConfig.from_mapping(coerce_numbers(config))
    elif not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a FinetuneConfig, a dict or 'key: value' text, not {type(config).__name__}.")
    if output_dir:
        config = dataclasses.replace(config, output_dir=str(output_dir))
    return config


class PanelCallback(TrainerCallback):
    """Feeds trainer events into a ``LivePanel`` (memory is sampled only when the panel redraws)."""

    def __init__(self, panel: LivePanel):
        self.panel = panel

    def _draw(self, force=False):
        if force or self.panel.due():
            self.panel.state.memory_rows = memory_rows_now()
            self.panel.refresh(force=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.panel.state.start(state.max_steps if state.max_steps and state.max_steps > 0 else None)
        self._draw(force=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.panel.state.advance(state.global_step)
        self._draw()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.panel.state.log(state.global_step, logs or {})
        self._draw()


def finetune_cell(model, tokenizer, dataset, config=None, output_dir: str | None = None, renderer: str | None = None,
                  min_interval: float = 0.25):
    """``finetune(...)`` with a live panel. Interrupting keeps the adapter and the history
    (``result.interrupted``); ``result.panel_state`` is the panel's data."""
    from slothnb.training import finetune

    config = make_config(config, output_dir)
    if "disable_tqdm" not in config.extra_args:  # the panel replaces transformers' own progress display
        config = dataclasses.replace(config, extra_args={**config.extra_args, "disable_tqdm": True})
    panel = LivePanel(PanelState(total_steps=config.max_steps), renderer=renderer, min_interval=min_interval)
    panel.state.memory_rows = memory_rows_now()
    panel.show()
    try:
        result = finetune(model, tokenizer, dataset, config, callbacks=[PanelCallback(panel)])
    except KeyboardInterrupt:
        panel.state.status, panel.state.message = "interrupted", "stopped before training began; nothing trained"
        panel.refresh(force=True)
        raise
    except (TrainingStopped, Exception) as error:
        panel.state.status, panel.state.message = "error", str(error).splitlines()[0][:200] if str(error) else ""
        panel.refresh(force=True)
        raise
    panel.state.status = "interrupted" if result.interrupted else "done"
    panel.state.message = f"adapter saved to {result.adapter_dir}"
    panel.state.memory_rows = memory_rows_now()
    panel.refresh(force=True)
    result.panel_state = panel.state
    return result


# ---- generate -----------------------------------------------------------------------------------

def wrap_text(text: str, width: int = 88) -> str:
    """Word-wrap every paragraph to ``width`` columns, keeping the model's own line breaks."""
    return "\n".join(textwrap.fill(line, width=width, replace_whitespace=False, drop_whitespace=True) if line else ""
                     for line in text.split("\n"))


def _text_bundle(text: str) -> dict:
    body = html.escape(text)
    return {"text/plain": text,
            "text/html": f'<pre class="slothnb-generate" style="white-space:pre-wrap">{body}</pre>'}


def stream_to_display(model, tokenizer, prompt, max_new_tokens: int = 128, temperature: float = 0.0, width: int = 88,
                      chat=None, renderer: str | None = None, min_interval: float = 0.1, **gen_kw) -> str:
    """Stream the generated text into one output updated in place, then the speed; returns the text."""
    from slothnb.memory import record_stage
    from slothnb.models.generation import stream

    rich = choose_renderer(renderer) != "text"
    pieces: list[str] = []
    handle, last = None, 0.0
    if rich:
        from IPython.display import display

        handle = display(_text_bundle(""), raw=True, display_id=True)
    for piece in stream(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat,
                        **gen_kw):
        pieces.append(piece)
        if rich and time.monotonic() - last >= min_interval:
            handle.update(_text_bundle(wrap_text("".join(pieces), width)), raw=True)
            last = time.monotonic()
        elif not rich:
            print(piece, end="", flush=True)
    text = "".join(pieces)
    stats = stream.last_stats
    speed = f"[{stats}]" if stats is not None else ""
    if rich:
        handle.update(_text_bundle(wrap_text(text, width) + "\n\n" + speed), raw=True)
    else:
        print("\n" + speed)
    record_stage("generate")
    return text
