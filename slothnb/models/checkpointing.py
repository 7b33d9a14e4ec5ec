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

import collections
import contextlib
import functools
import itertools
import math
import os
import threading

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from slothnb.errors import ConfigError
from slothnb.models import host_offload, layer_graphs
from slothnb.kernels._utils import RecomputeState

CHECKPOINTING_MODES = (False, True, "slothnb")
_ALIASES = {"unsloth": "slothnb", "offload": "slothnb"}


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


# ------------------------------------------------------------------- what a forward hands its recompute
# A checkpointed layer's no-grad forward may hand values it computed to its own recompute (``carry``,
# then ``carried`` in the same order), in pinned host memory like the layer input. The recompute then
# need not compute them, and since they are the forward's own values the gradients are bit-identical.
# The patched attention hands over its output projection's result (``arch.common._project_out``), so
# the recompute skips that projection's base matmul and dequantisation (~10% of a Llama-3.1-8B
# recompute's matmul FLOPs): SLOTHNB_CARRY_ATTN_OUTPUT=0 turns it off. The MLP hands over its gate and
# up outputs (``carry_gate_up``: 74% of a recompute's matmul FLOPs, but 7x the bytes of a layer input)
# in one layer of every ``CARRY_MLP_EVERY``: the PCIe link takes no more without the forward waiting
# for it (H100, 8B, 4,096 tokens a step: every layer made the step 10-30% slower; one in three was
# ~4% faster than none, one in two 1-4% faster again, in six of six same-machine pairs over 8B at
# 4,096 and 8,192 tokens and Qwen2.5-7B in session 14). SLOTHNB_CARRY_MLP=0 turns it off. Values
# over ``CARRY_MAX_BYTES`` are not carried: at long context the host memory is the layer inputs'
# (400K tokens need 27 of 32 of them there).
CARRY = os.environ.get("SLOTHNB_CARRY_ATTN_OUTPUT", "1") == "1"
CARRY_MLP = os.environ.get("SLOTHNB_CARRY_MLP", "1") == "1"
CARRY_MLP_EVERY = max(1, int(os.environ.get("SLOTHNB_CARRY_MLP_EVERY", "2")))
# The written-out layer also hands over the attention's output and log-sum-exp (``carry_attention_state``)
# so that its recompute skips the attention forward: per byte over the link the best of the three at
# 4,096 tokens (attention grows with the square of the length). SLOTHNB_CARRY_SDPA=0 turns it off.
CARRY_SDPA = os.environ.get("SLOTHNB_CARRY_SDPA", "1") == "1"
CARRY_MAX_BYTES = 512 << 20
# Carrying pays where the GPU sets the step's pace. Below this many bytes of input to the attention
# output projection or the MLP (the Llama-3.2-1B shape at 4,096 tokens a step: 16 MiB) the step is
# host-bound and its memory target tight, so nothing is carried; 7-9B shapes at 4,096 tokens: 28-32 MiB.
CARRY_MIN_BYTES = 24 << 20
_CARRY = threading.local()


def carry(t: torch.Tensor, allowed: bool = True, tag: str = "") -> None:
    """In an offload-checkpointed layer's forward: hand ``t``'s values to the layer's recompute, which
    asks for them by ``tag``. On the GPU they go to pinned host memory when ``host_offload.offload_carried``
    finds room and a free pinned buffer; otherwise (or not ``allowed``) the recompute computes them."""
    entries = getattr(_CARRY, "record", None)
    if entries is None:
        return
    if not allowed or t.nbytes > CARRY_MAX_BYTES:
        entries.append((tag, None))
    elif not host_offload.worth_offloading(t):
        entries.append((tag, t))  # a CPU tensor: nothing to move
    else:
        entries.append((tag, host_offload.offload_carried(t)))


def carry_object(value, tag: str) -> None:
    """Hand a small non-tensor value (or tiny tensors that may stay where they are) to the recompute."""
    entries = getattr(_CARRY, "record", None)
    if entries is not None:
        entries.append((tag, value))


def carried(tag: str = ""):
    """In a recompute: what its forward handed over as ``tag`` (``carry``), or None. Entries before it
    that the recompute does not ask for (a part it computes another way) are dropped."""
    entries = getattr(_CARRY, "replay", None)
    return entries.pop(tag) if entries else None


def _worth_carrying(x: torch.Tensor) -> bool:
    """By the size of a layer part's input (the same in a forward and its recompute)."""
    return x.numel() * x.element_size() >= CARRY_MIN_BYTES


def carry_attention_output(x: torch.Tensor, out: torch.Tensor) -> None:
    """The attention output projection's result (``out``; ``x`` its input), carried when ``CARRY`` is on."""
    if CARRY and _worth_carrying(x):
        carry(out, tag="o_proj")


def carried_attention_output(x: torch.Tensor) -> torch.Tensor | None:
    """In a recompute: the attention output projection's result its forward carried, or None."""
    return carried("o_proj") if CARRY and _worth_carrying(x) else None


def carries_attention_state(like: torch.Tensor) -> bool:
    """Whether a forward recording now carries an attention state of ``like``'s size (q's)."""
    return CARRY_SDPA and getattr(_CARRY, "record", None) is not None and _worth_carrying(like)


def carry_attention_state(out: torch.Tensor, lse: torch.Tensor, rest) -> None:
    """The attention's output ``out`` (``[b, heads, s, d]``), its log-sum-exp and the rest its fused
    backward takes (``arch.sdpa_direct``), carried when ``CARRY_SDPA`` is on: the recompute then skips
    the attention forward. Both tensors or neither. ``out`` travels in the layout its kernel wrote
    ([b, heads, s, d] for cuDNN and the CPU, [b, s, heads, d] for CUDA flash), so that the backward
    reads it as the autograd path would."""
    if not (CARRY_SDPA and _worth_carrying(out)) or getattr(_CARRY, "record", None) is None:
        return
    native = out if out.is_contiguous() else out.transpose(1, 2)
    allowed = native.is_contiguous() and (not host_offload.worth_offloading(out) or (
        host_offload.pinned_buffers_ready(native, 1) and host_offload.pinned_buffers_ready(lse, 1)))
    carry(lse, allowed, "sdpa_lse")
    carry(native, allowed, "sdpa_out")
    carry_object((rest, native is not out), "sdpa_rest")


def carried_attention_state(like: torch.Tensor):
    """In a recompute: ``(out, lse, rest)`` its forward carried (``carry_attention_state``; ``like``:
    a tensor of out's size, q), or None."""
    if not (CARRY_SDPA and _worth_carrying(like)) or getattr(_CARRY, "replay", None) is None:
        return None
    lse, native, extra = carried("sdpa_lse"), carried("sdpa_out"), carried("sdpa_rest")
    if lse is None or native is None or extra is None:
        return None
    rest, transposed = extra
    return (native.transpose(1, 2) if transposed else native), lse, rest


def carry_gate_up(x: torch.Tensor):
    """``(gate_up, keep_gate_up)`` for ``lora_mlp`` of input ``x`` in an offload-checkpointed layer
    (``CARRY_MLP``): in its forward, a callback that carries G and U; in its recompute, the (G, U)
    carried, if both were. Called at the same point of both passes (the unchunked fused MLP)."""
    if not CARRY_MLP or not _worth_carrying(x):
        return None, None
    if getattr(_CARRY, "record", None) is not None:
        return None, _keep_gate_up
    if getattr(_CARRY, "replay", None) is not None:
        g, u = carried("gate"), carried("up")
        return ((g, u) if g is not None and u is not None else None), None
    return None, None


_GATE_UP_SEEN = itertools.count()  # MLP forwards offered G and U: one in CARRY_MLP_EVERY carries them


def _keep_gate_up(G: torch.Tensor, U: torch.Tensor) -> None:
    """Carry G and U in one layer of every ``CARRY_MLP_EVERY``, unless the copies already queued exceed
    one layer's G and U (a slower link: that layer is recomputed, and GPU memory held for copies stays
    bounded) or no pinned buffers are free yet (they are pinned in the background for later steps)."""
    on_gpu = host_offload.worth_offloading(G)
    allowed = next(_GATE_UP_SEEN) % CARRY_MLP_EVERY == 0
    allowed = allowed and (not on_gpu or host_offload.in_flight_bytes() <= G.nbytes + U.nbytes)
    if allowed and on_gpu:  # both or neither: pinned buffers for both must be free
        allowed = host_offload.pinned_buffers_ready(G, 2)
    entries = getattr(_CARRY, "record", None)
    carry(G, allowed, "gate")
    carry(U, allowed, "up")
    if entries is not None and on_gpu:
        host_offload.COUNTS["gate_up_carried" if entries[-1][1] is not None else "gate_up_recomputed"] += 1


@contextlib.contextmanager
def _carry_scope(role: str, entries):
    """``role`` "record" (a forward collects into ``entries``) or "replay" (a recompute pops them)."""
    previous = getattr(_CARRY, role, None)
    setattr(_CARRY, role, entries)
    try:
        yield
    finally:
        setattr(_CARRY, role, previous)


# SLOTHNB_LAZY_CARRIED=0: a recompute waits for all its carried values before it starts (benchmarks).
LAZY_CARRIED = os.environ.get("SLOTHNB_LAZY_CARRIED", "1") != "0"


class _Carried:
    """A recompute's carried values, ``(tag, value)`` in forward order, each restored when the recompute
    reads it (``carried``): the compute stream then waits for that value's host->device copy there, not
    before the layer starts. A Llama-3.1-8B layer that carries G and U brings back ~300 MB, more than the
    link moves during the layer before it; waiting for all of it up front left the GPU idle while the
    layer's norm, q/k/v and attention could already run. Their copies are queued in that order
    (``OffloadedTensor.restore``). Tags keep a recompute that runs another way than its forward (the
    written-out layer's forward, the modules' recompute) from reading one value as another."""

    def __init__(self, entries):
        self.entries = collections.deque(entries)

    def __bool__(self):
        return bool(self.entries)

    def _take(self):
        e = self.entries.popleft()[1]
        return e.restore() if isinstance(e, host_offload.OffloadedTensor) else e

    def pop(self, tag: str):
        """The value carried as ``tag`` (restored), dropping the entries before it; None if there is none."""
        ahead = next((i for i, (t, _) in enumerate(self.entries) if t == tag), None)
        if ahead is None:
            return None
        for _ in range(ahead):
            self._take()
        return self._take()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """Restore what the recompute did not read, so its pinned buffers go back to the pool."""
        while self.entries:
            self._take()


class _Call:
    """What forward and backward share about one checkpointed call: how to run it and its pytrees."""

    def __init__(self, function, leaves, spec, tensor_slots, offload_mask, preserve_rng, graphs=None,
                 written=None):
        self.function, self.leaves, self.spec = function, leaves, spec
        self.tensor_slots, self.offload_mask, self.preserve_rng = tensor_slots, offload_mask, preserve_rng
        self.graphs = graphs  # the layer's LayerGraphs when CUDA graphs are on
        # the layer written out: (forward, recompute + backward) of ``arch.llama_layer``, if it has them
        self.written = written
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
        ctx.call = call
        ctx.state = RecomputeState(tensors, call.preserve_rng)
        ctx.carried = [] if (CARRY or CARRY_MLP or CARRY_SDPA) and call.graphs is None else None  # a graph would bake host addresses
        with torch.no_grad(), _carry_scope("record", ctx.carried):
            if call.graphs is not None:
                out = call.graphs.forward(call.run, tensors)
            else:
                out = call.written[0](*call.arguments(tensors)) if call.written is not None else None
                if out is None:  # not written out: the layer's own forward
                    out = call.run(tensors)
        out_leaves, call.out_spec = tree_flatten(out)
        call.out_slots = [i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor)]
        call.out_leaves = [None if isinstance(v, torch.Tensor) else v for v in out_leaves]
        outs = tuple(out_leaves[i] for i in call.out_slots)

        kept, ctx.offloaded = [], [None] * len(tensors)
        for i, (t, off) in enumerate(zip(tensors, call.offload_mask)):
            if off and host_offload.worth_offloading(t) and host_offload.HOST_BUDGET.admit(t.nbytes):
                ctx.offloaded[i] = host_offload.OffloadedTensor(t)
                kept.append(None)
            else:  # CPU tensors (nothing to gain), shared inputs (cos/sin, masks) and inputs over the
                # host budget stay where they are (the last ones: plain recompute checkpointing)
                kept.append(t)
        ctx.save_for_backward(*kept)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        call = ctx.call
        saved = ctx.saved_tensors
        inputs = []
        for i, t in enumerate(saved):
            x = ctx.offloaded[i].restore() if ctx.offloaded[i] is not None else t
            x = x.detach()
            x.requires_grad_(ctx.needs_input_grad[i + 2] and x.is_floating_point())
            inputs.append(x)
        entries = ctx.carried or []
        if not LAZY_CARRIED:  # every carried value waited for before the layer starts (benchmarks)
            entries = [(tag, e.restore() if isinstance(e, host_offload.OffloadedTensor) else e)
                       for tag, e in reversed(entries)][::-1]
        carried = _Carried(entries)
        ctx.carried = None
        with ctx.state.replay(), _recomputing(), _carry_scope("replay", carried), carried:
            if call.graphs is not None:
                grads = call.graphs.backward(call.run, inputs, grad_outs, [x.requires_grad for x in inputs])
                if grads is not None:
                    return (None, None, *grads)
            elif call.written is not None and len(grad_outs) == 1:
                grads = call.written[1](*call.arguments(inputs), inputs, grad_outs, ctx.needs_input_grad[2:])
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
    call = _Call(function, kept_leaves, spec, slots, offload, preserve_rng_state,
                 getattr(owner, "_slothnb_graphs", None), getattr(owner, "_slothnb_written", None))

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
    if cuda_graphs is None:
        cuda_graphs = getattr(hf, "_slothnb_cuda_graphs", None)
    if cuda_graphs is None:
        cuda_graphs = layer_graphs.enabled_by_env()
    cuda_graphs = bool(cuda_graphs) and mode == "slothnb"
    hf._slothnb_cuda_graphs = cuda_graphs
    # one ModelGraphs per model: the layers' graphs share its pool and buffers (kept on re-application)
    shared = next((layer._slothnb_graphs.shared for layer in all_layers if getattr(layer, "_slothnb_graphs", None)),
                  None) or (layer_graphs.ModelGraphs() if cuda_graphs else None)
    for i, layer in enumerate(all_layers):
        layer.gradient_checkpointing = i in chosen
        if mode == "slothnb":
            layer._gradient_checkpointing_func = offloaded_checkpoint
        if not cuda_graphs:
            layer.__dict__.pop("_slothnb_graphs", None)
        elif getattr(layer, "_slothnb_graphs", None) is None:
            layer._slothnb_graphs = layer_graphs.LayerGraphs(layer, shared)
    if default_policy and len(all_layers) > 1:  # the last layer decides per call, by its input's size
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
