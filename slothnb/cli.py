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

from slothnb import cli_options
from slothnb.errors import ConfigError, DatasetError, HardwareError, ModelNotFoundError, SlothError

STRUCTURED_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def build_parser() -> argparse.ArgumentParser:
    """The ``slothnb`` parser (options in ``slothnb.cli_options``); ``args.run`` is the command to run."""
    return cli_options.build_parser({"finetune": cmd_finetune, "generate": cmd_generate, "export": cmd_export})


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
            args.gradient_checkpointing, args.gradient_checkpointing), cuda_graphs=args.cuda_graphs,
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
        random_state=config.seed, use_rslora=args.rslora, max_seq_length=config.max_seq_length,
        cuda_graphs=config.cuda_graphs)
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
    args = build_parser().parse_args(argv)
    return run_command(args, args.run)


if __name__ == "__main__":
    sys.exit(main())
