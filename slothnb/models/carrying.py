"""What a checkpointed layer's forward hands its own recompute ("carried values").

A checkpointed layer's no-grad forward may hand values it computed to its own recompute (``carry``,
then ``carried`` by tag), in pinned host memory like the layer input. The recompute then need not
compute them, and since they are the forward's own values the gradients are bit-identical. The
checkpoint (``checkpointing.OffloadedCheckpoint``) opens the scopes: ``_carry_scope("record", ...)``
around the forward, ``("replay", _Carried(...))`` around the recompute.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading

import torch

from slothnb.kernels._utils import switched_off, switched_on
from slothnb.models import host_offload

# The patched attention hands over its output projection's result (``arch.common._project_out``), so
# the recompute skips that projection's base matmul and dequantisation (~10% of a Llama-3.1-8B
# recompute's matmul FLOPs): SLOTHNB_CARRY_ATTN_OUTPUT=0 turns it off. The MLP hands over its gate and
# up outputs (``carry_gate_up``: 74% of a recompute's matmul FLOPs, but 7x the bytes of a layer input)
# in at most one layer of every ``CARRY_MLP_EVERY``, while the link keeps up (``_keep_gate_up``): the
# PCIe link takes no more without the forward waiting for it (H100, 8B, 4,096 tokens a step: every
# layer made the step 10-30% slower; one in three was ~4% faster than none, one in two 1-4% faster
# again, in six of six same-machine pairs over 8B at 4,096 and 8,192 tokens and Qwen2.5-7B in session
# 14; session 19 let 13-16 of 31 layers carry instead of 8). SLOTHNB_CARRY_MLP=0 turns it off. Values
# over ``CARRY_MAX_BYTES`` are not carried: at long context the host memory is the layer inputs'
# (400K tokens need 27 of 32 of them there).
CARRY = os.environ.get("SLOTHNB_CARRY_ATTN_OUTPUT", "1") == "1"
CARRY_MLP = os.environ.get("SLOTHNB_CARRY_MLP", "1") == "1"
CARRY_MLP_EVERY = max(1, int(os.environ.get("SLOTHNB_CARRY_MLP_EVERY", "2")))
# The written-out layer can also hand over the attention's output and log-sum-exp (``carry_attention_state``)
# so that its recompute skips the attention forward: per byte over the link the most valuable of the
# carried values at 4,096 tokens. On the H100 it gained nothing (session 18, 8B QLoRA at 4,096 tokens:
# every layer's recompute skipped its attention, but the link then had room for G and U in ~3 layers
# instead of ~8, which cost as much as it saved) and cost host time where the host sets the pace. So
# SLOTHNB_CARRY_SDPA is "cpu" (default: only where the tests check it, the interpreter), "1" everywhere,
# "0" nowhere.
CARRY_SDPA = os.environ.get("SLOTHNB_CARRY_SDPA", "cpu")
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


def any_switched_on() -> bool:
    """Whether any carry is switched on (then a checkpointed forward records what it carries)."""
    return CARRY or CARRY_MLP or not switched_off(CARRY_SDPA)


def carries_values(x: torch.Tensor) -> bool:
    """Whether a checkpointed layer with hidden states ``x`` may carry values to its recompute (any
    carry switched on, and its parts' inputs, x's size in Llama-family layers, worth it)."""
    return any_switched_on() and _worth_carrying(x)


def carry_attention_output(x: torch.Tensor, out: torch.Tensor) -> None:
    """The attention output projection's result (``out``; ``x`` its input), carried when ``CARRY`` is on."""
    if CARRY and _worth_carrying(x):
        carry(out, tag="o_proj")


def carried_attention_output(x: torch.Tensor) -> torch.Tensor | None:
    """In a recompute: the attention output projection's result its forward carried, or None."""
    return carried("o_proj") if CARRY and _worth_carrying(x) else None


def carries_attention_state(like: torch.Tensor) -> bool:
    """Whether a forward recording now carries an attention state of ``like``'s size (q's)."""
    return switched_on(CARRY_SDPA, like) and getattr(_CARRY, "record", None) is not None and _worth_carrying(like)


def carry_attention_state(out: torch.Tensor, lse: torch.Tensor, rest) -> None:
    """The attention's output ``out`` (``[b, heads, s, d]``), its log-sum-exp and the rest its fused
    backward takes (``arch.sdpa_direct``), carried when ``CARRY_SDPA`` is on: the recompute then skips
    the attention forward. Both tensors or neither. ``out`` travels in the layout its kernel wrote
    ([b, heads, s, d] for cuDNN and the CPU, [b, s, heads, d] for CUDA flash), so that the backward
    reads it as the autograd path would."""
    if not carries_attention_state(out):
        return
    native = out if out.is_contiguous() else out.transpose(1, 2)
    allowed = native.is_contiguous() and native.nbytes <= CARRY_MAX_BYTES and (
        not host_offload.worth_offloading(out)
        or (host_offload.pinned_buffers_ready(native, 1) and host_offload.pinned_buffers_ready(lse, 1)))
    carry(lse, allowed, "sdpa_lse")
    carry(native, allowed, "sdpa_out")
    carry_object((rest, native is not out), "sdpa_rest")


def carried_attention_state(like: torch.Tensor):
    """In a recompute: ``(out, lse, rest)`` its forward carried (``carry_attention_state``; ``like``:
    a tensor of out's size, q), or None."""
    if not (switched_on(CARRY_SDPA, like) and _worth_carrying(like)) or getattr(_CARRY, "replay", None) is None:
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


_GATE_UP_SEEN = itertools.count()  # MLP forwards offered G and U
_GATE_UP_LAST = [-(1 << 30)]  # the offer whose G and U were last carried


def pass_gate_up_turn(x: torch.Tensor) -> None:
    """A checkpointed layer of input ``x`` whose forward carries nothing (a replayed graph,
    ``layer_graphs.BACKWARD``) still counts as an MLP offered G and U, so that the eager layers around
    it keep their turns: one layer in ``CARRY_MLP_EVERY`` by position, as the backward's prefetch expects."""
    if CARRY_MLP and _worth_carrying(x):
        next(_GATE_UP_SEEN)


# What tells a layer that the link has room for its G and U. "backlog" (default): the copies the GPU has
# produced and the link not yet moved hold at most GATE_UP_BACKLOG_PAIRS layers' G and U
# (``host_offload.link_backlog_bytes``).
# "in_flight" (sessions 12-18): all copies queued and not finished, which also counts the ones still
# waiting for the compute stream, i.e. how far the host runs ahead: at 4,096 tokens (host ~3 layers ahead)
# it let G and U through in 8 of the 16 layers offered although the link was idle ~40% of the forward.
GATE_UP_PACING = os.environ.get("SLOTHNB_GATE_UP_PACING", "backlog")
# Which layers may carry: "spaced" (default) any layer at least CARRY_MLP_EVERY offers after the last one
# that carried, so a layer refused for want of link room or buffers passes its turn to the next;
# "fixed" (sessions 12-18) layers 0, EVERY, 2 EVERY, ... only. Either way no two carrying layers are
# closer than EVERY: in backward each prefetches its G and U while the layer before it recomputes.
GATE_UP_SLOTS = os.environ.get("SLOTHNB_GATE_UP_SLOTS", "spaced")


# How far behind (in layers' G and U) the link may be for one more layer to carry. One pair is ~8.5 ms of
# PCIe at 8B / 4,096 tokens, against the two layers (~15 ms) of work the host queues ahead of the GPU.
# 1.5 ran 0.5% and 0.6% faster than 1 in two same-process runs (2 and 3 no better, 0.5 0.9% slower).
GATE_UP_BACKLOG_PAIRS = float(os.environ.get("SLOTHNB_GATE_UP_BACKLOG_PAIRS", "1.5"))


def _link_has_room(G: torch.Tensor, U: torch.Tensor) -> bool:
    queued = host_offload.in_flight_bytes() if GATE_UP_PACING == "in_flight" else host_offload.link_backlog_bytes()
    return queued <= GATE_UP_BACKLOG_PAIRS * (G.nbytes + U.nbytes)


def _keep_gate_up(G: torch.Tensor, U: torch.Tensor) -> None:
    """Carry G and U in a layer whose turn it is (``GATE_UP_SLOTS``, one in ``CARRY_MLP_EVERY``) unless
    the link is behind by more than ``GATE_UP_BACKLOG_PAIRS`` layers' G and U (``GATE_UP_PACING``: that layer is recomputed,
    so a slow link never holds up the forward) or no pinned buffers are free yet (they are pinned in the
    background for later steps). GPU memory held for copies stays bounded by the host's pacing
    (``host_offload.LAYERS_AHEAD``). ``host_offload.COUNTS`` says per step what was carried and why not."""
    on_gpu = host_offload.worth_offloading(G)
    seen = next(_GATE_UP_SEEN)
    turn = seen % CARRY_MLP_EVERY == 0 if GATE_UP_SLOTS == "fixed" else seen - _GATE_UP_LAST[0] >= CARRY_MLP_EVERY
    allowed, why = turn, "gate_up_not_its_turn"
    if allowed and max(G.nbytes, U.nbytes) > CARRY_MAX_BYTES:  # never carried: ask for no buffers either
        allowed, why = False, "gate_up_too_large"
    if allowed and on_gpu and not _link_has_room(G, U):
        allowed, why = False, "gate_up_no_link_room"
    if allowed and on_gpu and not host_offload.pinned_buffers_ready(G, 2):  # both or neither
        # The buffers are pinned for the next step; this layer keeps its turn, so that the first step asks
        # for as many as the spacing will carry, not for every layer's.
        allowed, why = False, "gate_up_no_pinned_buffers"
        _GATE_UP_LAST[0] = seen
    entries = getattr(_CARRY, "record", None)
    carry(G, allowed, "gate")
    carry(U, allowed, "up")
    if entries is not None and entries[-1][1] is not None:
        _GATE_UP_LAST[0] = seen
    if entries is not None and on_gpu:
        carried_now = entries[-1][1] is not None
        host_offload.COUNTS["gate_up_carried" if carried_now else "gate_up_recomputed"] += 1
        if not carried_now:  # allowed yet not carried: the host budget had no room (``offload_carried``)
            host_offload.COUNTS[why if not allowed else "gate_up_no_host_room"] += 1


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

    def graphable(self) -> bool:
        """Whether every value is a tensor or absent: what a CUDA graph can be fed (``layer_graphs``)."""
        return all(e is None or isinstance(e, (torch.Tensor, host_offload.OffloadedTensor)) for _, e in self.entries)

    def drain(self) -> list:
        """Every ``(tag, value)`` left, restored, in order; none left here."""
        out = []
        while self.entries:
            tag = self.entries[0][0]
            out.append((tag, self._take()))
        return out

    def refill(self, values) -> None:
        """Put back what ``drain`` took (a graph that could not run hands them to the eager recompute)."""
        self.entries = collections.deque(values)

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
