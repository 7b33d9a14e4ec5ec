#!/usr/bin/env python3
"""Times every kernel on the GPU against PyTorch eager, torch.compile and Liger-Kernel.

Runs the three op-family benchmarks (elementwise/norm/RoPE, losses, NF4/LoRA), each of
which returns a list of rows, prints one markdown table per family and writes all rows
to $OUT/kernels.json (or bench-out/kernels.json). Method: median of CUDA-event timings
after warm-up, rotating input sets; peak memory is max_memory_allocated above the inputs.

    python bench/kernels_ops.py [elementwise] [loss] [lora]
"""
import importlib
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import gpu_info, markdown  # noqa: E402  (needs the path above)

FAMILIES = {"elementwise": "kernels_elementwise", "loss": "kernels_loss", "lora": "kernels_lora"}


def main(argv):
    names = argv or list(FAMILIES)
    out_dir = os.environ.get("OUT", "bench-out")
    os.makedirs(out_dir, exist_ok=True)
    report = gpu_info()
    for name in names:
        try:
            rows = importlib.import_module(FAMILIES[name]).bench_all("cuda")
        except Exception as e:
            rows = [{"family": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}]
        report[name] = rows
        print(f"\n## {name}\n\n{markdown(rows)}", flush=True)
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
