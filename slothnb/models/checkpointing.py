"""Gradient checkpointing: off, standard, or "slothnb" (recompute + inputs offloaded to pinned CPU memory).

Transformers 5.x decoder layers are ``GradientCheckpointingLayer``s: when ``layer.gradient_checkpointing``
and ``layer.training`` they call ``layer._gradient_checkpointing_func(partial(forward, **kwargs), *args)``.
Standard checkpointing keeps every layer's input hidden states on the GPU (``layers x tokens x hidden``
bytes, the term that dominates at long sequence). ``"slothnb"`` installs ``offloaded_checkpoint`` per layer
instance instead: the forward runs without saving activations and copies the layer's input to pinned
CPU memory on a side stream; the backward brings it back, recomputes the layer with grad on (same RNG
state, same autocast) and backprops through it. GPU activation memory then stays ~one layer's worth.

``checkpoint_policy`` decides how many layers need checkpointing at all for a given activation budget:
layers that fit keep their activations (no recompute cost), the rest are offload-checkpointed.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from slothnb.errors import ConfigError
from slothnb.models import carrying, graph_capture, graph_pacing, host_offload, layer_graphs
from slothnb.models.carrying import _Carried, _carry_scope
from slothnb.kernels._utils import RecomputeState

CHECKPOINTING_MODES = (False, True, "slothnb")
_ALIASES = {"unsloth": "slothnb", "offload": "slothnb"}

# Benchmarks only: a list (anything with ``append``) to which each checkpointed call appends ("f" | "b",
# time.perf_counter_ns()) as its forward and its backward start, so a slow step's host time can be placed
# on a layer (bench/lora_step.py, "Host by step"). None, the default, records nothing.
HOST_MARKS: list | None = None


def normalize_mode(mode):
    """False / True / "slothnb" from what a user may pass (None, "unsloth", ...); ConfigError otherwise."""
    if mode is None:
        return False
    if isinstance(mode, str):
        mode = _ALIASES.get(mode.lower(), mode.lower())
        if mode in ("true", "false"):
            return mode == "true"
    if mode is True or mode is False or mode == "slothnb":
        return mode
    raise ConfigError(
        f"use_gradient_checkpointing={mode!r} is not a checkpointing mode: use False (fastest, most memory), "
        'True (standard recompute) or "slothnb" (recompute + activations offloaded to CPU, least GPU memory).'
    )


# ------------------------------------------------------------------------------------ autograd function
_RECOMPUTE = threading.local()  # autograd runs CUDA backwards on its own thread: the flag is per thread


def recomputing() -> bool:
    """True while a checkpointed layer is re-run inside its backward. The outputs of that run are only
    the roots of a backward (their values are never read), so a layer part whose output feeds nothing
    but the residual sum may skip computing it (``lora_mlp(output_needed=False)``)."""
    return getattr(_RECOMPUTE, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing():
    _RECOMPUTE.depth = getattr(_RECOMPUTE, "depth", 0) + 1
    try:
        yield
    finally:
        _RECOMPUTE.depth -= 1


class _Call:
    """What forward and backward share about one checkpointed call: how to run it and its pytrees."""

    def __init__(self, function, leaves, spec, tensor_slots, offload_mask, preserve_rng, graphs=None,
                 written=None):
        self.function, self.leaves, self.spec = function, leaves, spec
        self.tensor_slots, self.offload_mask, self.preserve_rng = tensor_slots, offload_mask, preserve_rng
        self.graphs = graphs  # the layer's LayerGraphs when CUDA graphs are on
        # the layer written out: (forward, recompute + backward) of ``arch.llama_layer``, if it has them
        self.written = written
        self.pacer = None  # graph_pacing.SharePacer when this call marks the step
        self.memo = {}  # what the written-out forward planned, for its backward (``llama_layer.forward``)
        self.out_leaves = self.out_spec = self.out_slots = None

    def arguments(self, tensors):
        """(args, kwargs) of the call with these tensors in their places."""
        leaves = list(self.leaves)
        for slot, t in zip(self.tensor_slots, tensors):
            leaves[slot] = t
        return tree_unflatten(leaves, self.spec)

    def run(self, tensors):
        args, kwargs = self.arguments(tensors)
        return self.function(*args, **kwargs)


class OffloadedCheckpoint(torch.autograd.Function):
    """Recompute-in-backward with the offloadable inputs held in pinned CPU memory between the passes."""

    @staticmethod
    def forward(ctx, call: _Call, anchor, *tensors):
        if HOST_MARKS is not None:
            HOST_MARKS.append(("f", time.perf_counter_ns()))
        ctx.call = call
        ctx.state = RecomputeState(tensors, call.preserve_rng)
        graphed = call.graphs is not None and call.graphs.forward_graphed(tensors)
        # a graphed forward carries nothing: a graph would bake the pinned buffers' host addresses in
        ctx.carried = [] if carrying.any_switched_on() and not graphed else None
        if graphed and tensors:
            carrying.pass_gate_up_turn(tensors[0])
        with torch.no_grad(), _carry_scope("record", ctx.carried):
            if graphed:
                out = call.graphs.forward(call.run, tensors)
            else:
                out = call.written[0](*call.arguments(tensors), memo=call.memo) if call.written is not None else None
                if out is None:  # not written out: the layer's own forward
                    out = call.run(tensors)
        out_leaves, call.out_spec = tree_flatten(out)
        call.out_slots = [i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor)]
        call.out_leaves = [None if isinstance(v, torch.Tensor) else v for v in out_leaves]
        outs = tuple(out_leaves[i] for i in call.out_slots)

        kept, ctx.offloaded = [], [None] * len(tensors)
        for i, (t, off) in enumerate(zip(tensors, call.offload_mask)):
            if off and host_offload.worth_offloading(t) and host_offload.HOST_BUDGET.admit(t.nbytes):
                ctx.offloaded[i] = host_offload.OffloadedTensor(t, far_ahead=not graphed)
                kept.append(None)
            else:  # CPU tensors (nothing to gain), shared inputs (cos/sin, masks) and inputs over the
                # host budget stay where they are (the last ones: plain recompute checkpointing)
                kept.append(t)
        ctx.save_for_backward(*kept)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        if HOST_MARKS is not None:
            HOST_MARKS.append(("b", time.perf_counter_ns()))
        grads = OffloadedCheckpoint._backward(ctx, *grad_outs)
        if ctx.call.pacer is not None:
            ctx.call.pacer.step_end()
        return grads

    @staticmethod
    def _backward(ctx, *grad_outs):
        call = ctx.call
        saved = ctx.saved_tensors
        inputs = []
        for i, t in enumerate(saved):
            x = ctx.offloaded[i].restore() if ctx.offloaded[i] is not None else t
            x = x.detach()
            x.requires_grad_(ctx.needs_input_grad[i + 2] and x.is_floating_point())
            inputs.append(x)
        entries = ctx.carried or []
        if not carrying.LAZY_CARRIED:  # every carried value waited for before the layer starts (benchmarks)
            entries = [(tag, e.restore() if isinstance(e, host_offload.OffloadedTensor) else e)
                       for tag, e in reversed(entries)][::-1]
        carried = _Carried(entries)
        ctx.carried = None
        with ctx.state.replay(), _recomputing(), _carry_scope("replay", carried), carried:
            if call.graphs is not None:
                grads = call.graphs.backward(call, inputs, grad_outs, [x.requires_grad for x in inputs], carried)
                if grads is not None:
                    return (None, None, *grads)
            if call.written is not None and len(grad_outs) == 1:
                grads = call.written[1](*call.arguments(inputs), inputs, grad_outs, ctx.needs_input_grad[2:],
                                        memo=call.memo)
                if grads is not None:  # done without an autograd graph; None: not covered, nothing done
                    return (None, None, *grads)
            out = call.run(inputs)
        out_leaves, _ = tree_flatten(out)
        outs = [out_leaves[i] for i in call.out_slots]
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [x.grad if x.requires_grad else None for x in inputs]
        return (None, None, *grads)


def _owner_module(function):
    """The nn.Module a checkpointed callable runs, if recognisable (partial(forward, self) or a bound method)."""
    while isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
        function = function.func
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def offloaded_checkpoint(function, *args, use_reentrant=None, preserve_rng_state=True, **kwargs):
    """Drop-in for ``torch.utils.checkpoint.checkpoint`` as a layer's ``_gradient_checkpointing_func``.

    Positional tensor inputs (the hidden states) are offloaded to pinned CPU memory; keyword tensors
    (``position_embeddings`` cos/sin, masks) are shared by every layer and stay put. Tensors inside a
    ``functools.partial``'s keywords become autograd inputs too, so their gradients are not lost.
    Like torch's reentrant checkpoint, the backward accumulates weight gradients with
    ``torch.autograd.backward``: train with ``loss.backward()`` (as the HF Trainer does), not
    ``torch.autograd.grad``, and backward once per forward (no ``retain_graph`` replays).
    """
    del use_reentrant  # accepted for signature compatibility; this function is always "reentrant-style"
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    bound_kwargs = {}
    if isinstance(function, functools.partial) and function.keywords:
        bound_kwargs = dict(function.keywords)
        function = functools.partial(function.func, *function.args)
    leaves, spec = tree_flatten((args, {**bound_kwargs, **kwargs}))
    n_arg_leaves = len(tree_flatten(args)[0])
    slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    tensors = [leaves[i] for i in slots]
    offload = [i < n_arg_leaves and leaves[i].is_floating_point() for i in slots]
    # The call keeps only the non-tensor leaves: holding the tensors here would keep every layer's
    # input alive on the GPU until backward, which is exactly what offloading is meant to avoid.
    kept_leaves = [None if isinstance(v, torch.Tensor) else v for v in leaves]
    owner = _owner_module(function)
    graphs = getattr(owner, "_slothnb_graphs", None)
    pacer = graphs.shared.pacer if graphs is not None else None
    if pacer is not None and graphs.index == pacer.first:  # the step starts here ("adaptive" graphs)
        pacer.step_start()
    else:
        pacer = None
    if graphs is not None and not graphs.active():  # outside the pacer's or layer_graphs.SHARE's share, or off
        graphs = None
    call = _Call(function, kept_leaves, spec, slots, offload, preserve_rng_state, graphs,
                 getattr(owner, "_slothnb_written", None))
    call.pacer = pacer  # its backward ends the step's engine work

    anchor = None
    if not any(t.requires_grad for t in tensors):
        # No input needs grad, yet trainable weights inside the layer (LoRA) do: an anchor that requires
        # grad makes autograd record this node so its backward runs (what enable_input_require_grads does).
        if owner is None or any(p.requires_grad for p in owner.parameters()):
            anchor = torch.empty(0, requires_grad=True)
    outs = OffloadedCheckpoint.apply(call, anchor, *tensors)
    out_leaves = list(call.out_leaves)
    for slot, o in zip(call.out_slots, outs):
        out_leaves[slot] = o
    return tree_unflatten(out_leaves, call.out_spec)


# ---------------------------------------------------------------------------------------------- policy
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's checkpointable decoder layers, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def layer_activation_bytes(config, tokens: int, dtype_bytes: int = 2) -> int:
    """Rough bytes one decoder layer saves for backward without checkpointing.

    Counted for a Llama-style block with SDPA: norm inputs/outputs, q/k/v, attention output, o_proj
    input (~7 x hidden + 2 x kv), gate/up/act/product (~4 x intermediate). An estimate for budgeting,
    not a measurement.
    """
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    heads = text.num_attention_heads
    kv = hidden * getattr(text, "num_key_value_heads", heads) // heads
    return int(tokens * (7 * hidden + 2 * kv + 4 * inter) * dtype_bytes)


def checkpoint_policy(model: nn.Module, budget_gib: float | None = None, batch_size: int = 1,
                      seq_len: int | None = None, dtype_bytes: int = 2) -> list[int]:
    """Indices of the decoder layers to checkpoint so activations fit ``budget_gib``.

    ``None`` checkpoints every layer. Otherwise: each layer kept un-checkpointed costs
    ``layer_activation_bytes``; the recompute of one checkpointed layer needs one layer's worth too.
    The last layers (the first ones the backward reaches) keep their activations, the rest are
    checkpointed. A budget smaller than one layer checkpoints everything.
    """
    n = len(decoder_layers(model))
    if budget_gib is None:
        return list(range(n))
    if budget_gib < 0:
        raise ConfigError(f"checkpoint budget_gib={budget_gib} must be >= 0 (GiB of activation memory).")
    if seq_len is None:
        seq_len = getattr(getattr(model, "config", None), "max_position_embeddings", 2048)
    per_layer = layer_activation_bytes(model.config, batch_size * seq_len, dtype_bytes)
    budget = budget_gib * 1024**3
    keep = n if budget >= n * per_layer else max(0, math.floor(budget / per_layer) - 1)
    return list(range(n - keep))


def default_offload_layers(n_layers: int) -> list[int]:
    """What ``"slothnb"`` checkpoints when neither layers nor a budget are given: all but the last layer.

    The last decoder layer is the first one the backward reaches: checkpointed, it is recomputed
    right after the loss, so its activations are on the GPU during its backward either way. Keeping
    them from the forward adds them only to the short window of the final norm + loss, whose
    working set (one chunk of logits, ``fused_linear_cross_entropy``) is of the size of a layer
    backward's own temporaries; in exchange that layer skips its offload, its host->device copy
    (which, being the first, cannot be prefetched) and its recompute. Every earlier layer is
    offload-checkpointed. A one-layer model is checkpointed.
    """
    return list(range(n_layers - 1)) if n_layers > 1 else list(range(n_layers))


LAST_LAYER_KEEP_BYTES = 256 * 2**20  # the last layer keeps its activations while its input is this small
# With CUDA graphs the default policy offload-checkpoints the last layer too (SLOTHNB_GRAPH_LAST_LAYER=0: it
# keeps its activations as without graphs). Why: its activations (~250 MiB at Llama-3.2-1B, 4,096 tokens a
# step) are held through the loss, the step's peak, and its eager backward's temporaries take memory
# beside the graph pool, which holds the same kind of temporaries for every other layer. As a graph its
# recompute costs the GPU one layer's forward and the host almost nothing.
GRAPH_LAST_LAYER = os.environ.get("SLOTHNB_GRAPH_LAST_LAYER", "1") != "0"


def last_layer_checkpoint(function, *args, **kwargs):
    """The last decoder layer under the default policy: kept (no offload, no recompute) while its input
    is at most ``LAST_LAYER_KEEP_BYTES`` (32K tokens of a 4096-wide model), offload-checkpointed beyond,
    where its activations alone would be tens of GiB (about 25 GB at 400K tokens on the 8B shape)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.numel() * x.element_size() <= LAST_LAYER_KEEP_BYTES:
        return function(*args, **kwargs)
    return offloaded_checkpoint(function, *args, **kwargs)


def apply_gradient_checkpointing(model: nn.Module, mode, layers: list[int] | None = None,
                                 budget_gib: float | None = None, batch_size: int = 1,
                                 seq_len: int | None = None, cuda_graphs: bool | None = None) -> list[int]:
    """Switch ``model`` (a transformers PreTrainedModel, or a peft model around one) to ``mode``.

    ``layers`` (or a ``budget_gib`` through ``checkpoint_policy``) restricts checkpointing to those decoder
    layer indices; without either, True checkpoints every layer and "slothnb" every layer but the last
    (``default_offload_layers``). ``cuda_graphs`` (``"slothnb"`` only; default: the model's earlier
    choice, else ``SLOTHNB_CUDA_GRAPHS``) replays each offload-checkpointed layer as CUDA graphs
    (``slothnb.models.layer_graphs``). Returns the indices checkpointed. Note: a HF ``Trainer`` run with
    ``gradient_checkpointing=True`` re-enables standard checkpointing and would undo "slothnb"; train with
    ``gradient_checkpointing=False`` in its arguments.
    """
    mode = normalize_mode(mode)
    hf = _hf_model(model)
    if mode is False:
        for layer in decoder_layers(hf):
            layer.__dict__.pop("_slothnb_graphs", None)
        if is_checkpointing(hf):
            disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
            disable()
        hf._slothnb_checkpointing = False
        return []
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(hf).__name__} does not support gradient checkpointing: "
                          "pass use_gradient_checkpointing=False.")
    enable = getattr(hf, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.2x
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    all_layers = decoder_layers(hf)
    default_policy = layers is None and budget_gib is None and mode == "slothnb"
    if default_policy:
        layers = default_offload_layers(len(all_layers))
    elif layers is None:
        layers = checkpoint_policy(hf, budget_gib, batch_size, seq_len)
    chosen = set(layers)
    if bad := chosen - set(range(len(all_layers))):
        raise ConfigError(f"checkpoint layers {sorted(bad)} do not exist: the model has {len(all_layers)} "
                          f"decoder layers (0..{len(all_layers) - 1}).")
    cuda_graphs = layer_graphs.choice(cuda_graphs)
    if cuda_graphs is None:
        cuda_graphs = getattr(hf, "_slothnb_cuda_graphs", None)
    if cuda_graphs is None:
        cuda_graphs = layer_graphs.default_for(hf)
    if mode != "slothnb":
        cuda_graphs = False
    hf._slothnb_cuda_graphs = cuda_graphs
    adaptive, forward_only = cuda_graphs == layer_graphs.ADAPTIVE, cuda_graphs == layer_graphs.FORWARD_ONLY
    # one ModelGraphs per model: the layers' graphs share its pool and buffers (kept on re-application)
    shared = next((layer._slothnb_graphs.shared for layer in all_layers if getattr(layer, "_slothnb_graphs", None)),
                  None) or (graph_capture.ModelGraphs() if cuda_graphs else None)
    if shared is not None:  # "adaptive": a pacer marks each step at the first checkpointed layer
        first = min(chosen, default=0)
        keep = shared.pacer if shared.pacer is not None and shared.pacer.first == first else None
        shared.pacer = (keep or graph_pacing.SharePacer(first=first)) if adaptive else None
        shared.forward_only = forward_only
    for i, layer in enumerate(all_layers):
        layer.gradient_checkpointing = i in chosen
        if mode == "slothnb":
            layer._gradient_checkpointing_func = offloaded_checkpoint
        if not cuda_graphs:
            layer.__dict__.pop("_slothnb_graphs", None)
        elif getattr(layer, "_slothnb_graphs", None) is None:
            layer._slothnb_graphs = layer_graphs.LayerGraphs(layer, shared, index=i)
    if default_policy and (cuda_graphs is True or forward_only) and GRAPH_LAST_LAYER:
        chosen = set(range(len(all_layers)))
        for layer in all_layers:
            layer.gradient_checkpointing = True
    elif default_policy and len(all_layers) > 1:  # the last layer decides per call, by its input's size
        all_layers[-1].gradient_checkpointing = True
        all_layers[-1]._gradient_checkpointing_func = last_layer_checkpoint
    hf._slothnb_checkpointing = mode
    return sorted(chosen)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether checkpointing is on (``is_activation_checkpointing`` from transformers 5.2x, else the old name)."""
    hf = _hf_model(model)
    flag = getattr(type(hf), "is_activation_checkpointing", None)
    return bool(hf.is_activation_checkpointing if flag is not None else getattr(hf, "is_gradient_checkpointing", False))


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (PeftModel -> LoraModel -> PreTrainedModel)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
