"""The ``slothnb`` command line: ``finetune``, ``generate``, ``export`` and ``demo``.

A thin face over the Python API: every option maps onto one argument of ``FastLanguageModel``,
``FinetuneConfig`` or the savers, and every check is the engine's own. Bad input (a ``SlothError``)
prints one ``error: ...`` line on stderr and exits with code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slothnb.errors import ConfigError, DatasetError, HardwareError, ModelNotFoundError, SlothError

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
STRUCTURED_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DTYPES = ("auto", "bfloat16", "float16", "float32")


# ---- parser -------------------------------------------------------------------------------------
def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=100)


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


def _add_finetune_parser(sub):
    p = sub.add_parser("finetune", help="LoRA/QLoRA fine-tune a model on a dataset or raw text",
                       description="Load a model, add LoRA adapters, train, save the adapter (and optionally a "
                                   "merged checkpoint and a GGUF), then print memory per stage and throughput.",
                       epilog=EXAMPLES, formatter_class=_formatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
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
    t.add_argument("--optim", default="adamw_torch", metavar="NAME",
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
    p.set_defaults(run=cmd_finetune)


def _add_generate_parser(sub):
    p = sub.add_parser("generate", help="stream a model's (or adapter's) completion of a prompt to stdout",
                       description="Generate from a model, a merged folder or a LoRA adapter folder (its base model "
                                   "is read from adapter_config.json). Text goes to stdout, statistics to stderr.",
                       epilog=EXAMPLES, formatter_class=_formatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
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
    p.set_defaults(run=cmd_generate)


def _add_export_parser(sub):
    p = sub.add_parser("export", help="write a merged checkpoint and/or a GGUF from an adapter or model folder",
                       description="Load SOURCE (a LoRA adapter folder, whose base comes from adapter_config.json "
                                   "or --base-model, or a model folder) and write a merged checkpoint and/or GGUF. Merged weights "
                                   "keep the loaded dtype: on CPU 'auto' is float32, so pass --dtype bfloat16 "
                                   "there for a 16-bit checkpoint.",
                       epilog=EXAMPLES, formatter_class=_formatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    p.add_argument("source", metavar="SOURCE", help="adapter folder (adapter_config.json) or model folder")
    p.add_argument("--base-model", metavar="MODEL", help="base model of the adapter (default: from adapter_config.json)")
    _add_model_options(p, with_model=False, seq_length=None)
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write into")
    o.add_argument("--method", metavar="METHOD",
                   help="lora, merged_16bit or merged_4bit (NF4, CUDA) (default: merged_16bit; none when only --gguf)")
    o.add_argument("--gguf", metavar="QUANT", help="write <DIR>/<name>.<QUANT>.gguf: f16, bf16, q8_0 or f32")
    o.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard (default: 5GB)")
    p.set_defaults(run=cmd_export)


def _add_demo_parser(sub):
    from slothnb import demo

    p = sub.add_parser("demo", help="fine-tune the embedded SmolLM2-135M on Shakespeare (python -m slothnb.demo)",
                       description=demo.__doc__.split("\n\n")[0], formatter_class=_formatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)


def build_parser() -> argparse.ArgumentParser:
    from slothnb import __version__

    parser = argparse.ArgumentParser(
        prog="slothnb", formatter_class=_formatter, epilog=EXAMPLES,
        description="Fast, memory-frugal LoRA/QLoRA fine-tuning on one GPU (CPU works too). "
                    "Run 'slothnb COMMAND --help' for every option of a command.")
    parser.add_argument("--version", action="version", version=f"slothnb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_finetune_parser(sub)
    _add_generate_parser(sub)
    _add_export_parser(sub)
    _add_demo_parser(sub)
    return parser


# ---- shared steps -------------------------------------------------------------------------------
def load_model(name, args, adapter=None):
    """``(model, tokenizer)`` via FastLanguageModel; an adapter folder as ``name`` brings its base model."""
    from slothnb.fast_language_model import FastLanguageModel

    name, adapter = resolve_adapter(name, adapter, getattr(args, "base_model", None))
    model, tokenizer = FastLanguageModel.from_pretrained(
        name, max_seq_length=args.max_seq_length or model_context(name), dtype=None if args.dtype == "auto" else args.dtype,
        load_in_4bit=args.load_in_4bit, patch=args.patch, trust_remote_code=args.trust_remote_code)
    if adapter is not None:
        from slothnb.saving import attach_saving_methods, load_adapters

        model = attach_saving_methods(load_adapters(model, adapter))
    return model, tokenizer


def model_context(name) -> int:
    """The trained context of a local model folder (so loading it scales nothing), else 2048."""
    config = Path(str(name)).expanduser() / "config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(length, int) and length > 0:
            return length
    return 2048


def resolve_adapter(name, adapter=None, base_model=None):
    """(base model name, adapter folder or None): an adapter folder stands for its base + itself."""
    path = Path(str(name)).expanduser()
    if adapter is None and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        adapter = path
    if adapter is None:
        return name, None
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json).")
    if base_model is None and Path(adapter) != path:
        base_model = name
    base_model = base_model or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base_model:
        raise ModelNotFoundError(f"{config_file} does not name its base model; pass --base-model.")
    return base_model, Path(adapter)


def read_dataset(path):
    """A structured file as a ``datasets.Dataset``; None for raw text (a .txt file or a folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"Dataset {p} does not exist. Pass a .jsonl/.json/.csv/.parquet/.txt file or a folder.")
    if p.is_dir() or p.suffix.lower() == ".txt":
        return None
    kind = STRUCTURED_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DatasetError(f"Cannot read {p.name}: use a .jsonl, .json, .csv, .parquet or .txt file, "
                           "or a folder of .txt files.")
    empty = DatasetError(f"The dataset {p} is empty (0 rows). Check the file, or point --dataset at another one.")
    if p.stat().st_size == 0:
        raise empty
    import datasets

    try:
        data = datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as error:  # malformed JSON/CSV comes in many exception types
        raise DatasetError(f"Could not read {p} as {kind}: {str(error).splitlines()[0]}") from error
    if len(data) == 0:
        raise empty
    return data


def _messages_field(args):
    field = args.messages_field
    return tuple(f.strip() for f in field.split(",")) if field and "," in field else field


def check_fields(data, args):
    """Raise DatasetError unless ``data`` has the text column or chat columns (before the model loads)."""
    names = data.column_names
    field = _messages_field(args)
    if field is None and args.text_field not in names and "messages" in names:
        field = "messages"
    if field is None:
        if args.text_field not in names:
            raise DatasetError(f"The dataset has no '{args.text_field}' field; its fields are {names}. Pass "
                               "--text-field <one of them>, or --messages-field for chat conversations.")
        return None
    for f in [field] if isinstance(field, str) else field:
        if f not in names:
            raise DatasetError(f"The dataset has no '{f}' field; its fields are {names}. Pass --messages-field "
                               "<column> (or USER,ASSISTANT for two columns).")
    return field


def prepare_dataset(args, tokenizer, data, chat_field):
    """The training rows: chat rendered to text, raw text cut into token windows."""
    from slothnb.training import apply_chat_template, raw_text_dataset

    if data is None:
        files = args.raw_text or [args.dataset]
        data = raw_text_dataset(files, tokenizer, max_length=args.max_seq_length, stride=args.stride)
    elif chat_field is not None:
        data = apply_chat_template(data, tokenizer, chat_field, template=args.chat_template,
                                   system_prompt=args.system_prompt, text_field=args.text_field)
    if args.max_samples is not None:
        data = data.select(range(min(args.max_samples, len(data))))
    return data


def throughput(result, seconds: float | None = None) -> dict:
    """Steps, tokens and speed of a ``FinetuneResult`` (tokens are the non-padding tokens seen)."""
    trainer = result.trainer
    runtime = result.metrics.get("train_runtime") or seconds or 0.0
    tokens = getattr(trainer, "_total_train_tokens", 0) or max(
        (row.get("num_tokens", 0) for row in result.history), default=0)
    losses = [row["loss"] for row in result.history if "loss" in row]
    return {"steps": trainer.state.global_step if trainer is not None else 0, "seconds": float(runtime),
            "tokens": int(tokens), "tokens_per_second": tokens / runtime if runtime else 0.0,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def format_throughput(stats: dict) -> str:
    loss = ""
    if stats["first_loss"] is not None:
        loss = f"; loss {stats['first_loss']:.4f} -> {stats['last_loss']:.4f}"
    return (f"trained {stats['steps']} step{'s' if stats['steps'] != 1 else ''} in {stats['seconds']:.1f} s: {stats['tokens']:,} tokens, "
            f"{stats['tokens_per_second']:,.1f} tokens/s{loss}")


def print_memory_table(file=None) -> None:
    from slothnb.memory import RECORDER

    print("\nmemory per stage (GiB; GPU columns are '-' without a GPU):", file=file or sys.stdout)
    print(RECORDER.format_table(), file=file or sys.stdout)


def _check_outputs(save_method, gguf):
    from slothnb.saving.gguf_export import check_quantization_method
    from slothnb.saving.merged import check_save_method

    if save_method is not None:
        check_save_method(save_method)
    if gguf is not None:
        check_quantization_method(gguf)
    import torch

    if save_method == "merged_4bit" and not torch.cuda.is_available():
        raise HardwareError("save method merged_4bit re-quantises with bitsandbytes, which needs a CUDA GPU; "
                            "use merged_16bit on this machine.")


# ---- commands -----------------------------------------------------------------------------------
def _finetune_config(args):
    from slothnb.training import FinetuneConfig

    max_steps = args.max_steps if args.max_steps is not None else (None if args.epochs else 60)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    extra = {"disable_tqdm": True} if args.no_progress else {}
    return FinetuneConfig(
        max_steps=max_steps, num_train_epochs=args.epochs or 1.0, learning_rate=args.learning_rate,
        embedding_learning_rate=args.embedding_lr, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.scheduler, weight_decay=args.weight_decay, optim=args.optim,
        logging_steps=args.logging_steps, save_steps=args.save_steps, seed=args.seed,
        max_seq_length=args.max_seq_length, packing=args.packing, text_field=args.text_field,
        output_dir=args.output, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, use_gradient_checkpointing={"true": True, "false": False}.get(
            args.gradient_checkpointing, args.gradient_checkpointing),
        train_on_responses_only=args.train_on_responses_only, eval_fraction=args.eval_fraction,
        resume_from_checkpoint=args.resume, extra_args=extra)


def cmd_finetune(args) -> int:
    from slothnb.training.chat import set_chat_template
    from slothnb.training.guards import check_output_dir

    # Everything that can be checked without the model is checked first: a typo costs seconds, not a load.
    config = _finetune_config(args)
    _check_outputs(args.save_method, args.gguf)
    if args.chat_template is not None:
        set_chat_template(argparse.Namespace(), args.chat_template)  # only validates the name
    check_output_dir(args.output)
    data, chat_field = None, None
    if args.dataset is not None:
        data = read_dataset(args.dataset)
    if data is not None:
        chat_field = check_fields(data, args)
    else:
        from slothnb.training import raw_text_dataset

        raw_text_dataset(args.raw_text or [args.dataset])  # missing or empty files fail here
    if args.train_on_responses_only and chat_field is None:
        raise ConfigError("--train-on-responses-only needs chat data (a messages column or --messages-field).")

    from slothnb.fast_language_model import FastLanguageModel
    from slothnb.memory import record_stage
    from slothnb.training import finetune

    model, tokenizer = load_model(args.model, args)
    if args.gguf is not None:
        from slothnb.saving.gguf_export import gguf_architecture

        gguf_architecture(model.config)  # an architecture GGUF cannot hold fails before training
    rows = prepare_dataset(args, tokenizer, data, chat_field)
    if data is None:
        config.text_field = "input_ids"  # pre-tokenized windows: finetune() checks for this column
    print(f"dataset: {len(rows):,} samples; model: {args.model}", file=sys.stderr)
    model = FastLanguageModel.get_peft_model(
        model, r=config.lora_r, target_modules=config.target_modules, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, use_gradient_checkpointing=config.use_gradient_checkpointing,
        random_state=config.seed, use_rslora=args.rslora, max_seq_length=config.max_seq_length)
    start = time.perf_counter()
    result = finetune(model, tokenizer, rows, config)
    stats = throughput(result, time.perf_counter() - start)
    outputs = [f"adapter: {result.adapter_dir}"]
    if result.interrupted:
        outputs.append(f"interrupted: resume with --resume {result.checkpoint_dir}")
    if args.save_method != "lora":
        from slothnb.saving import save_pretrained_merged

        folder = save_pretrained_merged(result.trainer.model, Path(args.output) / args.save_method, tokenizer,
                                        save_method=args.save_method)
        outputs.append(f"{args.save_method}: {folder}")
    if args.gguf is not None:
        from slothnb.saving import save_pretrained_gguf

        outputs.append(f"gguf: {save_pretrained_gguf(result.trainer.model, Path(args.output) / 'gguf', tokenizer, args.gguf)}")
    record_stage("saved")
    print_memory_table()
    print("\n" + format_throughput(stats))
    print("\n".join(outputs))
    return 130 if result.interrupted else 0


def cmd_generate(args) -> int:
    from slothnb.models.generation import stream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ConfigError("The prompt is empty; pass some text (or '-' and pipe it on stdin).")
    model, tokenizer = load_model(args.model, args, adapter=args.adapter)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    extra = {k: v for k, v in (("top_k", args.top_k), ("repetition_penalty", args.repetition_penalty)) if v is not None}
    pieces = stream(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, chat=args.chat, system=args.system, stop=args.stop, **extra)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(stream.last_stats, file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from slothnb.saving import save_pretrained_gguf, save_pretrained_merged
    from slothnb.saving.merged import writable_directory

    method = args.method or (None if args.gguf else "merged_16bit")
    _check_outputs(method, args.gguf)
    if not Path(args.source).expanduser().exists():
        raise ModelNotFoundError(f"{args.source} does not exist: pass an adapter folder or a model folder.")
    out = writable_directory(args.output)
    model, tokenizer = load_model(args.source, args)
    if method is not None:
        folder = save_pretrained_merged(model, out, tokenizer, save_method=method, max_shard_size=args.max_shard_size)
        print(f"{method}: {folder}")
    if args.gguf is not None:
        print(f"gguf: {save_pretrained_gguf(model, out, tokenizer, args.gguf)}")
    return 0


def drop_checkout_root() -> None:
    """Take a source checkout's root off ``sys.path`` (``python -m`` from the repository root puts it there).

    Its ``kernels/`` folder would then shadow Hugging Face's ``kernels`` package, which transformers
    imports to probe for it; slothnb reaches its own kernels through ``slothnb.__path__`` instead.
    """
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "kernels", "_utils.py")):
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]


def run_command(args, command) -> int:
    """Run ``command(args)``: a SlothError becomes one ``error:`` line and exit code 2, Ctrl-C code 130."""
    try:
        return int(command(args) or 0)
    except SlothError as error:
        if getattr(args, "debug", False):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    """Entry point of the ``slothnb`` console script; returns the exit code."""
    drop_checkout_root()
    args = build_parser().parse_args(argv)
    return run_command(args, args.run)


if __name__ == "__main__":
    sys.exit(main())
