#!/usr/bin/env python3
"""Where a slothnb LoRA training step spends its GPU time (the performance issue's map).

Same set-up as bench/lora_step.py; after warm-up, times forward / backward / optimizer
separately (CUDA-synchronised) and profiles two steps with torch.profiler, printing the
kernels that take the most GPU time and the share of the step that is GPU-idle.

    python bench/profile_step.py --model 1b --quant none --seq 2048 --batch 2 [--grad-ckpt slothnb] [--memory] [--host] [--copies]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_step import MODEL_DIRS, TARGETS, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b", choices=sorted(MODEL_DIRS))
    ap.add_argument("--quant", default="none")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grad-ckpt", default="slothnb")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--memory", action="store_true", help="also print what is live at the step's memory peak")
    ap.add_argument("--host", action="store_true",
                    help="also print the host's Python hot spots (cProfile over 3 unsynchronised steps)")
    ap.add_argument("--copies", action="store_true",
                    help="also print where the step's copy kernels come from (Python call site or autograd node)")
    ap.add_argument("--model-root", default=os.environ.get("ANCHOR_MODEL_ROOT", "/tmp/anchor_models"))
    a = ap.parse_args()
    gc = {"true": True, "false": False}.get(a.grad_ckpt, a.grad_ckpt)
    import torch
    from slothnb import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(os.path.join(a.model_root, MODEL_DIRS[a.model]),
                                                 max_seq_length=a.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=a.quant == "nf4")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing=gc, random_state=3407)
    FastLanguageModel.for_training(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device="cuda")

    def step(parts=None):
        sync = torch.cuda.synchronize
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if parts is not None:
            parts.append((t1 - t0, t2 - t1, t3 - t2))

    for _ in range(3):
        step()
    parts = []
    for _ in range(5):
        step(parts)
    f, b, o = (statistics.median(p[i] for p in parts) for i in range(3))
    tok = a.batch * a.seq
    print(f"# {a.model} {a.quant} seq {a.seq} batch {a.batch} ckpt {a.grad_ckpt}: forward {f*1e3:.1f} ms, "
          f"backward {b*1e3:.1f} ms, optimizer {o*1e3:.1f} ms, {tok / (f + b + o):.0f} tok/s")
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    wall = (time.perf_counter() - t) / 2
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 2 / 1e6
    from torch.autograd import DeviceType

    launches = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA) / 2
    print(f"# profiled step wall {wall*1e3:.1f} ms, GPU busy {gpu_total*1e3:.1f} ms "
          f"({100 * gpu_total / wall:.0f}%), {launches:.0f} GPU kernels and copies a step")
    print(events.table(sort_by="self_device_time_total", row_limit=a.top, max_name_column_width=70))
    if a.host:
        print_host_profile(model, opt, x, a.top)
    if a.copies:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with torch.autograd.set_multithreading_enabled(False), \
                profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            step()
            torch.cuda.synchronize()
        print_copy_sites(prof, a.top)
    if a.memory:
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        base = torch.cuda.memory_allocated()
        step()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        print_peak_breakdown(snap, base, a.top)


def print_host_profile(model, opt, x, top):
    """cProfile of 3 steps run as the benchmark runs them (no synchronisation inside a step): where a
    host-bound step (the 1B case) spends its Python time. The backward normally runs on autograd's
    device thread, which cProfile does not see, so it runs on this thread for the measurement."""
    import cProfile
    import pstats

    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):  # plain: how long the host takes to queue a step when nothing instruments it
        train_step(model, opt, x)
    queued = (time.perf_counter() - t) / 3
    torch.cuda.synchronize()
    print(f"# host, uninstrumented: {queued * 1e3:.1f} ms a step to queue, "
          f"{(time.perf_counter() - t) / 3 * 1e3:.1f} ms until the GPU finished")
    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        t = time.perf_counter()
        profiler.enable()
        for _ in range(3):
            train_step(model, opt, x)
        profiler.disable()
        host = (time.perf_counter() - t) / 3
        torch.cuda.synchronize()
        total = (time.perf_counter() - t) / 3
    stats = pstats.Stats(profiler)
    print(f"# host: {host * 1e3:.1f} ms a step to queue the work (under cProfile), {total * 1e3:.1f} ms until "
          f"the GPU finished; {stats.total_calls / 3:.0f} Python calls a step")
    stats.sort_stats("tottime").print_stats(top)


def copy_sites(prof) -> list[tuple[str, int, float, float]]:
    """``aten::copy_`` calls of a profiled run grouped by where they come from: the innermost Python
    frame outside torch itself, else (a backward run by autograd's C++ engine) the autograd node it
    ran under. Returns (site, calls, device ms, CPU ms), most device
    time first. Every clone, cast, ``.contiguous()`` and device copy ends in ``aten::copy_``."""
    sites = {}
    for e in prof.events():
        if e.name != "aten::copy_":
            continue
        site, parent = None, e.cpu_parent  # with_stack: Python frames are parent events "file(line): name"
        while site is None and parent is not None:
            name = parent.name
            if name.startswith("autograd::engine::evaluate_function: "):
                site = "backward of " + name.split(": ", 1)[1]
            elif "): " in name and "torch/" not in name and not name.startswith("<"):
                site = name  # the innermost Python frame outside torch itself
            parent = parent.cpu_parent
        site = site or "(no Python frame, no autograd node)"
        n, dev, cpu = sites.get(site, (0, 0.0, 0.0))
        sites[site] = (n + 1, dev + e.device_time_total / 1e3, cpu + e.cpu_time_total / 1e3)
    return sorted(((k, *v) for k, v in sites.items()), key=lambda r: (-r[2], -r[3]))


def print_copy_sites(prof, top):
    rows = copy_sites(prof)
    print(f"# copies of one step: {sum(r[1] for r in rows)} aten::copy_ calls, "
          f"{sum(r[2] for r in rows):.1f} ms of GPU time; by site:")
    for site, n, dev, cpu in rows[:top]:
        print(f"#   {dev:8.2f} ms GPU {cpu:8.2f} ms CPU {n:6d} calls  {site}")


def _site(frames):
    """The innermost frame in this project's or the model libraries' code: where an allocation came from."""
    for f in frames or []:
        name = f.get("filename", "")
        if any(k in name for k in ("slothnb", "kernels/", "peft", "transformers", "bench/")) and "torch/" not in name:
            return f"{name.split('/')[-1]}:{f.get('line')} {f.get('name')}"
    return "(torch internals)" if frames else "(no stack)"


def print_peak_breakdown(snap, base, top):
    """Replays the allocator trace of one step; at its highest point, sums the live blocks by site."""
    live, total, peak, at_peak = {}, 0, -1, {}
    for ev in snap["device_traces"][0]:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, ev.get("frames"))
            total += size
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
    by_site = {}
    for size, frames in at_peak.values():
        k = _site(frames)
        n, b = by_site.get(k, (0, 0))
        by_site[k] = (n + 1, b + size)
    print(f"# memory peak of one step: {(base + peak) / 2**30:.3f} GiB = {base / 2**30:.3f} held before the step "
          f"+ {peak / 2**20:.1f} MiB allocated during it; live at the peak, by site:")
    for k, (n, b) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"#   {b / 2**20:9.1f} MiB  {n:5d} blocks  {k}")


if __name__ == "__main__":
    main()
