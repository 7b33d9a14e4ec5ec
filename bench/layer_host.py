#!/usr/bin/env python3
"""The host's cost of one decoder layer's passes, piece by piece (ms a call, GPU never waited on).

The 8B LoRA steps are host-bound in their backward (docs/perf-notes.md, section 13): a layer's
recompute + backward takes the host longer to queue than the GPU to run. This loads the benchmark
model, captures one checkpointed decoder layer's call during a step and times, on the host only:
its plain forward without grad, its recompute (forward with grad, under ``recomputing()``), the
autograd backward of that recompute, and the whole checkpointed forward and backward of the layer
(offload, carries, restore) as the training step runs them. Between timed calls the GPU catches up,
so the numbers are the host's own. Also a few single launches (a Triton kernel, a cuBLAS matmul).

    python bench/layer_host.py --model 8b --quant nf4 --seq 2048 --batch 2 [--layer 5] [--json OUT]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_step import MODEL_DIRS, _switches, profiling_setup, train_step  # noqa: E402


def host_ms(fn, repeats=15):
    """Median host ms of ``fn()`` over ``repeats`` calls, the GPU idle at the start of each."""
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return round(statistics.median(times) * 1e3, 3)


def backward_ms(recompute, backward, pending, repeats=15):
    """Median host ms of the layer's autograd backward, each after a fresh recompute and the GPU idle."""
    import torch

    times = []
    for _ in range(repeats):
        pending.append(recompute())
        torch.cuda.synchronize()
        t = time.perf_counter()
        backward()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


def ab_rows(spec, plain, recompute, backward, pending, rows, rounds=4):
    """The layer's three passes with the switches on and off, alternating, ``rounds`` times each."""
    switches = _switches(spec)
    defaults = [getattr(m, attr) for m, attr, _ in switches]
    results = {"default": [], "switched": []}
    for _ in range(rounds):
        for label in ("default", "switched"):
            for (m, attr, value), d in zip(switches, defaults):
                setattr(m, attr, d if label == "default" else value)
            f = host_ms(plain, repeats=7)
            r = host_ms(recompute, repeats=7)
            results[label].append((f, r, backward_ms(recompute, backward, pending, repeats=7)))
    for (m, attr, _), d in zip(switches, defaults):
        setattr(m, attr, d)
    for label, v in results.items():
        med = [round(statistics.median(x[i] for x in v), 3) for i in range(3)]
        rows[f"ab {label} {spec} (forward, recompute, backward)"] = med
        print(f"   ab {label:8s} {spec if label == 'switched' else '':40s} forward {med[0]:.3f}  recompute {med[1]:.3f}  "
              f"backward {med[2]:.3f} ms", flush=True)


def cprofile(recompute, backward, pending):
    """cProfile of 10 recomputes and 10 backwards (on this thread) -> $OUT/layer-{recompute,backward}.pstats."""
    import cProfile
    import pstats

    import torch

    out = os.environ.get("OUT", ".")
    with torch.autograd.set_multithreading_enabled(False):
        for name in ("recompute", "backward"):
            prof = cProfile.Profile()
            for _ in range(10):
                if name == "backward":
                    pending.append(recompute())
                torch.cuda.synchronize()
                prof.enable()
                if name == "backward":
                    backward()
                else:
                    recompute()
                prof.disable()
            torch.cuda.synchronize()
            prof.dump_stats(os.path.join(out, f"layer-{name}.pstats"))
            print(f"# cProfile of the layer {name} (10 calls, tottime):")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b", choices=sorted(MODEL_DIRS))
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--cprofile", action="store_true",
                    help="also cProfile 10 recomputes and 10 backwards of the layer -> $OUT/layer-*.pstats")
    ap.add_argument("--ab", action="append", default=[],
                    help="comma-separated module.ATTR=value switches (e.g. slothnb.kernels._utils.FAST_LAUNCH=0) "
                         "timed against the defaults, interleaved in this process")
    ap.add_argument("--model-root", default=os.environ.get("ANCHOR_MODEL_ROOT", "/tmp/anchor_models"))
    a = ap.parse_args()
    import torch
    from slothnb.models import checkpointing

    model, opt, x = profiling_setup(a)
    for _ in range(3):
        train_step(model, opt, x)
    layer = checkpointing.decoder_layers(checkpointing._hf_model(model))[a.layer]
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    train_step(model, opt, x)
    handle.remove()
    args, kwargs = seen["call"]
    hidden = args[0].detach()
    rows = {}

    def record(name, fn, **kw):
        rows[name] = host_ms(fn, **kw)
        print(f"{rows[name]:9.3f} ms  {name}", flush=True)

    # whole steps, split by phase (host time to queue each phase)
    phases = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(8):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[k].append(round(v * 1e3, 2))
    for k, v in phases.items():
        rows[f"step {k} (host)"] = statistics.median(v)
        print(f"{rows[f'step {k} (host)']:9.3f} ms  step {k} (host to queue)", flush=True)

    layer.gradient_checkpointing = False
    try:
        def plain():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                layer(hidden, *args[1:], **kwargs)

        def recompute():
            with torch.enable_grad(), torch.autocast("cuda", dtype=torch.bfloat16), checkpointing._recomputing():
                h = hidden.detach().requires_grad_(True)
                return layer(h, *args[1:], **kwargs), h

        record("layer forward, no grad", plain)
        record("layer recompute (grad on, recomputing)", recompute)
        grad = torch.randn_like(hidden)
        pending = []

        def backward():
            out, h = pending.pop()
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.backward([out], [grad])

        rows["layer autograd backward of the recompute"] = backward_ms(recompute, backward, pending)
        print(f"{rows['layer autograd backward of the recompute']:9.3f} ms  layer autograd backward of the recompute")
        for spec in a.ab:
            ab_rows(spec, plain, recompute, backward, pending, rows)
        if a.cprofile:
            cprofile(recompute, backward, pending)
    finally:
        layer.gradient_checkpointing = True
    for p in model.parameters():
        p.grad = None

    # single launches
    from slothnb.kernels.rms_norm import rms_norm
    w = torch.ones(hidden.shape[-1], device="cuda", dtype=torch.bfloat16)
    xb = hidden.reshape(-1, hidden.shape[-1]).to(torch.bfloat16)
    A = torch.randn(16, xb.shape[1], device="cuda", dtype=torch.bfloat16)

    def many(fn, n=50):
        def run():
            for _ in range(n):
                fn()
        return run

    record("50 x rms_norm forward (no grad)", many(lambda: rms_norm(xb, w, 1e-5)))
    with torch.no_grad():
        record("50 x rms_norm forward (no grad, inside no_grad)", many(lambda: rms_norm(xb, w, 1e-5)))
    record("50 x mm x @ A^T (rank 16)", many(lambda: torch.mm(xb, A.t())))
    record("50 x torch.empty", many(lambda: torch.empty(4096, 16, device="cuda", dtype=torch.bfloat16)))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"kind": "layer_host", "model": a.model, "quant": a.quant, "seq": a.seq,
                                "batch": a.batch, "layer": a.layer, "ms": rows,
                                "env": {k: v for k, v in os.environ.items() if k.startswith("SLOTHNB_")}}) + "\n")


if __name__ == "__main__":
    main()
