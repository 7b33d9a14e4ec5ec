#!/usr/bin/env python3
"""The host's cost of queueing each kind of op the LoRA step issues (µs a call, no synchronisation).

The 8B and 1B steps are host-bound on the H100 machines (docs/perf-notes.md, section 13): the host
needs longer to queue a step than the GPU needs to run it. This prints what one call of each op
costs the host, at the step's shapes, under the BLAS back-ends torch offers, so that the expensive
ones can be told apart from the cheap ones.

    python bench/host_ops.py [--json OUT]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_call_us(fn, n, repeats=5, warmup=1):
    """Best of ``repeats``: host µs a call of ``fn`` over ``n`` calls queued back to back (the queue
    never fills: ``n`` is small against the GPU's launch queue). Without CUDA, plain CPU timing."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
        sync()
    return round(best * 1e6, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch

    from slothnb.kernels.rms_norm import rms_norm

    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(4096, 4096, device=dev, dtype=bf)
    A = torch.randn(16, 4096, device=dev, dtype=bf)
    B = torch.randn(4096, 16, device=dev, dtype=bf)
    W = torch.randn(1024, 4096, device=dev, dtype=bf)
    h = torch.randn(4096, 1024, device=dev, dtype=bf)
    xa = torch.randn(4096, 16, device=dev, dtype=bf)
    w = torch.ones(4096, device=dev, dtype=bf)
    small = torch.zeros(16, device=dev)
    rows = {}

    def record(name, fn, n=50):
        rows[name] = per_call_us(fn, n)
        print(f"{rows[name]:8.2f} us  {name}", flush=True)

    for lib in ("default", "cublas", "cublaslt"):
        if lib != "default":
            torch.backends.cuda.preferred_blas_library(lib)
        tag = f"[{torch.backends.cuda.preferred_blas_library()}]"
        record(f"{tag} mm x[4096,4096] @ A^T[4096,16]", lambda: torch.mm(x, A.t()))
        record(f"{tag} mm x @ W^T[4096,1024]", lambda: torch.mm(x, W.t()))
        record(f"{tag} mm out_dtype=fp32 A-grad [16,4096]x[4096,4096]",
               lambda: torch.mm(A, x, out_dtype=torch.float32))
        record(f"{tag} addmm_ h[4096,1024] += xa @ B^T", lambda: h.addmm_(xa, B[:1024].t()))
        record(f"{tag} F.linear x, W", lambda: torch.nn.functional.linear(x, W))
    torch.backends.cuda.preferred_blas_library("default")
    record("torch.empty [4096,16] bf16", lambda: torch.empty(4096, 16, device=dev, dtype=bf))
    record("tensor.add_ (16 floats)", lambda: small.add_(1))
    record("tensor.to(bf16) (16 floats)", lambda: small.to(bf))
    record("view / t / reshape (3 ops)", lambda: x.view(-1).view(4096, 4096).t())
    record("torch.cuda.current_stream()", lambda: torch.cuda.current_stream())
    record("rms_norm triton fwd [4096,4096]", lambda: rms_norm(x, w, 1e-5))
    with torch.autocast("cuda", dtype=bf):
        record("autocast mm fp32 inputs cast", lambda: torch.mm(small.view(4, 4), small.view(4, 4)))
    e = torch.cuda.Event()
    record("Event.record", lambda: e.record())
    record("Event.query", lambda: e.query())
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"kind": "host_ops", "us_per_call": rows}) + "\n")


if __name__ == "__main__":
    main()
