#!/usr/bin/env python3
"""The host's microseconds for one offloaded tensor's round trip (``host_offload.OffloadedTensor``).

Where the host sets a step's pace (8B QLoRA at 2,048 tokens, the 1B step), each of the ~150 layer
inputs and carried values a step offloads costs host time in three calls: the device->host copy in
forward, the prefetch, and the restore in backward. This times those calls alone, on small tensors
(their copies finish at once, so the host never waits for the GPU), with switches on and off in
alternating rounds (``--ab`` as in bench/lora_step.py's ``--ab-switch``).

    python bench/offload_host.py [--ab slothnb.models.host_offload.FAST_STREAMS=0] [--n 200] [--json OUT]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_step import _switches  # noqa: E402


def round_trips(n):
    """Median host us of (offload, prefetch, restore) over ``n`` round trips of a 1 MiB tensor."""
    import torch

    from slothnb.models import host_offload

    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    times = {"offload": [], "prefetch": [], "restore": []}
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        off = host_offload.OffloadedTensor(x)
        t1 = time.perf_counter()
        off.prefetch()
        t2 = time.perf_counter()
        off.restore()
        t3 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(dt * 1e6)
    torch.cuda.synchronize()
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ab", default="", help="switches, e.g. slothnb.models.host_offload.FAST_STREAMS=0")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    from slothnb.models import host_offload

    host_offload.LAYERS_AHEAD = 10**6  # never wait for a copy: the host's own time only
    round_trips(20)  # the pool's buffer, the side stream, first-call costs
    switches = _switches(a.ab)
    defaults = [getattr(m, attr) for m, attr, _ in switches]
    rows = {"default": [], "switched": []}
    for _ in range(a.rounds):
        for label in rows if switches else ("default",):
            for (m, attr, value), d in zip(switches, defaults):
                setattr(m, attr, d if label == "default" else value)
            rows[label].append(round_trips(a.n))
    for (m, attr, _), d in zip(switches, defaults):
        setattr(m, attr, d)
    result = {label: {k: statistics.median(r[k] for r in v) for k in v[0]} for label, v in rows.items() if v}
    for label, r in result.items():
        print(f"{label:8s} {a.ab if label == 'switched' else '':45s} " + "  ".join(f"{k} {v:7.2f} us" for k, v in r.items()))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"kind": "offload_host", "ab": a.ab, "us": result}) + "\n")


if __name__ == "__main__":
    main()
