#!/usr/bin/env python3
"""Times every kernel on the GPU against PyTorch eager, torch.compile and Liger-Kernel.

Runs the three op-family benchmarks (elementwise/norm/RoPE, losses, NF4/LoRA), each of
which returns a list of rows, prints one markdown table per family and writes all rows
to $OUT/kernels.json (or bench-out/kernels.json). Method: median of CUDA-event timings
after warm-up, rotating input sets; peak memory is max_memory_allocated above the inputs.

    python bench/kernels.py [elementwise] [loss] [lora]
"""
import importlib
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"elementwise": "kernels_elementwise", "loss": "kernels_loss", "lora": "kernels_lora"}


def markdown(rows):
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def main(argv):
    import torch
    names = argv or list(FAMILIES)
    out_dir = os.environ.get("OUT", "bench-out")
    os.makedirs(out_dir, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
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
