"""Measurement shared by the kernel benchmarks (bench/kernels_*.py).

Two times per row, both after warm-up (so compilation and autotuning are not timed):

- ``ms``: per-call *latency*, the median of CUDA-event timings around one call. It includes the
  host's work for that call (Python, autograd, allocations, kernel launches): for a 50 us kernel
  that overhead can dominate, and it is what a user sees only when the GPU waits on the host.
- ``gpu_ms``: per-call *device time*, the summed durations of every kernel, memcpy and memset one
  call puts on the GPU, from torch.profiler's CUDA activity (median over several calls). Host
  overhead and idle gaps are not in it: it is what the call costs inside a training step whose
  host runs ahead of the GPU, and what a bandwidth floor should be compared with.

Runs may cycle through several input sets so no run finds its inputs in L2. Extra peak memory
is ``max_memory_allocated`` during one more run above what was allocated before it (what the
inputs already hold is not counted). On a CPU device ``ms`` is wall-clock and ``gpu_ms`` and the
memory are None, so the benchmarks can be smoke-run without a GPU.
"""
import json
import os
import statistics
import time

import torch


def time_and_memory(run, device="cuda", reset=None, *, warmup=3, repeats=10, sets=1):
    """(median per-call latency in ms, extra peak MiB or None off CUDA) of ``run(k)``, k cycling
    over ``range(sets)``; each timing is one call between two CUDA events (host overhead included).

    ``reset(k)``, if given, runs after every call outside the timed region (restores buffers an
    in-place kernel wrote, clears ``.grad``).
    """
    cuda = torch.device(device).type == "cuda"
    for k in range(warmup):
        run(k % sets)
        if reset:
            reset(k % sets)
    times = []
    for k in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(k % sets)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run(k % sets)
            times.append((time.perf_counter() - t0) * 1e3)
        if reset:
            reset(k % sets)
    if not cuda:
        return statistics.median(times), None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(0)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    if reset:
        reset(0)
    return statistics.median(times), peak


MARK = "spin_kernel"  # torch.cuda._sleep's kernel: a marker between a call's kernels and the reset's


def _split_calls(events, with_reset):
    """Per-call device µs from ``(name, µs)`` device events in start order, where a marker kernel
    follows every call and (``with_reset``) every reset: [call][M][reset][M][call][M]..."""
    per_call, acc, in_reset = [], 0.0, False
    for name, us in events:
        if MARK in name:
            if not in_reset:
                per_call.append(acc)
            acc, in_reset = 0.0, with_reset and not in_reset
        elif not in_reset:
            acc += us
    return per_call


def device_ms(run, device="cuda", reset=None, *, calls=10, sets=1):
    """Median device time in ms of one ``run(k)`` (k cycling over ``range(sets)``): the sum of the
    durations of the kernels, memcpys and memsets it launched, from torch.profiler. None off CUDA
    (or if the profiler's events cannot be split into calls).

    ``reset(k)`` runs between calls and is not counted: a marker kernel (``torch.cuda._sleep``) is
    put on the stream after every call and every reset, and the device events in between are
    attributed accordingly. Call after warm-up (time_and_memory does it).
    """
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    def mark():
        torch.cuda.synchronize()
        torch.cuda._sleep(100)
        torch.cuda.synchronize()

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for k in range(calls):
            run(k % sets)
            mark()
            if reset:
                reset(k % sets)
                mark()
    cuda = torch.autograd.DeviceType.CUDA
    events = sorted((e.time_range.start, e.name, e.time_range.elapsed_us())
                    for e in prof.events() if e.device_type == cuda)
    per_call = _split_calls([(name, us) for _, name, us in events], reset is not None)
    if len(per_call) != calls:
        return None
    return statistics.median(per_call) / 1e3


def measure(rows, base, impl, step, reset=None):
    """Times ``step()`` (warm-up 3, median of 10) and appends ``base`` + impl + ms (per-call latency)
    + gpu_ms (per-call device time, see :func:`device_ms`) + extra_peak_MiB to ``rows``, or + error
    when it runs out of memory or fails (the other rows still run)."""
    row = dict(base, impl=impl)
    try:
        ms, mib = time_and_memory(lambda k: step(), reset=reset and (lambda k: reset()))
        gpu = device_ms(lambda k: step(), reset=reset and (lambda k: reset()))
        row.update(ms=round(ms, 3), gpu_ms=None if gpu is None else round(gpu, 3), extra_peak_MiB=None if mib is None else round(mib, 1))
    except torch.cuda.OutOfMemoryError:
        row.update(error="OOM")
    except Exception as e:  # a missing compiler or an API change in a competitor: report, go on
        row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
    torch.cuda.empty_cache()
    rows.append(row)
    return row


def markdown(rows):
    """One markdown table over the union of the rows' keys (a missing or None cell is blank)."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r.get(k) is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def gpu_info():
    """The header every JSON report carries: which GPU and which torch produced the numbers."""
    return {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def write_json(filename, payload):
    """Writes ``payload`` to ``$OUT/filename`` when OUT is set; returns the path or None."""
    out = os.environ.get("OUT")
    if not out:
        return None
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, filename)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path
