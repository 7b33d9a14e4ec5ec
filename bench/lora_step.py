#!/usr/bin/env python3
"""slothnb's side of the LoRA / QLoRA step benchmark (issue: performance).

Same work and method as the peers' harness (`../shared/peers/bench_lora.py`), so that
the four systems' numbers can sit in one table from one GPU run:

- the same random-initialised checkpoints (`peers/make_models.py`: 1b, 8b, qwen7b, gemma9b);
- batch x seq random token ids (uniform over the vocabulary, torch.Generator seed 0), no padding;
- forward with labels=input_ids under torch.autocast(bf16), backward, torch AdamW lr 1e-4, zero_grad;
- LoRA r16 / alpha16 / dropout 0 on q, k, v, o, gate, up, down;
- WARMUP untimed steps, then the median of STEPS synchronised steps;
- peak allocated / reserved over the steps, counters reset after load, LoRA wrap and optimizer.

It writes one JSON line per case in the peers' record format ("kind": "bench"), so the
peers' `summarize.py` prints slothnb beside them. Beyond the peers' fields: per-step peaks and
offload counts, ``host_queued_s`` (per step, how long the host took to queue it: about the step time
when the step is host-bound; a synchronisation inside the step, such as the 8B's offloaded embedding
lookup, adds its wait) and ``host_probe`` (this process's host speed before and after the steps).

    python bench/lora_step.py --model 8b --quant nf4 --seq 2048 --batch 2 --out results.jsonl
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

GiB = 1024 ** 3
# The caching allocator's counters read per step (``allocator_by_step``, in this order) and over the run.
_ALLOC_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_DIRS = {"1b": "rand-llama-1b", "8b": "rand-llama-8b", "qwen7b": "rand-qwen2.5-7b",
              "gemma9b": "rand-gemma2-9b", "tiny": "rand-llama-tiny",
              "3b": "rand-llama-3b", "5b": "rand-llama-5b"}  # 3b, 5b: bench/make_bench_models.py


def matmul_params(cfg):
    """N in 6*N*tokens: decoder Linear weights + lm_head (as the peers count it)."""
    d, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // nh
    per_layer = d * nh * hd + 2 * d * nkv * hd + nh * hd * d + 3 * d * cfg.intermediate_size
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * d


def mem_now(torch):
    free, total = torch.cuda.mem_get_info()
    return {"alloc_gib": round(torch.cuda.memory_allocated() / GiB, 3),
            "reserved_gib": round(torch.cuda.memory_reserved() / GiB, 3),
            "device_used_gib": round((total - free) / GiB, 3)}


def host_memory():
    """Host RAM: the process's peak RSS, the machine's total and available now, and the most pinned
    bytes the offloaded checkpoints held at once (long context must not exhaust the host)."""
    import resource

    import psutil

    from slothnb.models.host_offload import HOST_BUDGET

    vm = psutil.virtual_memory()
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
            "total_gib": round(vm.total / GiB, 1), "available_gib": round(vm.available / GiB, 1),
            "offload_peak_gib": round(HOST_BUDGET.peak / GiB, 2),
            "offload_limit_gib": round((HOST_BUDGET.limit or 0) / GiB, 1)}


def profiling_setup(args, grad_ckpt="slothnb"):
    """(model, AdamW, one random batch on the GPU) for the profiling scripts (profile_step, layer_host):
    the benchmark's model and LoRA set-up, from ``args.model_root``, ``model``, ``quant``, ``seq``, ``batch``."""
    import torch
    from slothnb import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(os.path.join(args.model_root, MODEL_DIRS[args.model]),
                                                 max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=args.quant == "nf4")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing=grad_ckpt, random_state=3407)
    FastLanguageModel.for_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    return model, opt, x


def train_step(model, opt, x):
    """The step every system is timed on: forward with labels=input_ids under bf16 autocast, backward,
    AdamW step, zero_grad. No synchronisation inside. Returns the loss."""
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _number(text):
    """An int or float setting as written, else the string itself ("in_flight", "fixed")."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _switches(spec):
    """[(module, attribute, value)] from "pkg.mod.ATTR=value,..." (ints, floats, None, True/False, else
    strings). A boolean setting takes 0/1 or True/False only: any other string would be truthy and
    leave the switch a silent no-op (session 31's first CARRY_MLP=False run)."""
    import importlib

    out = []
    for item in filter(None, (spec or "").split(",")):
        target, value = item.split("=")
        module, attr = target.rsplit(".", 1)
        value = {"None": None, "True": True, "False": False}.get(value, _number(value))
        mod = importlib.import_module(module)
        current = getattr(mod, attr)
        if isinstance(current, bool) and isinstance(value, int):
            value = bool(value)
        elif isinstance(current, bool):
            raise ValueError(f"--ab-switch {target}: a boolean setting takes 0/1 or True/False, not {value!r}")
        out.append((mod, attr, value))
    return out


def _variants(spec):
    """``--ab-switch`` "A;B;..": one list of (module, attribute, value) per variant (``_switches``)."""
    return [_switches(part) for part in (spec or "").split(";") if part]


def variant_of_step(i, warmup, k):
    """Which of ``k`` variants step ``i`` runs (None: the defaults): they take turns with the defaults,
    step by step, so every variant sees the same host drift; the warm-up steps take turns too (a
    variant's first step would otherwise pin its host buffers and compile its kernels while timed)."""
    if k == 0:
        return None
    slot = (i - warmup) % (k + 1)
    return None if slot == 0 else slot - 1


def ab_slots(spec, times, queued, peaks, tokens, k, replay_peaks=None):
    """Per slot (the defaults, then each variant of ``spec``): median tok/s and host ms of its timed
    steps, their count, and the largest per-step peak of allocated memory (GiB); with ``replay_peaks``
    (``graph_capture.replay_peak`` per step) also that peak with the graphs' temporaries counted."""
    names = ["defaults"] + [part for part in spec.split(";") if part]
    out = []
    for slot, name in enumerate(names):
        idx = [j for j in range(len(times)) if (j % (k + 1)) == slot]
        if not idx:
            continue
        out.append({"switch": name, "steps": len(idx),
                    "tok_s": round(tokens / statistics.median([times[j] for j in idx]), 1),
                    "host_ms": round(statistics.median([queued[j] for j in idx]) * 1e3, 1),
                    "peak_alloc_gib": round(max(peaks[j] for j in idx) / 2**30, 3)})
        if replay_peaks is not None:
            out[-1]["honest_peak_gib"] = round(max(max(peaks[j], replay_peaks[j]) for j in idx) / 2**30, 3)
    return out


def ab_halves(switch, times, queued, tokens):
    """``--ab-switch``'s record: median tok/s and host ms of the timed steps run with the defaults (the
    even ones) and with the switch (the odd ones)."""
    def half(values, k):
        return statistics.median(values[k::2])

    return {"switch": switch, "default_tok_s": round(tokens / half(times, 0), 1),
            "switched_tok_s": round(tokens / half(times, 1), 1),
            "default_host_ms": round(half(queued, 0) * 1e3, 1), "switched_host_ms": round(half(queued, 1) * 1e3, 1)}


def run(args, rec):
    import torch
    from slothnb import FastLanguageModel

    rec["import_s"] = round(time.time() - rec["_t0"], 1)
    t = time.time()
    model, _ = FastLanguageModel.from_pretrained(args.model_path, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=args.quant == "nf4")
    torch.cuda.synchronize()
    rec["load_s"] = round(time.time() - t, 1)
    rec["mem_after_load"] = mem_now(torch)
    cfg = model.config
    rec["model_type"], rec["n_matmul_params"] = cfg.model_type, matmul_params(cfg)
    model = FastLanguageModel.get_peft_model(model, r=args.rank, lora_alpha=args.alpha, lora_dropout=0,
                                             target_modules=TARGETS, bias="none", random_state=3407,
                                             use_gradient_checkpointing=args.grad_ckpt)
    FastLanguageModel.for_training(model)
    rec["mem_after_lora"] = mem_now(torch)
    rec["attn_implementation"] = getattr(cfg, "_attn_implementation", None)

    n = args.warmup + args.steps
    data = torch.randint(0, cfg.vocab_size, (n, args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    rec["trainable_params"] = sum(p.numel() for p in params)
    rec["trainable_dtypes"] = sorted({str(p.dtype) for p in params})
    opt = torch.optim.AdamW(params, lr=args.lr)
    rec["mem_before_train"] = mem_now(torch)
    if os.environ.get("LORA_STEP_GC_FREEZE") == "1":  # diagnosis: are the step-time outliers Python's GC?
        import gc

        gc.collect()
        gc.freeze()
        rec["gc_frozen"] = gc.get_freeze_count()
    from host_usage import GcPauses, HostUsage, host_probe

    probe_before = host_probe()
    gc_pauses = GcPauses()
    host_usage = HostUsage(cuda=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stats0 = torch.cuda.memory_stats()
    from slothnb.models import host_offload

    import gpu_telemetry

    telemetry, gpu_by_step = gpu_telemetry.StepTelemetry.for_device(0), []
    from slothnb.models import graph_capture

    times, queued, losses, peaks, reserved, counts, replay_peaks, allocs = [], [], [], [], [], [], [], []
    last_stats = stats0
    variants = _variants(args.ab_switch)
    defaults = {(m, attr): getattr(m, attr) for v in variants for m, attr, _ in v}
    for i in range(n):
        for (m, attr), d in defaults.items():  # --ab-switch: each variant in turn with the defaults
            setattr(m, attr, d)
        active = variant_of_step(i, args.warmup, len(variants))
        for m, attr, value in (variants[active] if active is not None else ()):
            setattr(m, attr, value)
        x = data[i].cuda()
        torch.cuda.synchronize()
        telemetry.begin()
        t = time.perf_counter()
        gc_pauses.begin_step()
        host_usage.begin_step()
        loss = train_step(model, opt, x)
        queued.append(time.perf_counter() - t)  # the host's share: ~ the step time when host-bound
        host_usage.end_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        host_usage.gpu_step()
        gpu_by_step.append(telemetry.end())  # clocks, power, throttling: why a GPU-paced step was slow
        losses.append(round(float(loss.detach().float()), 4))
        # per-step peaks (the first steps also create the optimizer state), the maximum is the run's peak
        # a CUDA graph capture restarts the counter (graph_capture.peak_before_capture has what it held)
        peaks.append(max(torch.cuda.max_memory_allocated(), graph_capture.peak_before_capture(reset=True)))
        reserved.append(torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()
        replay_peaks.append(graph_capture.replay_peak(reset=True))  # SLOTHNB_CUDA_GRAPHS=1: temporaries included
        counts.append(dict(host_offload.COUNTS))  # what each step offloaded, carried and pinned
        host_offload.COUNTS.clear()
        stats = torch.cuda.memory_stats()  # cudaMalloc/cudaFree in this step: a host stall where they happen
        allocs.append([stats.get(k, 0) - last_stats.get(k, 0) for k in _ALLOC_KEYS])
        last_stats = stats
    for (m, attr), d in defaults.items():
        setattr(m, attr, d)
    timed = times[args.warmup:]
    if len(variants) == 1:  # the step's default and switched halves, interleaved step by step (same host drift)
        rec["ab"] = ab_halves(args.ab_switch, timed, queued[args.warmup:], args.batch * args.seq)
        print("AB", json.dumps(rec["ab"]), flush=True)
    if variants:
        rec["ab_variants"] = ab_slots(args.ab_switch, timed, queued[args.warmup:], peaks[args.warmup:],
                                      args.batch * args.seq, len(variants), replay_peaks[args.warmup:])
        for row in rec["ab_variants"]:
            print("AB", json.dumps(row), flush=True)
    med = statistics.median(timed)
    tokens = args.batch * args.seq
    rec.update(first_step_s=round(times[0], 3), step_s_median=round(med, 4),
               step_times_s=[round(x, 4) for x in times], host_queued_s=[round(x, 4) for x in queued],
               tokens_per_step=tokens,
               tokens_per_s=round(tokens / med, 1), losses=losses,
               peak_alloc_gib=round(max(peaks) / GiB, 3), peak_reserved_gib=round(max(reserved) / GiB, 3),
               peak_alloc_by_step_gib=[round(b / GiB, 3) for b in peaks], offload_counts_by_step=counts,
               allocator_by_step=allocs,
               mem_after_train=mem_now(torch))
    rec["host"] = host_memory()
    rec["gpu_by_step"] = gpu_by_step
    rec["gpu_summary"] = gpu_telemetry.summary(gpu_by_step[args.warmup:])
    rec["link"] = {**gpu_telemetry.link_info(telemetry.nvml, telemetry.handle), **gpu_telemetry.copy_bandwidth(torch)}
    print("GPU", json.dumps({**rec["gpu_summary"], **rec["link"]}), flush=True)
    rec["host_probe"] = {"before": probe_before, "after": host_probe()}
    rec["gc_pauses_by_step"] = gc_pauses.close()
    rec["host_usage_by_step"] = host_usage.close()
    # CUDA graphs' temporaries live in their own pool, outside peak_alloc: counted here (SLOTHNB_CUDA_GRAPHS=1)
    rec["graph_pool_gib"] = round(graph_capture.pool_bytes() / GiB, 3)
    if rec["graph_pool_gib"]:  # the most live during a replay, temporaries included: held to the target too
        rec["graph_replay_peak_gib"] = round(max(replay_peaks) / GiB, 3)
        rec["graph_replay_peak_by_step_gib"] = [round(b / GiB, 3) for b in replay_peaks]
        rec["graph_honest_peak_gib"] = round(max(max(peaks), max(replay_peaks)) / GiB, 3)
    pacer = next((m._slothnb_graphs.shared.pacer for m in model.modules()
                  if getattr(m, "_slothnb_graphs", None) is not None), None)
    if pacer is not None:  # "adaptive" graphs: the share of graphed layers, and the lag it was chosen from
        rec["graph_pacer"] = {"share": pacer.share, "history": pacer.history}
        print("PACER", json.dumps({"share": pacer.share, "lag_ms": [round(h[0] * 1e3) for h in pacer.history],
                                   "shares": [h[2] for h in pacer.history]}), flush=True)
    stats1 = torch.cuda.memory_stats()  # allocator trouble (cudaMalloc calls, flushes) during the steps
    rec["allocator"] = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in _ALLOC_KEYS}
    rec["model_tflops_6N"] = round(6 * rec["n_matmul_params"] * rec["tokens_per_s"] / 1e12, 1)
    if args.peak_tflops:
        rec["peak_tflops"] = args.peak_tflops
        rec["mfu_6N"] = round(rec["model_tflops_6N"] / args.peak_tflops, 4)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODEL_DIRS), required=True)
    ap.add_argument("--quant", choices=["none", "nf4"], default="none")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--grad-ckpt", default=os.environ.get("SLOTHNB_GC", "slothnb"),
                    help="use_gradient_checkpointing: slothnb | true | false")
    ap.add_argument("--model-root", default=os.environ.get("ANCHOR_MODEL_ROOT", "/tmp/anchor_models"))
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ab-switch", default="",
                    help="module.ATTR=value[,...] set in every other timed step (the rest run the defaults): a "
                         "same-process A/B whose halves see the same host; results in the record's 'ab'. "
                         "Several variants, 'A;B;..', take turns with the defaults (defaults, A, B, defaults, "
                         "..): per variant tok/s, host ms and peak in 'ab_variants' (bench/report.py adds each "
                         "variant's speed against the defaults round by round, with an interval)")
    args = ap.parse_args(argv)
    if args.grad_ckpt in ("true", "false"):
        args.grad_ckpt = args.grad_ckpt == "true"
    args.model_path = os.path.join(args.model_root, MODEL_DIRS[args.model])
    rec = {"kind": "bench", "system": "slothnb", "model": args.model, "quant": args.quant, "seq": args.seq,
           "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "lora_r": args.rank,
           "lora_alpha": args.alpha, "lr": args.lr, "autocast_bf16": True, "optimizer": "torch.optim.AdamW",
           "grad_ckpt": str(args.grad_ckpt), "model_path": args.model_path, "_t0": time.time(),
           "env": {k: v for k, v in os.environ.items() if k.startswith("SLOTHNB_")}}
    try:
        import torch
        rec["gpu"] = torch.cuda.get_device_name(0)
        run(args, rec)
        rec["status"] = "ok"
    except Exception as e:  # one line per case, failures included
        rec["status"] = "oom" if "out of memory" in str(e).lower() else "error"
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["wall_s"] = round(time.time() - rec.pop("_t0"), 1)
    try:
        import importlib.metadata as md
        rec["versions"] = {n: md.version(n) for n in ("torch", "triton", "transformers", "peft", "bitsandbytes")}
    except Exception:
        pass
    line = json.dumps(rec)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0 if rec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
