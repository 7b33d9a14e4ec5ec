#!/usr/bin/env python3
"""Where a slothnb LoRA training step spends its GPU time (the performance issue's map).

Same set-up as bench/lora_step.py; after warm-up, times forward / backward / optimizer
separately (CUDA-synchronised) and profiles two steps with torch.profiler, printing the
kernels that take the most GPU time and the share of the step that is GPU-idle.

    python bench/profile_step.py --model 1b --quant none --seq 2048 --batch 2 [--grad-ckpt slothnb] [--memory] [--host]
        [--copies] [--gemms] [--timeline] [--cpu-ops]

Every profile also prints each CUDA stream's busy time and idle gaps. ``--gemms``: the step's matmuls
by shape with their achieved TFLOP/s. ``--timeline``: three unsynchronised steps profiled with GPU
activity only, and where the compute stream waited (on copies or on the host). ``--host`` also writes
the raw cProfile statistics to ``$OUT/host-PID.pstats`` when ``OUT`` is set.
"""
import argparse
import bisect
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_step import MODEL_DIRS, profiling_setup, train_step  # noqa: E402


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
    ap.add_argument("--cpu-ops", action="store_true",
                    help="also print the host's CPU time by op and autograd node (torch.profiler, CPU only, "
                         "3 unsynchronised steps, backward on the calling thread)")
    ap.add_argument("--copies", action="store_true",
                    help="also print where the step's copy and memset kernels come from (Python call site or autograd node)")
    ap.add_argument("--gemms", action="store_true",
                    help="also print the step's matmuls by shape (GPU ms, TFLOP/s) and each stream's busy time")
    ap.add_argument("--timeline", action="store_true",
                    help="also profile 3 steps as the benchmark runs them (no syncs, GPU activity only) and say "
                         "where the compute stream idles: before which kernels, and how much of it waits on copies")
    ap.add_argument("--sync-timeline", action="store_true",
                    help="also profile 3 steps synchronised as the benchmark times them and split each step's wall "
                         "time: the host's start, GPU busy and idle by phase (forward, backward, optimizer), the "
                         "sync's tail; plus the compute stream's kernels by count")
    ap.add_argument("--model-root", default=os.environ.get("ANCHOR_MODEL_ROOT", "/tmp/anchor_models"))
    a = ap.parse_args()
    gc = {"true": True, "false": False}.get(a.grad_ckpt, a.grad_ckpt)
    import torch

    model, opt, x = profiling_setup(a, gc)

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
    print_streams(prof, 2)
    if a.gemms:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            step()
            torch.cuda.synchronize()
        print_gemms(prof, a.top * 2)
    if a.timeline:
        print_timeline(model, opt, x, a.top)
    if a.sync_timeline:
        print_sync_timeline(model, opt, x, a.top)
    if a.host:
        print_host_profile(model, opt, x, a.top)
    if a.cpu_ops:
        print_cpu_ops(model, opt, x, a.top * 2)
    if a.copies:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with torch.autograd.set_multithreading_enabled(False), \
                profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            step()
            torch.cuda.synchronize()
        print_copy_sites(prof, a.top)
        print_memset_sites(prof, a.top)
    if a.memory:
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        base = torch.cuda.memory_allocated()
        step()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        print_peak_breakdown(snap, base, a.top)


def _spans_by_stream(prof):
    """{CUDA stream: its kernels and copies as sorted (start us, end us, name)}."""
    from torch.autograd import DeviceType

    by_stream = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            by_stream.setdefault(e.device_resource_id, []).append((e.time_range.start, e.time_range.end, e.name))
    return {k: sorted(v) for k, v in by_stream.items()}


def _walk(spans):
    """(busy us, [(idle gap us, start of the gap, the span that ended it)]) of one stream's sorted spans:
    busy is the union of the spans, a gap any time between them when nothing ran."""
    busy, gaps, end = 0.0, [], None
    for span in spans:
        s0, s1 = span[0], span[1]
        if end is not None and s0 > end:
            gaps.append((s0 - end, end, span))
        busy += max(0.0, s1 - max(s0, end if end is not None else s0))
        end = s1 if end is None else max(end, s1)
    return busy, gaps


def print_streams(prof, steps):
    """Per CUDA stream: kernels and copies, busy time (union of their intervals) and idle gaps; on the
    compute stream (the busiest) the gaps are the GPU time a step loses to the host queueing late or
    to waits on copies."""
    for stream, spans in sorted(_spans_by_stream(prof).items(), key=lambda kv: -len(kv[1])):
        busy, gaps = _walk(spans)
        total = max(s[1] for s in spans) - spans[0][0]
        big = sorted((g for g, _, _ in gaps), reverse=True)
        print(f"# stream {stream}: {len(spans) / steps:.0f} kernels/copies a step, busy {busy / steps / 1e3:.1f} ms "
              f"of {total / steps / 1e3:.1f} ms ({100 * busy / max(total, 1):.0f}%), idle gaps "
              f"{sum(big) / steps / 1e3:.1f} ms a step; gaps > 50 us: {sum(g for g in big if g > 50) / steps / 1e3:.1f} "
              f"ms in {sum(1 for g in big if g > 50) / steps:.0f}; largest {[round(g) for g in big[:5]]} us")


def print_timeline(model, opt, x, top, steps=3, min_gap_us=20.0):
    """The compute stream's idle gaps over ``steps`` unsynchronised steps, profiled with GPU activity
    only (the host runs nearly as fast as unprofiled). A gap that ends within 15 us of a side-stream
    copy's end waited on that copy; the others waited on the host (or on an event the host recorded
    late). Gaps are summed by the name of the kernel that ended them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(model, opt, x)
        torch.cuda.synchronize()
    by_stream = _spans_by_stream(prof)
    compute = max(by_stream, key=lambda k: len(by_stream[k]))
    spans = by_stream[compute]
    copy_ends = sorted(s[1] for k, v in by_stream.items() if k != compute for s in v)
    busy, gaps = _walk(spans)
    waits_copy = waits_host = 0.0
    by_next = {}
    for gap, gap_start, (s0, _, name) in gaps:
        if gap <= min_gap_us:
            continue
        i = bisect.bisect_right(copy_ends, s0 + 1)
        on_copy = i > 0 and s0 - copy_ends[i - 1] < 15 and copy_ends[i - 1] > gap_start
        if on_copy:
            waits_copy += gap
        else:
            waits_host += gap
        key = ("copy  " if on_copy else "host  ") + name[:90]
        n, g = by_next.get(key, (0, 0.0))
        by_next[key] = (n + 1, g + gap)
    total = max(s[1] for s in spans) - spans[0][0]
    print(f"# timeline of {steps} unsynchronised steps: {total / steps / 1e3:.1f} ms a step, compute stream busy "
          f"{busy / steps / 1e3:.1f} ms; idle gaps > {min_gap_us:.0f} us: {waits_copy / steps / 1e3:.1f} ms a step "
          f"waiting on copies, {waits_host / steps / 1e3:.1f} ms on the host; by the kernel after the gap:")
    for key, (n, g) in sorted(by_next.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"#   {g / steps / 1e3:7.2f} ms {n / steps:6.1f} gaps  {key}")


PHASES = ("forward", "backward", "optimizer")


def split_sync_steps(spans, walls, min_gap_us=20.0):
    """The compute stream's sorted (start us, end us, name) spans of ``len(walls)`` synchronised steps, each
    opened by three ``spin_kernel`` markers (step start, backward, optimizer), and each step's host wall
    time in seconds -> (us summed over the steps: wall, start, tail, busy and gaps per phase;
    {(phase, kernel after the gap): (gaps, us)} for gaps over ``min_gap_us``)."""
    steps = len(walls)
    marks = [s for s in spans if "spin_kernel" in s[2]]
    if len(marks) != 3 * steps:
        raise ValueError(f"expected {3 * steps} markers on the compute stream, found {len(marks)}")
    rows = {k: 0.0 for k in ("wall", "start", "tail", *(f"{p} {w}" for p in PHASES for w in ("busy", "gaps")))}
    by_next = {}
    for i in range(steps):
        m0, m1, m2 = marks[3 * i: 3 * i + 3]
        end = marks[3 * i + 3][0] if i + 1 < steps else float("inf")
        step_spans = [s for s in spans if m0[0] <= s[0] < end and "spin_kernel" not in s[2]]
        rows["wall"] += walls[i] * 1e6
        rows["start"] += step_spans[0][0] - m0[1]
        rows["tail"] += walls[i] * 1e6 - (max(s[1] for s in step_spans) - m0[0])
        for phase, lo, hi in zip(PHASES, (m0[1], m1[1], m2[1]), (m1[0], m2[0], end)):
            part = [s for s in step_spans if lo <= s[0] < hi]
            if not part:
                continue
            busy, gaps = _walk(part)
            rows[f"{phase} busy"] += busy
            lead = part[0][0] - lo if phase != "forward" else 0.0  # the forward's is the step's start
            rows[f"{phase} gaps"] += sum(g for g, _, _ in gaps) + max(0.0, lead)
            for gap, _, (_, _, name) in gaps:
                if gap > min_gap_us:
                    n, g = by_next.get((phase, name[:90]), (0, 0.0))
                    by_next[(phase, name[:90])] = (n + 1, g + gap)
    return rows, by_next


def print_sync_timeline(model, opt, x, top, steps=3, min_gap_us=20.0):
    """Steps run as the benchmark times them (synchronised before and after each), profiled with GPU
    activity only. A one-cycle ``spin_kernel`` (``torch.cuda._sleep(1)``) is queued on the compute stream
    when the step starts and when the host moves to the backward and to the optimizer, so the GPU's
    timeline splits exactly by phase. Each step's wall time is then: the host's start (the start marker
    to the first kernel), the GPU's busy time and idle gaps in each phase, and the tail (the last kernel's
    end to the sync's return, from the host's clock). Then the compute stream's kernels by count: where
    removing small launches would pay."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    walls = []
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            torch.cuda._sleep(1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            torch.cuda._sleep(1)
            loss.backward()
            torch.cuda._sleep(1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
    by_stream = _spans_by_stream(prof)
    spans = by_stream[max(by_stream, key=lambda k: len(by_stream[k]))]
    try:
        rows, by_next = split_sync_steps(spans, walls, min_gap_us)
    except ValueError as e:
        print(f"# sync timeline: {e}")
        return
    print(f"# synchronised steps ({steps}), ms a step: " + ", ".join(f"{k} {v / steps / 1e3:.1f}" for k, v in rows.items()))
    print(f"# idle gaps > {min_gap_us:.0f} us by phase and the kernel after the gap:")
    for (phase, name), (n, g) in sorted(by_next.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"#   {g / steps / 1e3:7.2f} ms {n / steps:6.1f} gaps  {phase:9s} {name}")
    census = {}
    for s0, s1, name in spans:
        n, d = census.get(name, (0, 0.0))
        census[name] = (n + 1, d + s1 - s0)
    small = sum(1 for s in spans if s[1] - s[0] < 10)
    print(f"# compute stream: {len(spans) / steps:.0f} kernels a step, {small / steps:.0f} of them under 10 us; by count:")
    for name, (n, d) in sorted(census.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"#   {n / steps:7.1f} a step {d / n:8.1f} us each  {name[:110]}")


def _gemm_flops(name, shapes):
    """2*M*K*N of a matmul op from its recorded input shapes (None if not a plain 2-D matmul)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
        elif name in ("aten::addmm", "aten::addmm_"):
            (m, k), (_, n) = shapes[1], shapes[2]
        elif name in ("aten::bmm", "aten::baddbmm"):
            (b, m, k), (_, _, n) = shapes[-2], shapes[-1]
            return 2 * b * m * k * n
        else:
            return None
        return 2 * m * k * n
    except (ValueError, TypeError, IndexError):
        return None


def print_gemms(prof, top):
    """The step's matmuls grouped by op and shape: calls, GPU ms, achieved TFLOP/s, most time first."""
    rows = {}
    for e in prof.events():
        flops = _gemm_flops(e.name, e.input_shapes or [])
        if flops is None:
            continue
        key = (e.name, str([list(s) for s in e.input_shapes if s]))
        n, ms, fl = rows.get(key, (0, 0.0, 0))
        rows[key] = (n + 1, ms + e.device_time_total / 1e3, fl + flops)
    total_ms = sum(r[1] for r in rows.values())
    total_fl = sum(r[2] for r in rows.values())
    print(f"# matmuls of one step: {sum(r[0] for r in rows.values())} calls, {total_ms:.1f} ms GPU, "
          f"{total_fl / 1e12:.1f} TFLOP, {total_fl / max(total_ms, 1e-9) / 1e9:.0f} TFLOP/s overall")
    for (name, shapes), (n, ms, fl) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"#   {ms:8.2f} ms {n:5d} calls {fl / max(ms, 1e-9) / 1e9:6.0f} TFLOP/s  {name} {shapes}")


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
    if os.environ.get("OUT"):  # the raw statistics, for reading offline with pstats
        stats.dump_stats(os.path.join(os.environ["OUT"], f"host-{os.getpid()}.pstats"))
    print(f"# host: {host * 1e3:.1f} ms a step to queue the work (under cProfile), {total * 1e3:.1f} ms until "
          f"the GPU finished; {stats.total_calls / 3:.0f} Python calls a step")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumtime").print_stats(top)


def print_cpu_ops(model, opt, x, top):
    """The host's time by aten op and autograd node over 3 unsynchronised steps: where the C++ side of
    a step (dispatch, the autograd engine's nodes, cuBLAS / cuDNN set-up) spends what cProfile books to
    ``run_backward`` and the built-in calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with torch.autograd.set_multithreading_enabled(False), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            train_step(model, opt, x)
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 3 / 1e3
    print(f"# host by op (CPU-only profile, 3 steps): {total:.1f} ms of self CPU time a step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=90))


def _python_site(e) -> str:
    """The innermost Python frame outside torch above a profiled op, else the autograd node it ran under
    (with_stack: Python frames are parent events "file(line): name")."""
    site, parent = None, e.cpu_parent
    while site is None and parent is not None:
        name = parent.name
        if name.startswith("autograd::engine::evaluate_function: "):
            site = "backward of " + name.split(": ", 1)[1]
        elif "): " in name and "torch/" not in name and not name.startswith("<"):
            site = name
        parent = parent.cpu_parent
    return site or "(no Python frame, no autograd node)"


def memset_sites(prof) -> list[tuple[str, int, float]]:
    """The step's memset kernels (``torch.zeros``, ``zero_``, cuBLAS split-K workspaces) grouped by the
    op that launched them and its Python site: (op @ site, memsets, device ms), most memsets first."""
    sites = {}
    for e in prof.events():
        sets = [k for k in getattr(e, "kernels", []) if "emset" in k.name]
        if not sets:
            continue
        key = f"{e.name} @ {_python_site(e)}"
        n, dev = sites.get(key, (0, 0.0))
        sites[key] = (n + len(sets), dev + sum(k.duration for k in sets) / 1e3)
    return sorted(((k, *v) for k, v in sites.items()), key=lambda r: (-r[1], -r[2]))


def print_memset_sites(prof, top):
    rows = memset_sites(prof)
    print(f"# memsets of one step: {sum(r[1] for r in rows)} kernels, {sum(r[2] for r in rows):.2f} ms of GPU time; by op and site:")
    for site, n, dev in rows[:top]:
        print(f"#   {n:6d} memsets {dev:8.2f} ms  {site}")


def copy_sites(prof) -> list[tuple[str, int, float, float]]:
    """``aten::copy_`` calls of a profiled run grouped by where they come from: the innermost Python
    frame outside torch itself, else (a backward run by autograd's C++ engine) the autograd node it
    ran under. Returns (site, calls, device ms, CPU ms), most device
    time first. Every clone, cast, ``.contiguous()`` and device copy ends in ``aten::copy_``."""
    sites = {}
    for e in prof.events():
        if e.name != "aten::copy_":
            continue
        site = _python_site(e)
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
