#!/usr/bin/env python3
"""Per-decoder-layer host work of the patched LoRA forward+backward: tiny tensors on CPU, no Triton.

Why: the 1B step on the H100 is host-bound (the GPU idles while Python and autograd queue work), so
what each layer costs the host is the number to shrink. On a tiny CPU model the kernels are cheap and
that host work shows. Reports per layer of an 8-layer tiny Llama (LoRA on all 7 projections, fp32
adapters, bf16 autocast): Python function calls (cProfile, deterministic), aten ops dispatched
(deterministic; casts/copies separately: on a GPU each is a kernel launch) and the step's wall time
(min over repeats; the machine is shared, so compare counts first).

    python bench/host_bench.py [slothnb|true|none] [--ops] [--profile] [--no-pack]

``--no-pack``: leave the adapters unpacked (``pack_adapters``; get_peft_model packs them). ``--ops``: the most dispatched aten ops; ``--profile``: the functions with the most own time.
Point PYTHONPATH at a ``git archive`` of an older commit for a 'before' column.
"""
import collections
import cProfile
import os
import pstats
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tiny_models import tiny_model  # noqa: E402

from slothnb.kernels.adapter_casts import pack_adapters  # noqa: E402
from slothnb.models.lora import _adapters_in_pack_order  # noqa: E402
from slothnb.models.checkpointing import apply_gradient_checkpointing  # noqa: E402
from slothnb.models.patching import patch_model  # noqa: E402

LAYERS = 8
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def build(mode, pack=True):
    model = tiny_model("llama", seed=0, num_hidden_layers=LAYERS).train()
    patch_model(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN))
    if pack:
        pack_adapters(_adapters_in_pack_order(model))
    if mode != "none":
        apply_gradient_checkpointing(model, mode if mode != "true" else True, layers=list(range(LAYERS)))
        model.get_base_model().enable_input_require_grads()
    return model


def main(argv):
    mode = next((a for a in argv if not a.startswith("--")), "slothnb")
    torch.set_num_threads(1)
    model = build(mode, pack="--no-pack" not in argv)
    ids = torch.randint(0, 300, (1, 8))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()  # bumps the adapters' versions like a real step
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    with CountOps() as counted:
        step()
    ops = counted.ops
    copies = sum(v for k, v in ops.items() if any(s in k for s in ("_to_copy", "copy_", "clone", "contiguous")))
    profiler = cProfile.Profile()
    profiler.enable()
    step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(20):
            step()
        best = min(best, (time.perf_counter() - t) / 20)
    print(f"mode={mode}: per layer: {stats.total_calls / LAYERS:.0f} python calls, "
          f"{sum(ops.values()) / LAYERS:.1f} aten ops ({copies / LAYERS:.1f} casts/copies); "
          f"step {best * 1e3:.2f} ms (min of 7x20)")
    if "--ops" in argv:
        print(sorted(ops.items(), key=lambda kv: -kv[1])[:25])
    if "--profile" in argv:
        stats.sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main(sys.argv[1:])
