"""CUDA graphs of "slothnb"-checkpointed decoder layers: one replay instead of a layer's launches.

Why: a small model's LoRA step is bound by the host, not the GPU. Llama-3.2-1B at batch 2 x 2048 on
an H100 launches ~2,600 kernels a step; the GPU runs them in ~78 ms, while the host needs 125-163 ms
of Python, autograd and launch work to queue them (docs/benchmarks.md). Under "slothnb"
checkpointing every checkpointed layer runs twice as a function of a few tensors with fixed shapes:
its forward, without autograd, and its backward, which recomputes the layer and backpropagates
through it. Each is captured once as a CUDA graph and then replayed with a handful of launches.

How (per layer, per input signature: shapes, dtypes, autocast, which inputs need grad):
- Inputs are copied into static buffers that the graph reads. The buffers are shared by all layers
  and both passes (everything runs one after another on one stream), and an input that is the very
  tensor copied last time (the rotary cos/sin every layer receives) is not copied again.
- The forward graph writes the layer's output into a shared static buffer, which is cloned out;
  the backward reads its output gradient from that same buffer.
- The backward graph recomputes the layer with grad on, calls ``torch.autograd.grad`` for the
  inputs that need it and the layer's trainable parameters, and writes the input gradient into a
  shared buffer. Parameter gradients are accumulated into ``.grad`` after each replay.
- All graphs share one memory pool: a graph's temporaries are dead once it has run, so the next
  graph may reuse them; what a graph hands back is consumed before any other graph runs.
- The first call of a signature runs eagerly (it also warms up Triton's JIT and cuBLAS), the second
  captures, later ones replay. A layer with active dropout, or inputs that are not all CUDA
  tensors, runs eagerly.

What a capture must not see: cached casts (``kernels.adapter_casts._cast`` and autocast's cache) made outside
the graph would be read at replay after they are gone, so casts are made inside the graph afresh;
parameters are updated in place by the optimizer, so the graph reads their current values.

Cost: the shared pool holds about one layer's recompute + backward temporaries for the whole run,
memory that the code outside the graphs (loss, optimizer) cannot reuse; ``graph_capture.pool_bytes()`` says how
much. By default (``default_for``) CUDA models of 0.2-4B parameters graph whole layers, larger ones
every second layer's forward alone ("forward"), smaller ones and other devices none;
``SLOTHNB_CUDA_GRAPHS=0|1|adaptive|forward`` or ``get_peft_model(..., cuda_graphs=...)`` decide instead
("adaptive": as many layers as the host needs, ``graph_pacing``).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from slothnb.errors import ConfigError, HardwareError
from slothnb.models import carrying
from slothnb.models.graph_capture import Graph, ModelGraphs, StaticInputs, capture_context, shapes
from slothnb.models.loader import parameter_count

ENV = "SLOTHNB_CUDA_GRAPHS"
MAX_SIGNATURES = int(os.environ.get("SLOTHNB_GRAPH_MAX_SIGNATURES", "4"))  # input signatures per layer and pass
# that get graphs; later ones run eagerly

# Which graph-holding layers replay their graphs, read at every checkpointed call (so a benchmark may
# switch them step by step): ACTIVE False runs them all eagerly; SHARE (0..1, SLOTHNB_GRAPH_SHARE) graphs
# that share of the layers, spread evenly, and runs the rest eagerly, where they carry values to their
# recompute. A share trades the host's time (a graphed layer costs it almost nothing) against the GPU's
# (a graphed layer recomputes what an eager one carries).
ACTIVE = True
SHARE = float(os.environ.get("SLOTHNB_GRAPH_SHARE", "1"))
# Which forwards replay a graph (SLOTHNB_GRAPH_FORWARD): "1" (default) all, and nothing is carried to
# their recompute (the carries go through pinned host buffers whose addresses change, and a graph would
# bake them in); "auto" those of layers that carry no values (``carrying.carries_values``), "0" none.
# A layer whose forward runs eagerly still replays its recompute + backward as a graph, fed what its
# forward carried through static buffers (G and U of an 8B layer). Measured on H100s (session 21) it lost:
# the 1B at 2 x 4,096 tokens ran 49,046 tok/s against 56,442 with "1"; the 8B QLoRA at 2 x 2,048 ran
# 12,183 against 12,845 eager, 0.5 GiB heavier (the static copies of the carried values, and the
# recompute waiting for all of them before it starts).
FORWARD = os.environ.get("SLOTHNB_GRAPH_FORWARD", "1")
# Which graphed layers replay their recompute + backward as a graph too (SLOTHNB_GRAPH_BACKWARD): "1"
# (default) all; "0" none: a graphed layer replays its forward alone, and its recompute + backward run
# eagerly, recomputing what the forward did not carry (its attention output projection; G and U only where
# the layer would not have carried them anyway, since it passes its turn to carry them to the next layer:
# ``carrying.pass_gate_up_turn``). Why: on the H100 machines the 8B steps' forward is where the host sets
# the pace (session 29: the GPU ran 0-4 ms behind the host there, 8-85 ms behind it in the backward), and a
# forward graph costs the GPU only a recomputed projection (~0.2 ms at 8B, 2 x 2,048 tokens) and two
# copies of the hidden states, where a graphed backward recomputes G and U as well (~1.4 ms).
BACKWARD = os.environ.get("SLOTHNB_GRAPH_BACKWARD", "1")
# A backward graph records the layer's written-out backward (``arch.llama_layer``) where it applies, else
# a recompute under autograd; SLOTHNB_GRAPH_WRITTEN=0 records the latter always (benchmarks).
WRITTEN = os.environ.get("SLOTHNB_GRAPH_WRITTEN", "1") != "0"


def in_share(index: int, share: float) -> bool:
    """Whether layer ``index`` is among ``share`` of the layers, spread evenly (0.5: every second one)."""
    share = min(max(share, 0.0), 1.0)
    return int((index + 1) * share + 1e-9) > int(index * share + 1e-9)


# Models this size run graphs unless told otherwise: their step is bound by the host, not the GPU (H100,
# Llama-3.2-1B LoRA at 2 x 2,048 tokens: 58,000 tok/s with graphs against 26,000-47,000 eager, by host),
# and their layers' graph pool fits beside the weights once the output head leaves the GPU for the
# backward (``head_offload``). Tiny models gain nothing. AUTO_MAX_PARAMS lies between two measured shapes
# (session 32, H100, QLoRA and bf16 LoRA at 2 x 2,048 tokens, one process per setting): Llama-3.2-3B (3.2B)
# ran 7% (QLoRA) and 27% (bf16) faster with whole layers than with the forward alone; a 4.8B model of
# 8B-wide layers ran 3% and 6% slower with them. Where exactly between 3.2B and 4.8B it turns is unmeasured.
AUTO_MIN_PARAMS, AUTO_MAX_PARAMS = 200_000_000, 4_000_000_000
# Above AUTO_MAX_PARAMS the GPU mostly sets the pace, but not on every host. "adaptive" (opt-in) graphs as
# many layers as the host needs, from none, measured step by step (``graph_pacing``). It is not a default:
# on H100s (session 21, Llama-3.1-8B QLoRA, 2 x 2,048 tokens) it ran 11,887-11,956 tok/s against
# 12,065-12,930 eager in the next process on the same machine (three pairs, two machines).
ADAPTIVE = "adaptive"
# "forward" (the default above AUTO_MAX_PARAMS): every second layer (FORWARD_SHARE) replays its forward alone,
# and every recompute + backward runs eagerly (``BACKWARD`` "0" for that model). On 7-9B models the forward is
# where a slow host costs: on an H100 whose host slowed mid-run it held the Llama-3.1-8B bf16 step at ~307 ms
# while eager steps of the same process took 327 (session 29), and against eager steps of the same processes,
# round by round, it gained +1.5% (8B bf16), +0.6% (8B QLoRA), +3.2% (Qwen2.5-7B QLoRA) and +8.9% (Gemma-2-9B
# QLoRA) at 2 x 2,048 tokens (session 30; docs/perf-notes.md sections 28-29).
FORWARD_ONLY = "forward"
FORWARD_SHARE = 0.5
# "forward" graphs a layer's forward only while its input is at most this many bytes (Llama-3.1-8B at 4,096
# tokens a step: 32 MiB). A layer's forward costs the host the same ~3.3 ms at any length, the GPU time in
# proportion to the tokens: at twice these tokens the GPU's forward takes twice the host's, and a graph would
# only add its pool (one layer's forward temporaries, which grow with the tokens: GBs at long context).
FORWARD_MAX_BYTES = 32 << 20


def choice(value):
    """A ``cuda_graphs`` setting as True, False, ``ADAPTIVE`` or ``FORWARD_ONLY`` (None stays None: not chosen)."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in (ADAPTIVE, FORWARD_ONLY):
        return text
    if text in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        return text in ("1", "true", "on", "yes")
    raise ConfigError(f"cuda_graphs={value!r} (or {ENV}): pass True, False, 'adaptive' or 'forward'.")


def default_for(model: nn.Module):
    """Graphs or not when neither the caller nor the model chose: ``SLOTHNB_CUDA_GRAPHS`` if set
    (0, 1, "adaptive" or "forward"), else ``by_size`` for a CUDA model, off on other devices."""
    if os.environ.get(ENV) is not None:
        return choice(os.environ[ENV])
    first = next(model.parameters(), None)
    if first is None or not first.is_cuda:
        return False
    return by_size(parameter_count(model))


def by_size(n_params: int):
    """The default for a CUDA model of ``n_params`` parameters: off below ``AUTO_MIN_PARAMS``, whole layers
    (True) up to ``AUTO_MAX_PARAMS``, the forward alone (``FORWARD_ONLY``) above."""
    if n_params < AUTO_MIN_PARAMS:
        return False
    return True if n_params <= AUTO_MAX_PARAMS else FORWARD_ONLY


def _signature(tensors, needs_grad=None) -> tuple:
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return shapes(tensors), autocast, tuple(needs_grad) if needs_grad is not None else None


class LayerGraphs:
    """The forward and backward graphs of one decoder layer, keyed by input signature.

    ``forward(run, tensors)`` and ``backward(run, inputs, grad_outs, needs_grad)`` stand in for
    ``OffloadedCheckpoint``'s two passes; ``run(tensors)`` calls the layer.
    """

    graph_class = Graph

    def __init__(self, layer: nn.Module, shared: ModelGraphs, index: int = 0):
        self.layer, self.shared, self.index = layer, shared, index
        self._warned_signatures = False
        self._fwd: dict = {}  # signature -> "seen" (ran eagerly once) | (graph, buffers, ...) | "eager"
        self._bwd: dict = {}

    # ------------------------------------------------------------------------------------- eligibility
    def active(self) -> bool:
        """Whether this call replays graphs (``ACTIVE``, and the model's pacer's share, else ``FORWARD_SHARE``
        for a "forward" model, else ``SHARE``); otherwise the layer runs eagerly. Read at each call, so a
        benchmark can switch them between steps."""
        if self.shared.pacer is not None:
            share = self.shared.pacer.share
        else:
            share = FORWARD_SHARE if self.shared.forward_only else SHARE
        return ACTIVE and in_share(self.index, share)

    def forward_graphed(self, tensors) -> bool:
        """Whether this forward replays a graph (``FORWARD``; "forward" graphs: inputs of at most
        ``FORWARD_MAX_BYTES``); when not it runs eagerly and may carry."""
        if self.shared.forward_only and tensors and tensors[0].nbytes > FORWARD_MAX_BYTES:
            return False
        mode = str(FORWARD)  # (a benchmark's switch may set it as a number)
        if mode in ("0", "1"):
            return mode == "1"
        return not (tensors and carrying.carries_values(tensors[0]))

    def usable(self, tensors) -> bool:
        on_gpu = self.graph_class is not Graph or all(t.is_cuda for t in tensors)  # tests fake the graph on CPU
        if not tensors or not on_gpu:
            return False
        for m in self.layer.modules():
            if isinstance(m, nn.Dropout) and m.p > 0 and m.training:
                return False
        config = getattr(getattr(self.layer, "self_attn", None), "config", None)
        return not (config is not None and getattr(config, "attention_dropout", 0.0) and self.layer.training)

    def params(self) -> list[torch.Tensor]:
        return [p for p in self.layer.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, run, tensors):
        """The layer's no-grad forward: what ``run(tensors)`` returns."""
        if not self.usable(tensors):
            return run(tensors)
        state = self._graph(self._fwd, _signature(tensors), lambda: self._capture_forward(run, tensors),
                            tensors[0].device)
        if state is None:
            return run(tensors)
        graph, inputs, outs, template, spec = state
        inputs.load(tensors)
        graph.replay()
        outs.forget()  # the graph wrote these buffers: whatever was loaded into them is gone
        return tree_unflatten([o.clone() if isinstance(o, torch.Tensor) else o for o in _fill(template, outs.buffers)],
                              spec)

    def _capture_forward(self, run, tensors):
        inputs = self._static("in", tensors)
        inputs.forget()
        inputs.load(tensors)
        holder = {}

        def body():
            with capture_context():
                leaves, holder["spec"] = tree_flatten(run(inputs.buffers))
            tensors_out = [v for v in leaves if isinstance(v, torch.Tensor)]
            outs = self._static("out", tensors_out)
            for buf, t in zip(outs.buffers, tensors_out):
                buf.copy_(t)
            holder["template"] = [_SLOT if isinstance(v, torch.Tensor) else v for v in leaves]
            holder["outs"] = outs

        graph = self.graph_class(tensors[0].device, self._pool(tensors[0].device))
        graph.capture(body)
        return graph, inputs, holder["outs"], holder["template"], holder["spec"]

    # ---------------------------------------------------------------------------------------- backward
    def backward(self, call, inputs, grad_outs, needs_grad, carried=None):
        """Recompute + backward of the layer (``call``: the checkpoint's ``_Call``). Accumulates the layer's
        parameter gradients into ``.grad`` and returns the gradients of ``inputs`` (None where
        ``needs_grad`` is False), or None when it cannot run as a graph (the caller then runs its eager
        backward, ``carried`` untouched). ``carried`` (``carrying._Carried``): what the forward handed
        over; its tensors are restored and fed to the graph through static buffers."""
        if self.shared.forward_only or str(BACKWARD) == "0" or not self.usable(inputs) or any(g is None for g in grad_outs):
            return None
        if carried is not None and not carried.graphable():
            return None
        values = carried.drain() if carried is not None else []
        fed = [v for _, v in values if v is not None]
        tags = tuple((tag, v is not None) for tag, v in values)
        key = _signature(list(inputs) + list(grad_outs) + fed, needs_grad) + (tags, bool(WRITTEN))
        state = self._graph(self._bwd, key, lambda: self._capture_backward(call, inputs, grad_outs, needs_grad, values),
                            inputs[0].device)
        if state is None:
            if carried is not None:
                carried.refill(values)  # the eager backward reads them
            return None
        graph, static_in, static_grad_out, static_fed, input_grads, holder = state
        static_in.load(inputs)
        static_grad_out.load(grad_outs)
        if static_fed is not None:
            static_fed.load(fed)
        del values, fed
        graph.replay()
        _accumulate(holder["params"], holder["param_grads"])
        grads, it = [], iter(input_grads)
        for need in needs_grad:
            grads.append(next(it).clone() if need else None)
        return grads

    def _capture_backward(self, call, inputs, grad_outs, needs_grad, values):
        static_in = self._static("in", inputs)
        static_grad_out = self._static("out", grad_outs)  # the forward's output buffer: free by now
        fed = [v for _, v in values if v is not None]
        static_fed = self._static("carried", fed) if fed else None
        for bank, tensors in ((static_in, inputs), (static_grad_out, grad_outs), (static_fed, fed)):
            if bank is not None:
                bank.forget()
                bank.load(tensors)
        wanted = [t for t, need in zip(inputs, needs_grad) if need]
        input_grads = self._static("grad-in", wanted).buffers
        it = iter(static_fed.buffers if static_fed is not None else ())
        fed_entries = [(tag, next(it) if v is not None else None) for tag, v in values]
        holder = {}

        def body():
            with capture_context(), carrying._carry_scope("replay", carrying._Carried(list(fed_entries))):
                grads, params, param_grads = self._written_backward(call, static_in.buffers, static_grad_out.buffers,
                                                                    needs_grad)
                if grads is None:
                    grads, params, param_grads = self._autograd_backward(call, static_in.buffers,
                                                                         static_grad_out.buffers, needs_grad)
            for buf, g in zip(input_grads, [g for g, need in zip(grads, needs_grad) if need]):
                if g is None:
                    buf.zero_()
                else:
                    buf.copy_(g)
            holder["params"], holder["param_grads"] = params, param_grads

        graph = self.graph_class(inputs[0].device, self._pool(inputs[0].device))
        graph.capture(body)
        for bank in (static_in, static_grad_out, static_fed):  # the body may have written into them (the
            if bank is not None:  # written-out backward reuses dy's storage): the replay loads afresh
                bank.forget()
        return graph, static_in, static_grad_out, static_fed, input_grads, holder

    @staticmethod
    def _written_backward(call, buffers, grad_outs, needs_grad):
        """The layer's written-out backward (``arch.llama_layer``) on the static buffers, its adapter
        gradients kept as outputs: (input grads, params, their grads), or (None,) * 3 where it does
        not apply (nothing done then)."""
        if not WRITTEN or call.written is None or len(grad_outs) != 1:
            return None, None, None
        params, param_grads = [], []

        def keep(ps, gs):
            params.extend(ps)
            param_grads.extend(gs)

        leaves = [b.detach() for b in buffers]
        grads = call.written[1](*call.arguments(leaves), leaves, list(grad_outs), list(needs_grad), accumulate=keep)
        return (grads, params, param_grads) if grads is not None else (None, None, None)

    def _autograd_backward(self, call, buffers, grad_outs, needs_grad):
        """Recompute with grad on and ``torch.autograd.grad``: (input grads, params, their grads)."""
        leaves = [b.detach().requires_grad_(need) for b, need in zip(buffers, needs_grad)]
        with torch.enable_grad():
            out_leaves, _ = tree_flatten(call.run(leaves))
        outs = [v for v in out_leaves if isinstance(v, torch.Tensor)]
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad]
        params = self.params()
        wanted = [x for x, need in zip(leaves, needs_grad) if need]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted + params, [g for _, g in pairs], allow_unused=True)
        it = iter(grads[:len(wanted)])
        return [next(it) if need else None for need in needs_grad], params, list(grads[len(wanted):])

    # --------------------------------------------------------------------------------------- utilities
    def _graph(self, table, key, capture, device):
        """The captured state for ``key``, or None when this call runs eagerly: the first call of a
        signature (it also warms up the kernels), shapes beyond the limit, and a failed capture (a
        training step never fails over a graph, unless the failure broke CUDA's generator)."""
        state = table.get(key) or self._admit(table, key)
        if state == "new":
            table[key] = "seen"
            return None
        if state == "seen":
            try:
                state = table[key] = capture()
            except Exception as e:
                self._give_up(table, key, e, device)
                return None
        return None if state == "eager" else state

    def _admit(self, table, key) -> str:
        """The state of a signature seen for the first time: "new" (it may get a graph) while the layer
        has fewer than ``MAX_SIGNATURES``, else "eager". A graph per batch length would pile up graphs
        and buffers: pad or pack batches to one length to use graphs."""
        if len(table) < MAX_SIGNATURES:
            return "new"
        if not self._warned_signatures:
            self._warned_signatures = True
            warnings.warn(f"slothnb: {type(self.layer).__name__} has seen {MAX_SIGNATURES} input shapes; new shapes run "
                          "without CUDA graphs (pad or pack batches to one length to keep them)",
                          RuntimeWarning, stacklevel=4)
        table[key] = "eager"
        return "eager"

    def _static(self, role, tensors) -> StaticInputs:
        key = (role, shapes(tensors))
        bank = self.shared.banks.get(key)
        if bank is None:
            bank = self.shared.banks[key] = StaticInputs(tensors)
        return bank

    def _pool(self, device):
        return self.shared.pool(device) if self.graph_class is Graph else None

    def _give_up(self, table, key, error, device):
        """After a failed capture the layer runs eagerly, unless the failure left CUDA's random
        generator stuck in capture mode (seen when torch's allocator failed mid-capture): every later
        random draw would then fail with an unrelated message, so training stops here instead."""
        table[key] = "eager"
        name = type(self.layer).__name__
        if not self.generator_usable(device):
            raise HardwareError(
                f"slothnb: the CUDA graph capture of {name} failed ({type(error).__name__}: {error}) and left "
                "CUDA's random number generator unusable in this process. Restart it and train without CUDA "
                "graphs (cuda_graphs=False, or unset SLOTHNB_CUDA_GRAPHS).") from error
        warnings.warn(f"slothnb: {name} runs eagerly, its CUDA graph failed: {type(error).__name__}: {error}",
                      RuntimeWarning, stacklevel=3)

    @staticmethod
    def generator_usable(device) -> bool:
        """Whether a random draw on ``device`` still works (a capture that died half-way breaks it)."""
        if getattr(device, "type", None) != "cuda":
            return True
        try:
            torch.empty(1, device=device).uniform_()
            return True
        except RuntimeError:
            return False


_SLOT = object()  # where a tensor goes in an output template


def _fill(template, outs):
    it = iter(outs)
    return [next(it) if v is _SLOT else v for v in template]


def _accumulate(params, grads) -> None:
    """``p.grad += g`` (``p.grad = g.clone()`` where there is none yet): the graph's outputs are reused."""
    fresh = [(p, g) for p, g in zip(params, grads) if g is not None and p.grad is None]
    summed = [(p, g) for p, g in zip(params, grads) if g is not None and p.grad is not None]
    if fresh:
        for p, c in zip([p for p, _ in fresh], torch._foreach_mul([g for _, g in fresh], 1.0)):
            p.grad = c
    if summed:
        torch._foreach_add_([p.grad for p, _ in summed], [g for _, g in summed])
