"""The one-command demo: LoRA fine-tune the embedded SmolLM2-135M on Shakespeare, before and after.

    python -m slothnb.demo                 # what `make demo` runs; also `slothnb demo`
    python -m slothnb.demo --max-steps 20  # quicker

It fetches the plays into the cache when missing, generates from two prompts, measures the loss on a
play the model never trains on, trains LoRA adapters on the other plays (a few minutes on 2 CPU cores;
a GPU is used when there is one, with longer windows and more steps), then measures and generates
again. It prints the loss going down, the memory per stage and the throughput, writes the adapter to
``<output>/adapter`` and a machine-readable ``<output>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = ("ROMEO.\nBut soft, what light", "KING.\nMy lords, ")
# (max_steps, seq_len, batch_size) when not given: minutes on 2 CPU cores, or a fuller run on a GPU.
CPU_DEFAULTS = (60, 128, 2)
GPU_DEFAULTS = (200, 512, 8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: 60 on CPU, 200 on a GPU)")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per training window (default: 128 CPU, 512 GPU)")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per step (default: 2 CPU, 8 GPU)")
    p.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="LoRA learning rate (default: %(default)s)")
    p.add_argument("--r", type=int, default=16, metavar="R", help="LoRA rank (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=16, metavar="N",
                   help="windows of the held-out play used for the held-out loss (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=40, metavar="N",
                   help="tokens generated per prompt, before and after (default: %(default)s)")
    p.add_argument("--seed", type=int, default=3407, metavar="S", help="seed (default: %(default)s)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's choice, or 1 when other processes keep the cores busy)")
    p.add_argument("--output", "-o", default="outputs/demo", metavar="DIR",
                   help="run folder: adapter/, summary.json, checkpoints (default: %(default)s)")


def heldout_windows(path: Path, tokenizer, seq_len: int, count: int) -> list[list[int]]:
    """``count`` full windows of ``seq_len`` tokens spread evenly over one play (the held-out text)."""
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
    starts = list(range(0, len(ids) - seq_len, seq_len))
    if not starts:
        from slothnb.errors import DatasetError

        raise DatasetError(f"{path.name} is shorter than one {seq_len}-token window; use a smaller --seq-len.")
    step = max(1, len(starts) // max(count, 1))
    return [ids[s : s + seq_len] for s in starts[::step][:count]]


def heldout_loss(model, windows, batch_size: int) -> float:
    """Mean next-token loss over the windows (every predicted token weighs the same)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[i : i + batch_size], device=device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            n = ids.numel() - ids.shape[0]
            total, count = total + float(loss) * n, count + n
    if was_training:
        model.train()
    return total / count


def show_generations(model, tokenizer, title: str, max_new_tokens: int) -> list[str]:
    from slothnb.models.generation import generate

    print(f"\n--- generations {title} ---")
    texts = []
    for prompt in PROMPTS:
        text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=False,
                        repetition_penalty=1.15)
        texts.append(text)
        print(f"{prompt}\033[1m{text}\033[0m\n" if sys.stdout.isatty() else f"{prompt}{text}\n", flush=True)
    return texts


def loss_curve(history, points: int = 8) -> str:
    """'step 1: 4.35 | step 9: 4.02 | ...': a few evenly spaced logged losses, the last one included."""
    rows = [row for row in history if "loss" in row]
    if not rows:
        return "no loss was logged"
    picked = rows[:: max(1, -(-len(rows) // points))]  # ceil: at most `points` (+ the last)
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return " | ".join(f"step {row['step']}: {row['loss']:.3f}" for row in picked)


def cpu_threads(requested: int | None) -> int:
    """Torch's CPU thread count: ``requested``, else 1 when other processes already keep every core busy.

    OpenMP threads meet at a barrier after every op; on a shared machine one of them is often
    descheduled and the others spin, which made 2 threads ~5x slower than 1 on a busy 2-core box.
    """
    import os

    import torch

    if requested is not None:
        if requested <= 0:
            from slothnb.errors import ConfigError

            raise ConfigError(f"--threads {requested} must be a positive number of CPU threads.")
        return requested
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy >= cores - 0.5 else torch.get_num_threads()


def quiet_libraries() -> None:
    """The demo is read by people: keep transformers/datasets chatter and deprecation noise off screen."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run(args) -> int:
    import torch

    from slothnb.cli import format_throughput, print_memory_table, throughput
    from slothnb.data import fetch_shakespeare, shakespeare_files
    from slothnb.fast_language_model import FastLanguageModel
    from slothnb.memory import record_stage
    from slothnb.models.loader import parameter_count
    from slothnb.training import FinetuneConfig, finetune, raw_text_dataset
    from slothnb.training.guards import check_output_dir

    on_gpu = torch.cuda.is_available()
    steps, seq_len, batch = (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS)
    steps = args.max_steps if args.max_steps is not None else steps
    seq_len = args.seq_len if args.seq_len is not None else seq_len
    batch = args.batch_size if args.batch_size is not None else batch
    config = FinetuneConfig(  # validates the numbers before anything slow happens
        max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        learning_rate=args.lr, warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 15),
        max_seq_length=seq_len, lora_r=args.r, lora_alpha=2 * args.r, seed=args.seed, output_dir=args.output,
        text_field="input_ids", use_gradient_checkpointing="slothnb" if on_gpu else False,
        extra_args={"disable_tqdm": False})  # the trainer's progress bar (with ETA) despite the quiet logs
    check_output_dir(args.output)
    if not on_gpu:
        torch.set_num_threads(cpu_threads(args.threads))
    total_start = time.perf_counter()
    quiet_libraries()

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if on_gpu else f"CPU ({threads} thread{'s' if threads > 1 else ''})"
    print(f"slothnb demo on {where}: "
          f"{steps} steps x {batch} windows x {seq_len} tokens", flush=True)
    print(f"corpus: {fetch_shakespeare()}", flush=True)
    files = shakespeare_files()
    train_files, heldout_file = files[:-1], files[-1]

    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=max(seq_len, 256))
    print(f"model: SmolLM2-135M-Instruct ({parameter_count(model) / 1e6:.0f}M parameters, "
          f"{next(model.parameters()).dtype}), slothnb kernels "
          f"{('on' if on_gpu else 'patched (exact PyTorch paths on CPU)') if model._slothnb_patched else 'off'}",
          flush=True)
    train = raw_text_dataset(train_files, tokenizer, max_length=seq_len)
    train = train.filter(lambda row: len(row["input_ids"]) == seq_len)  # no ragged play endings
    windows = heldout_windows(heldout_file, tokenizer, seq_len, args.eval_windows)
    print(f"train: {len(train):,} windows from {len(train_files)} plays; held out: {heldout_file.name}", flush=True)

    before = show_generations(model, tokenizer, "BEFORE fine-tuning", args.max_new_tokens)
    loss_before = heldout_loss(model, windows, batch)
    print(f"held-out loss before: {loss_before:.4f}", flush=True)
    record_stage("generate_before")

    model = FastLanguageModel.get_peft_model(model, r=config.lora_r, lora_alpha=config.lora_alpha,
                                             use_gradient_checkpointing=config.use_gradient_checkpointing,
                                             random_state=config.seed, max_seq_length=seq_len)
    FastLanguageModel.for_training(model)
    print(f"\n--- fine-tuning LoRA r={config.lora_r} ---", flush=True)
    result = finetune(model, tokenizer, train, config)
    model = result.trainer.model
    stats = throughput(result)
    print(f"training loss: {loss_curve(result.history)}", flush=True)

    loss_after = heldout_loss(model, windows, batch)
    print(f"held-out loss: {loss_before:.4f} -> {loss_after:.4f}", flush=True)
    FastLanguageModel.for_inference(model)
    after = show_generations(model, tokenizer, "AFTER fine-tuning", args.max_new_tokens)
    record_stage("generate_after")

    print_memory_table()
    print("\n" + format_throughput(stats))
    summary = {"device": "cuda" if on_gpu else "cpu", "steps": stats["steps"], "seq_len": seq_len, "batch_size": batch,
               "heldout_file": heldout_file.name, "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
               "losses": [row["loss"] for row in result.history if "loss" in row], "throughput": stats,
               "adapter_dir": result.adapter_dir, "interrupted": result.interrupted,
               "generations": {"prompts": list(PROMPTS), "before": before, "after": after},
               "total_seconds": time.perf_counter() - total_start}
    summary_path = Path(args.output) / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    print(f"adapter: {result.adapter_dir}\nsummary: {summary_path}\n"
          f"total time: {summary['total_seconds']:.0f} s", flush=True)
    return 130 if result.interrupted else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slothnb.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from slothnb.cli import run_command

    return run_command(args, run)


if __name__ == "__main__":
    sys.exit(main())
