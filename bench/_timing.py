"""Measurement shared by the kernel benchmarks (bench/kernels_*.py).

Median of CUDA-event timings after warm-up (so compilation and autotuning are not timed),
optionally cycling through several input sets so no run finds its inputs in L2; extra peak
memory is ``max_memory_allocated`` during one more run above what was allocated before it
(what the inputs already hold is not counted). On a CPU device the time is wall-clock and the
memory is None, so the benchmarks can be smoke-run without a GPU.
"""
import json
import os
import statistics
import time

import torch


def time_and_memory(run, device="cuda", reset=None, *, warmup=3, repeats=10, sets=1):
    """(median ms, extra peak MiB or None off CUDA) of ``run(k)``, k cycling over ``range(sets)``.

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


def measure(rows, base, impl, step, reset=None):
    """Times ``step()`` (warm-up 3, median of 10) and appends ``base`` + impl + ms + extra_peak_MiB
    to ``rows``, or + error when it runs out of memory or fails (the other rows still run)."""
    row = dict(base, impl=impl)
    try:
        ms, mib = time_and_memory(lambda k: step(), reset=reset and (lambda k: reset()))
        row.update(ms=round(ms, 3), extra_peak_MiB=round(mib, 1))
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
