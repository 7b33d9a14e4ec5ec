"""Layer inputs held in pinned host memory between a checkpointed layer's forward and backward.

The machinery under ``"slothnb"`` checkpointing (``slothnb.models.checkpointing``): a pool of pinned
buffers (``slothnb.models.pinned_pool``, grown in the background for carried values), a host-memory
budget (long sequences must not exhaust RAM), one side stream per device for the copies, and
``OffloadedTensor``, which copies a CUDA tensor out in forward and back (prefetched one layer ahead) in
backward; the compute stream never waits for a copy, and the host waits only when it has queued more
than ``LAYERS_AHEAD`` layers of copies ahead of the GPU (optionally up to ``MAX_LAYERS_AHEAD`` while the
tensors held for them are few: ``AHEAD_BYTES``).
"""
from __future__ import annotations

import collections
import os
import time
import weakref

import torch

from slothnb.errors import ConfigError
from slothnb.kernels._utils import _current_device, _raw_stream
from slothnb.models.pinned_pool import PinnedPool, pinned_empty  # noqa: F401  (pinned_empty: callers and tests)


# What the offloading did (read by benchmarks, per step): buffers pinned inline / in the background,
# layer inputs offloaded, values carried, G/U pairs carried and recomputed (``checkpointing``), and
# ``pace_wait_us``: how long the host waited for copies (``_keep_pace``, the engine's one wait on the GPU),
# so that a step's host time splits into the host's own work and time it spent waiting for the GPU.
COUNTS: collections.Counter = collections.Counter()
_POOL = PinnedPool(COUNTS)


class HostBudget:
    """How many bytes of pinned host memory the offloaded layer inputs may hold at once.

    At long context the inputs of all layers no longer fit in host RAM (Llama-3.1-8B, 400K tokens:
    32 x 3.3 GB = 105 GB). ``admit(nbytes)`` says whether one more input may be offloaded and, if so,
    counts it; ``release(nbytes)`` uncounts it when its buffer goes back to the pool (restore in
    backward) or is dropped (a forward never backpropagated). What is counted is bytes in use by the
    current forward, not bytes ever allocated: pooled free buffers are not counted. Refused inputs stay
    on the GPU (standard checkpointing for that layer). The limit is ``SLOTHNB_OFFLOAD_HOST_GIB`` GiB if
    set, else ``DEFAULT_HOST_FRACTION`` of the host memory available when the first input is offloaded.
    """

    def __init__(self, limit_bytes: int | None = None):
        self.limit, self.in_use, self.peak = limit_bytes, 0, 0

    def admit(self, nbytes: int, reserve: int = 0) -> bool:
        """Count ``nbytes`` if they fit with ``reserve`` bytes still free afterwards (room kept for
        the layer inputs when something of lower priority asks)."""
        if self.limit is None:
            self.limit = default_host_budget_bytes()
        if self.in_use + nbytes + reserve > self.limit:
            return False
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)
        return True

    def release(self, nbytes: int) -> None:
        self.in_use = max(0, self.in_use - nbytes)


DEFAULT_HOST_FRACTION = 0.7


def default_host_budget_bytes() -> int:
    """``SLOTHNB_OFFLOAD_HOST_GIB`` GiB, else 70% of the host memory available now.

    Pinned pages cannot be swapped, so the rest is left to the process and everything else on the
    machine. 70% is what Llama-3.1-8B needs to train 400K tokens on a 128 GiB host next to an 80 GB
    GPU (27 of 32 layer inputs, 83 GiB); at ordinary lengths a step pins far less than the budget.
    """
    env = os.environ.get("SLOTHNB_OFFLOAD_HOST_GIB")
    if env:
        try:
            gib = float(env)
        except ValueError:
            gib = -1.0
        if gib < 0:
            raise ConfigError(f"SLOTHNB_OFFLOAD_HOST_GIB={env!r} must be a number of GiB >= 0 "
                              "(pinned host memory for offloaded layer inputs).")
        return int(gib * 1024**3)
    import psutil

    return int(psutil.virtual_memory().available * DEFAULT_HOST_FRACTION)


HOST_BUDGET = HostBudget()
_SIDE_STREAMS: dict[tuple[str, int], torch.cuda.Stream] = {}


def _side_stream(device: torch.device, role: str = "offload") -> torch.cuda.Stream:
    """One copy stream per device and role: the offloaded checkpoints' ("offload"), the output head's ("head")."""
    key = (role, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key[1])
    return _SIDE_STREAMS[key]


# Stream bookkeeping without torch.cuda's Python. ``torch.cuda.current_stream``, ``torch.cuda.stream(s)``
# and ``Stream.wait_stream`` each normalise a device index and build a new Stream or Event object: 7-20 us
# a call under the profiler on the H100 hosts, three or four of them for each offloaded tensor and
# direction (~150 tensors a step of 8B QLoRA: ~3% of the host's time at 2,048 tokens, where the host sets
# the pace; session 18). The same calls go straight to torch's C functions here: the current stream is
# looked up by its raw handle, a switch of stream is one ``_cuda_setStream``, and a wait re-records one
# event per device (a stream's wait is on the event's state when it is queued, so re-recording is safe).
# A tensor on another device than the current one takes torch.cuda's calls. SLOTHNB_FAST_STREAMS=0 too.
FAST_STREAMS = os.environ.get("SLOTHNB_FAST_STREAMS", "1") != "0"
_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}  # (device, raw handle) -> its Stream object
_WAIT_EVENTS: dict[int, torch.cuda.Event] = {}


def _fast(index) -> bool:
    return FAST_STREAMS and index == _current_device()


def _current_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index
    if not _fast(index):
        return torch.cuda.current_stream(device)
    key = (index, _raw_stream(index))
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = torch.cuda.current_stream(index)
    return stream


def _wait(waiting: torch.cuda.Stream, on: torch.cuda.Stream) -> None:
    """``waiting.wait_stream(on)``: work queued on ``waiting`` from now runs after ``on``'s queued work."""
    if not _fast(on.device_index):
        return waiting.wait_stream(on)
    event = _WAIT_EVENTS.get(on.device_index)
    if event is None:
        event = _WAIT_EVENTS[on.device_index] = torch.cuda.Event()
    event.record(on)
    waiting.wait_event(event)


class _OnStream:
    """``with _OnStream(stream, current):`` is ``with torch.cuda.stream(stream):`` for a stream of the
    current device, whose current stream is ``current``."""

    __slots__ = ("stream", "current", "context")

    def __init__(self, stream: torch.cuda.Stream, current: torch.cuda.Stream):
        self.stream, self.current, self.context = stream, current, None

    def __enter__(self):
        if _fast(self.stream.device_index):
            s = self.stream
            torch._C._cuda_setStream(stream_id=s.stream_id, device_index=s.device_index, device_type=s.device_type)
        else:
            self.context = torch.cuda.stream(self.stream)
            self.context.__enter__()

    def __exit__(self, *exc):
        if self.context is not None:
            return self.context.__exit__(*exc)
        c = self.current
        torch._C._cuda_setStream(stream_id=c.stream_id, device_index=c.device_index, device_type=c.device_type)


class OffloadedTensor:
    """A CUDA tensor's copy in pinned CPU memory, moved on a side stream in both directions.

    Forward: the device->host copy is queued on the side stream after the work that produced x;
    the compute stream never waits for it, and x is kept alive (``_IN_FLIGHT``) until the copy's
    event has passed, then dropped in stream order. (``record_stream`` would do the same for the
    allocator, but a block freed that way is withheld until the side stream catches up with all it
    was given by then; with memory tight the allocator then grows or flushes its cache mid-step.)
    Backward: ``restore`` is called when a layer's backward starts; it queues that layer's host->device
    copy (if not already prefetched) and also the one of the layer offloaded just before it in forward
    (the next backward), with the values that layer carries, so those copies run while this layer
    recomputes. Only the compute stream waits (on an event); the host never
    synchronises. The prefetch holds one extra layer input on the GPU.
    """

    _last = None  # weakref to the most recent OffloadedTensor: the previous layer for the next one

    def __init__(self, x: torch.Tensor, carried: bool = False, buf: torch.Tensor | None = None,
                 far_ahead: bool = True):
        """Only after ``HOST_BUDGET.admit(x.nbytes)``: the bytes are released by restore or on GC.
        ``carried``: a value a layer's forward hands its recompute (``carrying.carry``), restored
        right after that layer's input. ``buf``: a pinned buffer of x's shape already taken from the pool.
        ``far_ahead``: a layer input whose backward runs eagerly, for which the host may run more than
        ``LAYERS_AHEAD`` layers ahead (``_keep_pace``); a layer replayed as CUDA graphs needs no lead."""
        self.device, self.gpu, self.ready, self.carried = x.device, None, None, carried
        self.nbytes, self.buf = x.nbytes, buf
        if self.buf is None:
            try:
                self.buf = _POOL.take(x.shape, x.dtype)
            except BaseException:  # no pinned memory after all: nothing is held
                HOST_BUDGET.release(self.nbytes)
                raise
        COUNTS["carried" if carried else "offloaded"] += 1
        stream, current = _side_stream(x.device), _current_stream(x.device)
        produced = torch.cuda.Event()  # x fully computed: from then on its copy waits only for the link
        produced.record(current)
        stream.wait_event(produced)  # x is fully computed before we read it
        with _OnStream(stream, current):
            self.buf.copy_(x, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        release_finished_copies()
        _IN_FLIGHT.append((copied, x, produced))  # x's memory must not be handed out before the copy has read it
        if not carried:
            _keep_pace(copied, far_ahead)
        self.prev = OffloadedTensor._last  # weak: a forward never backpropagated must not pin a chain
        OffloadedTensor._last = weakref.ref(self)

    def prefetch(self) -> None:
        """Queue the host->device copy on the side stream (once)."""
        if self.gpu is not None or self.buf is None:
            return
        stream, current = _side_stream(self.device), _current_stream(self.device)
        self.gpu = torch.empty(self.buf.shape, dtype=self.buf.dtype, device=self.device)
        _wait(stream, current)  # earlier users of that memory are done
        with _OnStream(stream, current):
            self.gpu.copy_(self.buf, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def restore(self) -> torch.Tensor:
        release_finished_copies()
        self.prefetch()
        self._prefetch_next_layer()
        _current_stream(self.device).wait_event(self.ready)
        x, self.gpu, self.prev = self.gpu, None, None
        _POOL.give(self.buf)  # reused only by a later forward, whose copy is ordered after this one
        self.buf = None
        HOST_BUDGET.release(self.nbytes)
        return x

    def _prefetch_next_layer(self) -> None:
        """Queue the copies the backward restores next, up to and including the next layer's input and
        the values carried with it, so they all travel while this layer recomputes. They are queued in
        the order the backward uses them: this layer's carried values, the next layer's input, then its
        carried values, each group in forward order (the attention output before G and U): a recompute
        waits for each carried value only where it reads it (``carrying._Carried``)."""
        own, next_input, next_carried = [], None, []
        p = self.prev() if self.prev is not None else None
        while p is not None and p.device == self.device:
            if not p.carried:
                if next_input is not None:
                    break
                next_input = p
            else:
                (own if next_input is None else next_carried).append(p)
            p = p.prev() if p.prev is not None else None
        for t in (*reversed(own), *((next_input,) if next_input is not None else ()), *reversed(next_carried)):
            t.prefetch()

    def __del__(self):  # a forward that never reached backward: its bytes are no longer in use
        if getattr(self, "buf", None) is not None:
            HOST_BUDGET.release(self.nbytes)
        if getattr(self, "gpu", None) is not None:  # an unconsumed prefetch: free it only after its copy
            torch.cuda.current_stream(self.device).wait_event(self.ready)


def pinned_bytes() -> int:
    """Pinned host memory the offloaded checkpoints hold now (pooled buffers, free or in use): what
    the memory stage table shows beside the GPU figures."""
    return _POOL.pinned_bytes()


def pinned_buffers_ready(x: torch.Tensor, n: int) -> bool:
    """Whether ``n`` pinned buffers of x's shape are free now (missing ones are pinned in the background)."""
    return _POOL.ready(x.shape, x.dtype, n)


def offload_carried(x: torch.Tensor) -> OffloadedTensor | None:
    """``x`` on its way to pinned host memory as a carried value, or None (the recompute computes it):
    when the host budget lacks room for it and as much again (a layer input of the same size comes
    first), or no pinned buffer is free yet (one is pinned in the background for the next step)."""
    if not HOST_BUDGET.admit(x.nbytes, reserve=x.nbytes):
        return None
    buf = _POOL.take_ready(x.shape, x.dtype)
    if buf is None:
        HOST_BUDGET.release(x.nbytes)
        return None
    return OffloadedTensor(x, carried=True, buf=buf)


_IN_FLIGHT: collections.deque = collections.deque()  # (copied, tensor, produced): device->host copies still reading


# How many layers' offload copies the host may queue ahead of the GPU. The host queues a checkpointed
# forward much faster than the GPU runs it, and every tensor waiting for its device->host copy stays
# allocated until the GPU has produced and copied it: Llama-3.1-8B at 4,096 tokens held ~15 layers of
# inputs and carried values (~1.9 GiB) that way at the step's peak. Past this many layers the host waits
# for the oldest copy; the GPU still has this many layers of work queued, so it never idles for it.
# Two, not three (session 19): once G and U went over the link in every other layer (carrying.GATE_UP_PACING),
# three layers ahead held up to nine G/U outputs waiting for their copies at 4,096 tokens (peak 7.69 GiB);
# two held 7.13 GiB and ran 0.8% faster (docs/benchmarks.md, session 19).
# SLOTHNB_OFFLOAD_LAYERS_AHEAD overrides it (benchmarks: more lets a host that is sometimes slower than
# the GPU catch up, for the memory of that many more layer inputs).
LAYERS_AHEAD = max(1, int(os.environ.get("SLOTHNB_OFFLOAD_LAYERS_AHEAD", "2")))
# Beyond LAYERS_AHEAD the host may go on, up to MAX_LAYERS_AHEAD layers, while the GPU tensors held for
# unfinished copies (queued, or produced and waiting for the link) take at most AHEAD_BYTES: a lead built
# in the forward, where the host is faster than the GPU, for the backward, where it is about as fast and
# a jittery host stalls the GPU. Off by default (0): in session 23 (H100s, Llama-3.1-8B QLoRA at 2,048
# tokens) 0.5 GiB measured -0.7 to +1.6% against none, round by round in one process (`bench/report.py`'s
# paired interval: noise), while the 8B bf16 step's peak, which is in its forward, rose 15.71 -> 15.85 GiB
# (16.05 at 0.75). Layers replayed as CUDA graphs keep two in any case (``far_ahead``): their backward
# takes the host little, and the lead put the Llama-3.2-1B step over its 3.0 GiB (2.96 -> 3.03).
# SLOTHNB_OFFLOAD_AHEAD_GIB sets it for experiments.
AHEAD_BYTES = int(float(os.environ.get("SLOTHNB_OFFLOAD_AHEAD_GIB", "0")) * 2**30)
MAX_LAYERS_AHEAD = max(LAYERS_AHEAD, int(os.environ.get("SLOTHNB_OFFLOAD_MAX_LAYERS_AHEAD", "6")))
_LAYER_COPIES: collections.deque = collections.deque()  # the copy event of each layer input in flight


def _keep_pace(copied: torch.cuda.Event, far_ahead: bool = True) -> None:
    """Called with each layer input's copy event: wait for the oldest beyond the lead allowed (a layer's
    carried values are queued before its input, so its whole group has then been copied). Without
    ``far_ahead``, ``LAYERS_AHEAD`` is the limit."""
    _LAYER_COPIES.append(copied)
    while _LAYER_COPIES and _LAYER_COPIES[0].query():  # copied already: no longer ahead
        _LAYER_COPIES.popleft()
    most = MAX_LAYERS_AHEAD if far_ahead and AHEAD_BYTES > 0 else LAYERS_AHEAD  # off: the two-layer rule alone
    while len(_LAYER_COPIES) > LAYERS_AHEAD and (len(_LAYER_COPIES) > most or in_flight_bytes() > AHEAD_BYTES):
        oldest, start = _LAYER_COPIES.popleft(), time.perf_counter()
        oldest.synchronize()
        COUNTS["pace_wait_us"] += round((time.perf_counter() - start) * 1e6)
    release_finished_copies()


def release_finished_copies() -> None:
    """Drops the offloaded inputs whose copies have finished (events complete in queue order)."""
    while _IN_FLIGHT and _IN_FLIGHT[0][0].query():
        _IN_FLIGHT.popleft()


def in_flight_bytes() -> int:
    """Bytes of GPU tensors still held for device->host copies that have not finished."""
    release_finished_copies()
    return sum(t.nbytes for _, t, _ in _IN_FLIGHT)


def link_backlog_bytes() -> int:
    """Bytes of device->host copies the link has been given and not yet moved: the GPU has produced
    their tensors (their ``produced`` event passed) but the copies have not finished. Unlike
    ``in_flight_bytes`` it leaves out copies still waiting for the compute stream, which count only
    how far the host runs ahead of the GPU, not whether the link keeps up."""
    release_finished_copies()
    backlog = 0
    for _, t, produced in _IN_FLIGHT:  # produced in queue order: stop at the first one still being computed
        if not produced.query():
            break
        backlog += t.nbytes
    return backlog


def worth_offloading(t: torch.Tensor) -> bool:
    return t.is_cuda  # a CPU tensor is already where the copy would go
