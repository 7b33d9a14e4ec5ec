"""``%load_ext slothnb``: the magics, thin faces over ``slothnb.notebook.api`` / ``vram``.

Bad input (a missing variable, a wrong option, a malformed config line) prints one line
``slothnb: <what is wrong and what to do>`` to stderr instead of a traceback; ``--help`` on any
magic prints its options.
"""
from __future__ import annotations

import functools
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from slothnb.errors import ConfigError, SlothError


def _complain(message: str) -> None:
    print(f"slothnb: {message}", file=sys.stderr)


def _friendly(func):
    """``--help`` prints the options; SlothError/UsageError become one line on stderr."""

    @functools.wraps(func)
    def wrapper(self, line="", cell=None):
        tokens = line.split()
        if "--help" in tokens or "-h" in tokens:
            print(getattr(wrapper, "parser", None).format_help() if hasattr(wrapper, "parser") else func.__doc__)
            return None
        try:
            return func(self, line, cell) if cell is not None else func(self, line)
        except (SlothError, UsageError) as error:
            _complain(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
            return None
        except KeyboardInterrupt:
            _complain("interrupted.")
            return None

    return wrapper


def _parse(method, line):
    try:
        return parse_argstring(method, line)
    except ValueError as error:  # shlex: an unbalanced quote
        raise UsageError(f"cannot split the options ({error}); check the quotes.") from None


def split_leading_options(line: str, flags=()) -> tuple[str, str]:
    """``"--max-new-tokens 20 What's up?"`` -> (``"--max-new-tokens 20"``, ``"What's up?"``): options
    come first and the prompt is kept verbatim (apostrophes included), not shell-split."""
    rest, options = line.strip(), []
    while rest.startswith("-"):
        token, _, rest = rest.partition(" ")
        options.append(token)
        rest = rest.lstrip()
        if token not in flags and "=" not in token and rest:
            value, _, rest = rest.partition(" ")
            options.append(value)
            rest = rest.lstrip()
    return " ".join(options), rest


@magics_class
class SlothMagics(Magics):
    """Load, fine-tune, inspect memory and generate from a notebook."""

    def _get(self, name: str, what: str, hint: str):
        ns = self.shell.user_ns
        if name not in ns:
            raise ConfigError(f"no variable {name!r} (the {what}) in this notebook: {hint}")
        return ns[name]

    @magic_arguments()
    @argument("name", nargs="?", default="smollm2-135m",
              help="folder, .gguf file, hub name, or smollm2-135m (embedded, default)")
    @argument("--max-seq-length", type=int, default=2048, help="longest sequence to train/generate (tokens)")
    @argument("--4bit", dest="four_bit", action="store_true", help="load the weights in NF4 (QLoRA; needs CUDA)")
    @argument("--16bit", dest="sixteen_bit", action="store_true", help="load in 16-bit (default)")
    @argument("--dtype", default=None, help="bf16 | fp16 | fp32 | auto (default: bf16/fp16 on GPU, fp32 on CPU)")
    @argument("--as", dest="names", default="model,tokenizer", help="MODEL_VAR,TOKENIZER_VAR (default model,tokenizer)")
    @line_magic
    @_friendly
    def load_model(self, line):
        """Load a model and its tokenizer into the notebook (FastLanguageModel.from_pretrained)."""
        args = _parse(SlothMagics.load_model, line)
        if args.four_bit and args.sixteen_bit:
            raise UsageError("choose one of --4bit and --16bit.")
        names = [n.strip() for n in args.names.split(",")]
        if len(names) != 2 or not all(n.isidentifier() for n in names):
            raise UsageError(f"--as wants MODEL_VAR,TOKENIZER_VAR (two Python names), got {args.names!r}.")
        from slothnb.notebook.api import load_model

        model, tokenizer = load_model(args.name, max_seq_length=args.max_seq_length, load_in_4bit=args.four_bit,
                                      dtype=args.dtype)
        self.shell.user_ns[names[0]], self.shell.user_ns[names[1]] = model, tokenizer

    @magic_arguments()
    @argument("--model", default="model", help="variable holding the model (default: model)")
    @argument("--tokenizer", default="tokenizer", help="variable holding the tokenizer (default: tokenizer)")
    @argument("--dataset", default="dataset", help="variable holding the dataset, text file paths or a folder")
    @argument("--output", default=None, help="output folder (adapter, checkpoints); overrides output_dir")
    @argument("--result", default="finetune_result", help="variable that receives the FinetuneResult")
    @cell_magic
    @_friendly
    def finetune(self, line, cell):
        """Fine-tune with LoRA; the cell body is `key: value` lines of FinetuneConfig (max_steps: 30, ...).

        Shows a live panel (loss and learning rate, step/total, tokens/s, ETA, memory). Interrupt the
        kernel to stop: the adapter and the history are kept. The result lands in `finetune_result`.
        """
        args = _parse(SlothMagics.finetune, line)
        from slothnb.notebook.api import finetune_cell, make_config

        config = make_config(cell, args.output)  # config errors before looking at the variables
        hint = "load one with %load_model NAME"
        model = self._get(args.model, "model", hint + " or pass --model VAR.")
        tokenizer = self._get(args.tokenizer, "tokenizer", hint + " or pass --tokenizer VAR.")
        dataset = self._get(args.dataset, "dataset", "set it to a datasets.Dataset, a text file or a folder of "
                                                     "*.txt, or pass --dataset VAR.")
        result = finetune_cell(model, tokenizer, dataset, config)
        self.shell.user_ns[args.result] = result
        if result.trainer is not None:
            self.shell.user_ns[args.model] = result.trainer.model  # now with its LoRA adapter
        note = "interrupted: adapter and history kept" if result.interrupted else "done"
        print(f"{note}; {len(result.history)} log rows; adapter in {result.adapter_dir}; result in `{args.result}`")

    @magic_arguments()
    @argument("--reset", action="store_true", help="forget every recorded stage after showing them")
    @argument("--stage", default=None, help="record a stage with this name first")
    @argument("--plot", action="store_true", help="add a bar chart of memory by stage")
    @line_magic
    @_friendly
    def vram(self, line):
        """GPU memory (nvidia-smi vs PyTorch allocated/reserved/peak, and the gap) and the stages recorded."""
        args = _parse(SlothMagics.vram, line)
        from slothnb.notebook.vram import vram_report

        vram_report(reset=args.reset, stage=args.stage, plot=args.plot)

    @magic_arguments()
    @argument("prompt", nargs="*", help="the prompt, after the options (or the cell body with %%generate)")
    @argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    @argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    @argument("--raw", action="store_true", help="plain text continuation, no chat template")
    @argument("--model", default="model", help="variable holding the model (default: model)")
    @argument("--tokenizer", default="tokenizer", help="variable holding the tokenizer (default: tokenizer)")
    @argument("--width", type=int, default=88, help="wrap the output to this many columns")
    @line_cell_magic
    @_friendly
    def generate(self, line, cell=None):
        """Stream the model's reply into the cell, word-wrapped, with tokens/s at the end."""
        options, line_prompt = split_leading_options(line, flags=("--raw",))
        args = _parse(SlothMagics.generate, options)
        prompt = cell.strip() if cell is not None and cell.strip() else line_prompt
        if not prompt:
            raise UsageError("no prompt: write it after %generate or in the cell body of %%generate.")
        model = self._get(args.model, "model", "load one with %load_model NAME or pass --model VAR.")
        tokenizer = self._get(args.tokenizer, "tokenizer", "load one with %load_model NAME or pass --tokenizer VAR.")
        from slothnb.notebook.api import stream_to_display

        stream_to_display(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          width=args.width, chat=False if args.raw else None)
