"""The ``slothnb`` command line's options: one argparse parser per command, every option with its help.

Kept apart from ``slothnb.cli``, which runs the commands, so the option list reads as one page; the
command functions come in as arguments of ``build_parser``.
"""
from __future__ import annotations

import argparse

def _cuda_graphs_mode(text: str):
    """``--cuda-graphs MODE``: "forward" or "adaptive" as given, on/off words as True/False (the engine's
    ``layer_graphs.choice`` reads the same words; kept here so that ``--help`` needs no torch)."""
    word = text.lower()
    if word in ("forward", "adaptive"):
        return word
    if word in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        return word in ("1", "true", "on", "yes")
    raise argparse.ArgumentTypeError(f"{text!r}: use forward, adaptive, on or off (or --no-cuda-graphs)")


EXAMPLES = """\
examples:
  slothnb finetune --raw-text plays/*.txt --max-steps 60 --output outputs/plays
  slothnb finetune --model Qwen/Qwen2.5-0.5B --4bit --dataset chats.jsonl --train-on-responses-only \\
      --save-method merged_16bit --gguf q8_0 --output outputs/chat
  slothnb generate --model outputs/plays/adapter --raw "ROMEO:"
  slothnb export outputs/chat/adapter --output outputs/chat/export --method merged_16bit --gguf f16
  slothnb demo --max-steps 30

Bad input exits with code 2 and one 'error: ...' line; add --debug for the traceback.
"""
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=100)


def _command(sub, name, run, help, description, epilog=EXAMPLES):
    """A subcommand's parser with the ``--debug`` flag every command takes; ``args.run`` is ``run``."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_formatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    p.set_defaults(run=run)
    return p


def _add_model_options(p: argparse.ArgumentParser, model_help: str | None = None, with_model: bool = True,
                       seq_length: int | None = 512):
    g = p.add_argument_group("model")
    if with_model:
        g.add_argument("--model", "-m", default="smollm2-135m", help=model_help or (
            "a local folder (config.json + *.safetensors), a .gguf file, a Hugging Face hub name, or "
            "'smollm2-135m' (the embedded SmolLM2-135M-Instruct, works offline) (default: %(default)s)"))
    bits = g.add_mutually_exclusive_group()
    bits.add_argument("--4bit", dest="load_in_4bit", action="store_true", default=False,
                      help="QLoRA: load the base weights as NF4 4-bit (bitsandbytes, needs a CUDA GPU)")
    bits.add_argument("--16bit", dest="load_in_4bit", action="store_false",
                      help="load unquantised weights in --dtype (the default)")
    g.add_argument("--max-seq-length", type=int, default=seq_length, metavar="N", help=(
        "tokens per sample; past the model's context RoPE scaling is turned on "
        + ("(default: %(default)s)" if seq_length else "(default: the model's own context, no scaling)")))
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight/compute dtype; auto = bf16 (fp16 on old GPUs) on CUDA, fp32 on CPU (default: auto)")
    g.add_argument("--no-kernels", dest="patch", action="store_false",
                   help="do not bind slothnb's Triton kernels (plain transformers forward; slower, for comparison)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code from the hub")


def _add_finetune_parser(sub, run):
    p = _command(sub, "finetune", run, help="LoRA/QLoRA fine-tune a model on a dataset or raw text",
                 description="Load a model, add LoRA adapters, train, save the adapter (and optionally a "
                             "merged checkpoint and a GGUF), then print memory per stage and throughput.")
    _add_model_options(p)
    d = p.add_argument_group("data (give --dataset or --raw-text)")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", metavar="PATH", help=(
        "a .jsonl/.json/.csv/.parquet file with a text (or chat messages) column, or raw text: a .txt file "
        "or a folder of *.txt"))
    src.add_argument("--raw-text", nargs="+", metavar="FILE", help=(
        "raw text files (or folders of *.txt) for continued pre-training: EOS appended, cut into "
        "--max-seq-length token windows"))
    d.add_argument("--text-field", default="text", metavar="NAME", help="column holding the text (default: text)")
    d.add_argument("--max-samples", type=int, metavar="N", help="train on the first N rows only")
    d.add_argument("--stride", type=int, default=0, metavar="N",
                   help="raw text: tokens of overlap between windows (masked in the later one) (default: 0)")
    c = p.add_argument_group("chat data")
    c.add_argument("--messages-field", metavar="NAME", help=(
        "column of [{role, content}, ...] conversations, or USER,ASSISTANT for two columns of "
        "instruction/response pairs (default: 'messages' when the text field is missing)"))
    c.add_argument("--chat-template", metavar="NAME", help=(
        "chatml, llama-3, zephyr, gemma, or a Jinja string (default: the tokenizer's own)"))
    c.add_argument("--system-prompt", metavar="TEXT", help="system message added to every conversation")
    c.add_argument("--train-on-responses-only", action="store_true",
                   help="mask system/user turns: train on the assistant replies only")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--r", "--lora-r", dest="lora_r", type=int, default=16, metavar="R",
                    help="adapter rank (default: %(default)s)")
    lo.add_argument("--lora-alpha", type=int, default=16, metavar="A", help="scaling numerator (default: %(default)s)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                    help="dropout on the adapter input; 0 keeps the fused kernels (default: %(default)s)")
    lo.add_argument("--target-modules", metavar="NAMES", help=(
        "comma-separated module names, e.g. q_proj,v_proj; embed_tokens/lm_head train whole modules "
        "(default: every attention and MLP projection)"))
    lo.add_argument("--rslora", action="store_true", help="rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r")
    lo.add_argument("--gradient-checkpointing", choices=("slothnb", "true", "false"), default="slothnb",
                    help="slothnb = offloaded checkpointing (least memory), true = plain, false = none (default: slothnb)")
    lo.add_argument("--cuda-graphs", nargs="?", const=True, default=None, type=_cuda_graphs_mode, metavar="MODE", help=(
        "replay each checkpointed layer as CUDA graphs (with --gradient-checkpointing slothnb): much faster "
        "for small, host-bound models, at the cost of a graph memory pool (default on a GPU: on for 0.2-4B-parameter "
        "models, 'forward' above). MODE 'forward': every second layer replays its forward alone, where a slow "
        "host costs a 7-9B step; 'adaptive': as many layers as the host needs (experimental)"))
    lo.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                    help="never replay layers as CUDA graphs")
    t = p.add_argument_group("training")
    t.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: 60, or --epochs when given)")
    t.add_argument("--epochs", type=float, metavar="E", help="train this many passes over the data instead of --max-steps")
    t.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=2e-4, metavar="LR",
                   help="learning rate of the LoRA weights (default: %(default)s)")
    t.add_argument("--embedding-lr", type=float, metavar="LR",
                   help="learning rate of embed_tokens/lm_head when trained (2-10x below --lr)")
    t.add_argument("--batch-size", type=int, default=2, metavar="N", help="samples per micro-batch (default: %(default)s)")
    t.add_argument("--grad-accum", type=int, default=4, metavar="N",
                   help="micro-batches per optimizer step, exact accumulation (default: %(default)s)")
    t.add_argument("--warmup-steps", type=int, default=5, metavar="N", help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--scheduler", default="linear", metavar="NAME",
                   help="learning-rate schedule: linear, cosine, constant, constant_with_warmup... (default: linear)")
    t.add_argument("--weight-decay", type=float, default=0.01, metavar="W", help="AdamW weight decay (default: %(default)s)")
    t.add_argument("--optim", default="adamw_torch_fused", metavar="NAME",
                   help="any transformers optimizer name, e.g. adamw_8bit (default: %(default)s)")
    t.add_argument("--seed", type=int, default=3407, metavar="S", help="seed for LoRA init and data order (default: %(default)s)")
    t.add_argument("--logging-steps", type=int, default=1, metavar="N", help="log the loss every N steps (default: 1)")
    t.add_argument("--save-steps", type=int, metavar="N", help="checkpoint every N steps (default: only at the end/on Ctrl-C)")
    t.add_argument("--eval-fraction", type=float, default=0.0, metavar="F", help="share of rows held out for eval loss")
    t.add_argument("--packing", action="store_true", help="pack short samples into full --max-seq-length rows")
    t.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT (or the latest one in --output when no path is given)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (the loss is still printed)")
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", default="outputs/slothnb", metavar="DIR",
                   help="run folder: checkpoints, adapter/ and exports (default: %(default)s)")
    o.add_argument("--save-method", default="lora", metavar="METHOD",
                   help="lora (adapter only), merged_16bit or merged_4bit (NF4, CUDA) (default: lora)")
    o.add_argument("--gguf", metavar="QUANT", help="also write a GGUF file: f16, bf16, q8_0 or f32")


def _add_generate_parser(sub, run):
    p = _command(sub, "generate", run, help="stream a model's (or adapter's) completion of a prompt to stdout",
                 description="Generate from a model, a merged folder or a LoRA adapter folder (its base model "
                             "is read from adapter_config.json). Text goes to stdout, statistics to stderr.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    _add_model_options(p, model_help="model as for finetune, or an adapter folder (default: %(default)s)",
                       seq_length=None)
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder to apply on --model")
    g = p.add_argument_group("generation")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the chat template (default when the tokenizer has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="continue the prompt as raw text")
    g.add_argument("--system", metavar="TEXT", help="system message (chat mode)")
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default: %(default)s)")
    g.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    g.add_argument("--repetition-penalty", type=float, metavar="X", help="e.g. 1.1 discourages loops")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable); not printed")
    g.add_argument("--seed", type=int, metavar="S", help="seed for sampling")


def _add_export_parser(sub, run):
    p = _command(sub, "export", run, help="write a merged checkpoint and/or a GGUF from an adapter or model folder",
                 description="Load SOURCE (a LoRA adapter folder, whose base comes from adapter_config.json "
                             "or --base-model, or a model folder) and write a merged checkpoint and/or GGUF. Merged weights "
                             "keep the loaded dtype: on CPU 'auto' is float32, so pass --dtype bfloat16 "
                             "there for a 16-bit checkpoint.")
    p.add_argument("source", metavar="SOURCE", help="adapter folder (adapter_config.json) or model folder")
    p.add_argument("--base-model", metavar="MODEL", help="base model of the adapter (default: from adapter_config.json)")
    _add_model_options(p, with_model=False, seq_length=None)
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write into")
    o.add_argument("--method", metavar="METHOD",
                   help="lora, merged_16bit or merged_4bit (NF4, CUDA) (default: merged_16bit; none when only --gguf)")
    o.add_argument("--gguf", metavar="QUANT", help="write <DIR>/<name>.<QUANT>.gguf: f16, bf16, q8_0 or f32")
    o.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard (default: 5GB)")


def _add_demo_parser(sub):
    from slothnb import demo

    p = _command(sub, "demo", demo.run, help="fine-tune the embedded SmolLM2-135M on Shakespeare (python -m slothnb.demo)",
                 description=demo.__doc__.split("\n\n")[0], epilog=None)
    demo.add_arguments(p)


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The ``slothnb`` parser; ``commands`` maps finetune/generate/export to the function each runs
    (as ``args.run``; demo runs ``slothnb.demo.run``)."""
    from slothnb import __version__

    parser = argparse.ArgumentParser(
        prog="slothnb", formatter_class=_formatter, epilog=EXAMPLES,
        description="Fast, memory-frugal LoRA/QLoRA fine-tuning on one GPU (CPU works too). "
                    "Run 'slothnb COMMAND --help' for every option of a command.")
    parser.add_argument("--version", action="version", version=f"slothnb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_finetune_parser(sub, commands["finetune"])
    _add_generate_parser(sub, commands["generate"])
    _add_export_parser(sub, commands["export"])
    _add_demo_parser(sub)
    return parser
