"""What CUDA graphs of checkpointed layers share and how their memory is counted (``layer_graphs``).

A ``ModelGraphs`` owns one model's graph pools and the static buffers (``StaticInputs``) its graphs read
and write; a ``Graph`` captures and replays one pass and measures what its replays hold beyond what
the allocator sees. ``replay_peak``, ``peak_before_capture`` and ``pool_usage`` turn that into the
honest peak the benchmarks and ``slothnb.memory`` report.
"""
from __future__ import annotations

import contextlib
import gc
import weakref

import torch


class ModelGraphs:
    """What the graphs of one model's layers share: the memory pool per device and the static buffers.

    Per model, not per process: torch frees a graph pool when the last graph captured into it dies,
    and a capture into the handle of a freed pool fails inside the allocator (after which the CUDA
    generator is unusable). A model's graphs, pools and buffers live and die together.
    """

    def __init__(self, pacer=None):
        self.pools: dict = {}  # device index -> graph pool handle
        self.banks: dict = {}  # (role, shapes) -> StaticInputs
        self.pacer = pacer  # graph_pacing.SharePacer: how many layers replay graphs ("adaptive"), else None
        self.forward_only = False  # "forward": the layers replay their forwards alone, every backward is eager
        _LIVE.add(self)

    def pool(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.pools:
            self.pools[index] = torch.cuda.graph_pool_handle()
        return self.pools[index]


_LIVE: "weakref.WeakSet[ModelGraphs]" = weakref.WeakSet()


class Graph:
    """One CUDA graph: ``capture()`` runs ``body`` under capture, ``replay()`` re-runs what it recorded."""

    def __init__(self, device: torch.device, pool):
        self.device, self.pool = device, pool
        self.graph = torch.cuda.CUDAGraph()
        self.transient = 0  # bytes of temporaries a replay uses on top of what stays allocated

    def capture(self, body):
        # No garbage collection while capturing: a finaliser that touches CUDA (an offloaded input
        # waiting on its copy's event, a pinned buffer being unregistered) would break the capture.
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        # The capture's allocations are the replays' (same sizes, same order): their peak above what stays
        # allocated is what every replay adds unseen by the allocator. The peak counter is restarted for
        # that; the peak it held is kept for ``peak_before_capture``.
        _PEAK_BEFORE_CAPTURE[0] = max(_PEAK_BEFORE_CAPTURE[0], torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
                return body()
        finally:
            self.transient = max(0, torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device))
            if collecting:
                gc.enable()

    def replay(self):
        # the most this replay has live: what the allocator counts now plus the graph's own temporaries
        _REPLAY_PEAK[0] = max(_REPLAY_PEAK[0], torch.cuda.memory_allocated(self.device) + self.transient)
        self.graph.replay()


_REPLAY_PEAK = [0]  # the most bytes live during a replay (allocated + its temporaries), since the last reset
_PEAK_BEFORE_CAPTURE = [0]  # max_memory_allocated as it stood before a capture restarted it


class StaticInputs:
    """Buffers a graph reads its inputs from, shared by every layer with the same signature."""

    def __init__(self, tensors):
        self.buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        self.last = [None] * len(tensors)  # (weakref, version) of what was last copied into each buffer

    @torch.no_grad()  # the backward's inputs require grad: the copy must not enter autograd
    def load(self, tensors) -> None:
        for i, (buf, t) in enumerate(zip(self.buffers, tensors)):
            last = self.last[i]
            if last is not None and last[0]() is t and last[1] == t._version:
                continue  # the same tensor as last time (cos/sin for every layer): already there
            buf.copy_(t)
            self.last[i] = (weakref.ref(t), t._version)  # weak: a layer input must not outlive its step

    def forget(self) -> None:
        self.last = [None] * len(self.buffers)


def shapes(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


@contextlib.contextmanager
def capture_context():
    """Capturing: autocast without its cast cache (a cached cast is not recorded, yet read at replay)."""
    if torch.is_autocast_enabled("cuda"):
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
            yield
    else:
        yield


def pool_usage() -> tuple[int, int]:
    """(reserved, allocated) bytes of the live models' layer-graph pools on the GPU. Allocated: what
    outlives a replay there (parameter gradients a backward graph hands out); the rest of the reserved
    bytes are the graphs' temporaries, in use only while a graph replays."""
    pools = {tuple(h) for shared in list(_LIVE) for h in shared.pools.values()}
    if not pools or not torch.cuda.is_available():
        return 0, 0
    segments = [seg for seg in torch.cuda.memory._snapshot()["segments"]
                if tuple(seg.get("segment_pool_id", (0, 0))) in pools]
    return sum(seg["total_size"] for seg in segments), sum(seg["allocated_size"] for seg in segments)


def pool_bytes() -> int:
    """Bytes the live models' layer-graph pools hold on the GPU (0 when no graph was captured)."""
    return pool_usage()[0]


def replay_peak(reset: bool = False) -> int:
    """The most bytes live during a graph replay since the last ``reset``: allocated as it started plus the
    graph's temporaries, which ``torch.cuda.max_memory_allocated`` does not see (they live in the pool)."""
    peak = _REPLAY_PEAK[0]
    if reset:
        _REPLAY_PEAK[0] = 0
    return peak


def peak_before_capture(reset: bool = False) -> int:
    """``torch.cuda.max_memory_allocated`` as it stood before the latest capture restarted it (0: none
    since the last ``reset``): a step that captured takes the larger of this and the counter."""
    peak = _PEAK_BEFORE_CAPTURE[0]
    if reset:
        _PEAK_BEFORE_CAPTURE[0] = 0
    return peak
