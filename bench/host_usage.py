"""What the host did in each benchmarked step: how fast this host is, Python's GC pauses, the process's CPU,
context switches and page faults, and when each checkpointed layer was queued against when the GPU reached it.

Why: the same code on H100s of one kind ran a step at the pace of the GPU on one machine and of the host on
another, and a host's pace varies minute to minute (docs/perf-notes.md, sections 12, 21, 27). These say
which, and where in the step. ``bench/lora_step.py`` records them per step; ``bench/report.py`` prints them.
"""
import gc
import resource
import time

import torch

_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)  # the calling thread's own usage (Linux)


def host_probe(repeats: int = 3) -> dict:
    """How fast this process's host thread is: a pure-Python loop (ns an iteration), a tiny CPU torch op
    (µs each) and, on CUDA, the host side of a tiny kernel launch (µs each); the best of ``repeats``.

    Why: a host-bound step (the 1B case) runs at the host's pace, and session 13 saw the same code run
    at 26-48K tok/s on H100 machines whose processes each held a different steady pace. Recorded before
    and after the timed steps, so a slow run can be told from a slow host.
    """

    def best(fn, n):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(n)
            times.append((time.perf_counter() - t) / n)
        return min(times)

    def loop(n):
        s = 0
        for i in range(n):
            s += i

    def ops(n, x=torch.zeros(1)):
        for _ in range(n):
            x.add_(1)

    out = {"python_ns_per_iter": round(best(loop, 200_000) * 1e9, 2),
           "cpu_op_us": round(best(ops, 2_000) * 1e6, 2), "cuda_launch_us": None}
    if torch.cuda.is_available():
        y = torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        out["cuda_launch_us"] = round(best(lambda n: ops(n, y), 2_000) * 1e6, 2)
        torch.cuda.synchronize()
    return out


class GcPauses:
    """Python's cyclic-GC pauses inside each step's queueing (``gc.callbacks``): [ms, collections of
    generation 0, 1, 2]. A host-bound step pays them in full."""

    def __init__(self):
        self.steps, self._t = [], None
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None and self.steps:
            row = self.steps[-1]
            row[0] += (time.perf_counter() - self._t) * 1e3
            row[1 + info["generation"]] += 1

    def begin_step(self):
        self.steps.append([0.0, 0, 0, 0])

    def close(self):
        gc.callbacks.remove(self._callback)
        return [[round(r[0], 2), *r[1:]] for r in self.steps]


class _Marks(list):
    """``checkpointing.HOST_MARKS`` for a CUDA run: each mark the engine appends, ``(kind, host ns)``, is
    kept with a CUDA event recorded at that point of the stream (events reused step to step)."""

    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda, self.pool = cuda, []

    def append(self, item):
        event = None
        if self.cuda and not torch.cuda.is_current_stream_capturing():  # (a mark inside a capture: host time only)
            if len(self.pool) <= len(self):
                self.pool.append(torch.cuda.Event(enable_timing=True))
            event = self.pool[len(self)]
            event.record()
        super().append((*item, event))


def gpu_by_layer(marks, t0_ns, elapsed_ms):
    """The GPU side of a step's marks: per kind ("f", "b") the ms between consecutive layer starts on the
    GPU (``gpu_fwd``, ``gpu_bwd``) and how far the GPU was behind the host as each layer was queued
    (``behind_fwd``, ``behind_bwd``: GPU ms from the step's start to reaching the mark, less the host's).
    Near 0 the GPU was waiting for the host there; ``elapsed_ms(event)`` gives the GPU's ms since the
    step's start event."""
    out = {}
    for kind, name in (("f", "fwd"), ("b", "bwd")):
        rows = [(t, elapsed_ms(e)) for k, t, e in marks if k == kind and e is not None]
        if not rows:
            continue
        gpu = [g for _, g in rows]
        out[f"gpu_{name}"] = [round(b - a, 2) for a, b in zip(gpu, gpu[1:])]
        out[f"behind_{name}"] = [round(g - (t - t0_ns) / 1e6, 2) for t, g in rows]
    return out


class HostUsage:
    """What the host did in each step besides queueing: the process's CPU ms (all threads: autograd runs
    the backward on its own), the main thread's, page faults, and context switches (involuntary ones are
    the kernel taking the CPU away), from ``getrusage``; the ms between the checkpointed layers' starts
    on the host (``checkpointing.HOST_MARKS``) and, on CUDA, on the GPU, with how far the GPU was behind
    the host at each. Why: on some machines a step's host time jumps 100+ ms with no GC pause and no wait
    on the GPU (session 28); this says whether the host lost the CPU, faulted pages or ran slower
    everywhere, where in the step, and where the GPU waited for it."""

    def __init__(self, cuda: bool = False):
        from slothnb.models import checkpointing

        self.checkpointing, self.steps, self.cuda = checkpointing, [], cuda
        checkpointing.HOST_MARKS = _Marks(cuda)
        if cuda:
            self._start_event = torch.cuda.Event(enable_timing=True)

    def begin_step(self):
        """Call with the GPU idle (after a synchronisation): its start event is then the host's start too."""
        self.checkpointing.HOST_MARKS.clear()
        if self.cuda:
            self._start_event.record()
        self._start = (time.perf_counter_ns(), resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(_THREAD))

    def end_step(self):
        """Call when the host has queued the step (before the synchronisation)."""
        end = time.perf_counter_ns()
        t0, proc0, thread0 = self._start
        proc, thread = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(_THREAD)
        row = {"cpu_ms": round((proc.ru_utime + proc.ru_stime - proc0.ru_utime - proc0.ru_stime) * 1e3, 1),
               "main_cpu_ms": round((thread.ru_utime + thread.ru_stime - thread0.ru_utime - thread0.ru_stime) * 1e3, 1),
               "sys_ms": round((proc.ru_stime - proc0.ru_stime) * 1e3, 1),
               "minflt": proc.ru_minflt - proc0.ru_minflt, "majflt": proc.ru_majflt - proc0.ru_majflt,
               "nvcsw": proc.ru_nvcsw - proc0.ru_nvcsw, "nivcsw": proc.ru_nivcsw - proc0.ru_nivcsw}
        fwd = [t for kind, t, _ in self.checkpointing.HOST_MARKS if kind == "f"]
        bwd = [t for kind, t, _ in self.checkpointing.HOST_MARKS if kind == "b"]
        ms = lambda a, b: round((b - a) / 1e6, 2)  # noqa: E731
        if fwd and bwd:  # before the first layer; mid: the last layer's forward, head, loss, its backward; after
            row.update(before=ms(t0, fwd[0]), fwd=[ms(a, b) for a, b in zip(fwd, fwd[1:])], mid=ms(fwd[-1], bwd[0]),
                       bwd=[ms(a, b) for a, b in zip(bwd, bwd[1:])], after=ms(bwd[-1], end))
        self.steps.append(row)

    def gpu_step(self):
        """Call after the step's synchronisation: the GPU side of its marks (``gpu_by_layer``)."""
        if self.cuda and self.steps:
            start = self._start_event
            self.steps[-1].update(gpu_by_layer(self.checkpointing.HOST_MARKS, self._start[0], start.elapsed_time))

    def close(self):
        self.checkpointing.HOST_MARKS = None
        return self.steps
