"""Pinned host buffers for offloaded checkpoints, pooled across steps (``slothnb.models.host_offload``).

Pinning is slow (page locking: tens of ms for a Llama-3.1-8B layer's G) and a step needs a buffer per
offloaded layer input and carried value, so buffers are kept by (shape, dtype) and reused. Layer inputs
take one now, pinning inline on a miss; carried values never wait: a miss is refused and the buffer is
pinned in the background for the next step. Large buffers are page-locked at their exact size.
"""
from __future__ import annotations

import collections
import math
import queue
import threading
import time
import weakref
from collections import defaultdict

import torch

REGISTER_MIN_BYTES = 1 << 20  # below this, torch's pinned allocator's rounding costs little


def pinned_empty(shape, dtype, touch: bool = False) -> torch.Tensor:
    """An uninitialised pinned CPU tensor that pins only its own bytes.

    ``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds
    every block up to the next power of two: a Llama-3.1-8B layer input at 400K tokens (3.3 GB) pins
    4 GiB, and the offloaded inputs of one step then take ~20 GiB more host RAM than the budget
    counts. Large buffers are therefore allocated as plain CPU memory and page-locked in place with
    ``cudaHostRegister`` (unregistered when the tensor is freed). Where registering fails, the
    rounded allocator is the fallback. ``touch``: fault the pages in first (a tensor op, which releases
    the GIL), so a background thread does the slow part without holding up the training loop.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < REGISTER_MIN_BYTES or nbytes & (nbytes - 1) == 0:  # rounding costs nothing here
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    t = torch.empty(shape, dtype=dtype)
    if touch:
        t.view(torch.uint8).zero_()
    cudart = torch.cuda.cudart()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(t.data_ptr(), nbytes, 0))
    except Exception:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    # Runs while the tensor is being freed, before its memory goes back to the C allocator.
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


class PinnedPool:
    """Reuses pinned host buffers across steps: pinning is slow, and a step needs one per layer.

    Layer inputs take a buffer now (``take``), allocating one on a miss. Carried values
    (``carrying.carry``) are optional, so they never wait for pinning: ``take_ready`` returns only
    a free buffer and, on a miss, asks a background thread to pin one for the next step. Pinning a
    Llama-3.1-8B layer's G (117 MB at 4,096 tokens) costs tens of ms; done inline, a pool that grows
    by a few buffers a step (the link decides how many layers carry) slows every step until it stops
    growing.

    What is requested is what a forward was refused (a *round*: the takes and misses between two
    backwards, which give the buffers back), less what is free or already being pinned: each refusal of
    a round is new demand, and a buffer still being pinned from an earlier round is counted as supply, not
    asked for twice. So the first step asks for everything it missed at once and the pool is settled
    within the warm-up steps, where ``max_pending`` at a time (sessions 12-24) spread the pinning over
    the first five steps of an 8B QLoRA run: the first timed steps paid for it (docs/perf-notes.md
    section 24).
    """

    max_keys = 8  # distinct (shape, dtype) kept; varying sequence lengths would otherwise pile up buffers
    max_pending = 64  # background pinning requests queued at once: a bound against runaway demand

    def __init__(self, counts: collections.Counter | None = None):
        self.counts = collections.Counter() if counts is None else counts  # pinned_inline / pinned_background
        self._free = defaultdict(list)
        self._pending = collections.Counter()  # key -> buffers being pinned in the background
        self._refused = collections.Counter()  # key -> buffers carried values were refused this round
        self._giving = False  # the last call was a give (a backward): the next take or miss opens a round
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue | None = None
        self._made = weakref.WeakSet()  # every buffer this pool pinned and someone still holds

    def _track(self, buf: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._made.add(buf)
        return buf

    def pinned_bytes(self) -> int:
        """Bytes of pinned host memory in this pool's buffers, free or in use (not yet freed)."""
        with self._lock:
            return sum(b.numel() * b.element_size() for b in list(self._made))

    def take(self, shape, dtype) -> torch.Tensor:
        buf = self.take_ready(shape, dtype, grow=False)
        if buf is not None:
            return buf
        if len(self._free) > self.max_keys:
            with self._lock:
                self._free.clear()
        self.counts["pinned_inline"] += 1
        return self._track(pinned_empty(shape, dtype))

    def _open_round(self) -> None:
        """Under the lock: a take or miss after a give starts a new round (the next step's forward)."""
        if self._giving:
            self._giving = False
            self._refused.clear()

    def take_ready(self, shape, dtype, grow: bool = True) -> torch.Tensor | None:
        """A free buffer, or None (and, if ``grow``, one is pinned in the background for later)."""
        key = (tuple(shape), dtype)
        with self._lock:
            self._open_round()
            if self._free.get(key):
                return self._free[key].pop()
        if grow:
            self.ready(shape, dtype, 1)
        return None

    def ready(self, shape, dtype, n: int) -> bool:
        """Whether ``n`` buffers of this kind are free; if not, the value set is refused and what this
        round's refusals need beyond the free buffers and those being pinned is requested in the
        background (at most ``max_pending`` at once)."""
        key = (tuple(shape), dtype)
        with self._lock:
            self._open_round()
            free = len(self._free.get(key, ()))
            if free >= n:
                return True
            self._refused[key] += n
            missing = min(self._refused[key] - free - self._pending[key],
                          self.max_pending - sum(self._pending.values()))
            if missing <= 0:
                return False
            self._pending[key] += missing
        if self._requests is None:
            self._requests = queue.SimpleQueue()
            threading.Thread(target=self._pin_requested, name="slothnb-pinning", daemon=True).start()
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        for _ in range(missing):
            self._requests.put((key, device))
        return False

    def _pin_requested(self):
        while True:
            key, device = self._requests.get()
            try:
                if device is not None:  # pin in the requester's CUDA context, not a new one on device 0
                    torch.cuda.set_device(device)
                buf = self._track(pinned_empty(*key, touch=True))
                self.counts["pinned_background"] += 1
            except Exception:  # no pinned memory to be had: the values are recomputed instead
                buf = None
            with self._lock:
                self._pending[key] -= 1
                if buf is not None:
                    self._free[key].append(buf)
            del buf  # the pool owns it now: dropped with it

    def wait_for_pinning(self, timeout: float = 60.0) -> None:
        """Until no background pinning is pending (tests, and benchmarks that want a settled pool)."""
        end = time.monotonic() + timeout
        while sum(self._pending.values()) and time.monotonic() < end:
            time.sleep(0.001)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._giving = True
            self._free[(tuple(buf.shape), buf.dtype)].append(buf)
