#!/usr/bin/env python3
"""What one checkpointed decoder layer asks of the host, counted: aten ops and Triton launches a layer, by pass.

Why: on the H100 machines the 8B steps are paced by the host whenever its CPU slows down
(docs/perf-notes.md, section 27), and each op the written-out layer (``slothnb.models.arch.llama_layer``)
dispatches costs it ~2-15 µs. A count is deterministic where a GPU A/B cannot resolve 1%: a host lever
can be checked here, on the development machine, before a GPU run times it. Counted on the CPU with
Triton's interpreter (ops the interpreter issues are left out), one training step of a tiny Llama loaded
as the benchmark loads its models (bf16, LoRA r16 on all seven projections, packed adapters, "slothnb"
checkpointing) after a warm-up step. The CUDA path differs in a few places: each adapter gradient's cast
is folded into its matmul there (``lora._mm_as``: 11 ops fewer a backward) and SDPA runs cuDNN's kernels.

    python bench/layer_ops.py [--quant nf4] [--sites] [--json OUT]
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

PASSES = ("forward", "recompute", "backward")


def _model(quant, layers, folder):
    import torch

    from lora_step import TARGETS
    from slothnb import FastLanguageModel
    from slothnb.models.patching import patch_model
    from tiny_models import nf4_llama, save_tiny_model

    if quant == "nf4":  # bitsandbytes quantises on the CPU too; patched as from_pretrained patches
        model = nf4_llama(folder, device="cpu", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, num_hidden_layers=layers, vocab_size=128)
        patch_model(model)
    else:
        path = save_tiny_model("llama", folder, num_hidden_layers=layers)
        model, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.bfloat16, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS,
                                             use_gradient_checkpointing="slothnb", random_state=3407)
    FastLanguageModel.for_training(model)
    return model


def census(quant="none", layers=4, seq=16, sites=False):
    """{"layers": checkpointed layers, pass: {"ops": aten ops a layer, "launches": Triton launches a layer,
    "by_op": {op: a layer}, ("by_site": {op @ file:line: a layer})}} for one step after a warm-up."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from slothnb.kernels._utils import FastLaunch
    from slothnb.models.arch import llama_layer

    with tempfile.TemporaryDirectory() as folder:
        model = _model(quant, layers, folder)
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    current = ["other"]

    def in_pass(name, real):
        def run(*args, **kwargs):
            outer, current[0] = current[0], name(*args, **kwargs)
            try:
                return real(*args, **kwargs)
            finally:
                current[0] = outer
        return run

    ops, where, launches = collections.Counter(), collections.Counter(), collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            stack = traceback.extract_stack(limit=48)
            if not any("interpreter" in f.filename and "triton" in f.filename for f in stack):
                ops[current[0], str(func)] += 1
                if sites:
                    site = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(stack)
                                 if "/slothnb/" in f.filename or "/kernels/" in f.filename), "?")
                    where[current[0], f"{func} @ {site}"] += 1
            return func(*args, **(kwargs or {}))

    real_forward, real_backward, real_launch = llama_layer._forward, llama_layer._backward, FastLaunch.launch
    llama_layer._forward = in_pass(lambda plan, x, mask, recompute, **kw: "recompute" if recompute else "forward",
                                   real_forward)
    llama_layer._backward = in_pass(lambda *a, **kw: "backward", real_backward)
    FastLaunch.launch = lambda self, grid, args, kwargs: launches.update([current[0]]) or real_launch(self, grid, args, kwargs)
    try:
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # warm-up: the adapters' packing, first casts, Triton's compiles
        ops.clear(), where.clear(), launches.clear()
        with Count():
            step()
    finally:
        llama_layer._forward, llama_layer._backward, FastLaunch.launch = real_forward, real_backward, real_launch
    n = layers - 1  # "slothnb" checkpointing leaves the last layer's activations in place
    out = {"layers": n}
    for name in PASSES:
        by_op = {op: round(k / n, 2) for (p, op), k in ops.most_common() if p == name}
        out[name] = {"ops": round(sum(by_op.values()), 2), "launches": round(launches[name] / n, 2), "by_op": by_op}
        if sites:
            out[name]["by_site"] = {s: round(k / n, 2) for (p, s), k in where.most_common() if p == name}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", choices=["none", "nf4"], default="none")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sites", action="store_true", help="also count by the source line that issued each op")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = census(args.quant, args.layers, sites=args.sites)
    for name in PASSES:
        r = result[name]
        print(f"{name}: {r['ops']:.0f} aten ops, {r['launches']:.0f} Triton launches a layer")
        for key in ("by_site" if args.sites else "by_op",):
            for op, k in list(r[key].items())[:25]:
                print(f"  {k:6.2f}  {op}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quant": args.quant, **result}, f, indent=1)


if __name__ == "__main__":
    main()
