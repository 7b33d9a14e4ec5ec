"""How many of a large model's checkpointed layers replay CUDA graphs: as many as its host needs.

Why: a Llama-3.1-8B QLoRA step at 2 x 2,048 tokens is ~320 ms of GPU work, and the host needs about as
long to queue it eagerly (~7 ms a layer in the backward), longer on a slow host, where the GPU then
waits (H100s, session 21: 11,500-11,900 tok/s eager on hosts queueing ~310 ms, against ~12,800 where the
host keeps up). A layer replayed as a CUDA graph costs the host almost nothing but costs the GPU ~1.4 ms
more, since it carries nothing from its forward to its recompute (``carrying``). A quarter of the layers
graphed made those slow hosts' steps 4-6% faster, and would make a quick host's ~3% slower; at 4,096
tokens a step the GPU sets the pace on every host. So the share of graphed layers is found per run.
Opt-in (``cuda_graphs="adaptive"`` or ``SLOTHNB_CUDA_GRAPHS=adaptive``): measured beside eager runs on
H100s it lost (``layer_graphs.ADAPTIVE``); what it costs is in docs/perf-notes.md, section 20.

How: the pacer marks the step's start (the first checkpointed layer's forward) and its last engine work
(the end of that layer's backward) with a CUDA event and the host's clock. Once both events have
completed (asked without waiting, at a later step's start), ``lag`` = GPU time between them - host time
between them: how far the GPU trailed the host when the host had queued the step. The pacer decides from
the median of ``WINDOW`` steps' lags, each relative to its GPU time (single steps are noisy: a host
hiccup makes a GPU-bound step look host-bound; deciding per step, the share went up and down every few
steps on an H100 whose GPU set the pace, and the captures and graphed steps cost 8%). A median under
``LOW`` means the GPU caught up with the host, i.e. waited on it: ``STEP`` more of the layers are graphed.
Over ``HIGH`` the host has room to spare: ``STEP`` fewer. After a change the window starts afresh, and
the first ``HOLD`` steps are not counted (a layer captures its graphs on its second call, slowly).
"""
from __future__ import annotations

import statistics
import time

import torch

LOW, HIGH = 0.03, 0.15  # of the step's GPU time: under LOW the host sets the pace, over HIGH it has room
STEP = 0.125  # share of the layers added or removed at a time (4 of an 8B's 32)
WINDOW = 8  # steps whose median lag decides
HOLD = 2  # steps after a change not counted (the new graphs are captured meanwhile)
MAX_PENDING = 4  # measured steps kept while their events have not completed


class SharePacer:
    """The share of layers that replay graphs (``share``), adjusted from the measured host/GPU balance."""

    event_class = torch.cuda.Event  # tests replace it

    def __init__(self, share: float = 0.0, first: int = 0):
        self.share, self.first = share, first  # first: the index of the layer that marks the step
        self._open = None  # (start event, host clock) of the step being queued
        self._pending: list = []  # (start event, end event, host seconds) not yet read
        self._hold = 0
        self._window: list = []  # lag / GPU time of the steps counted since the last change
        self.history: list = []  # (lag s, GPU s, share after the decision) per step read

    def step_start(self) -> None:
        if self.event_class is torch.cuda.Event and not torch.cuda.is_available():
            return  # nothing to pace without a GPU
        self._read()
        self._open = (self._record(), time.perf_counter())

    def step_end(self) -> None:
        if self._open is None:
            return
        start, t0 = self._open
        self._open = None
        self._pending.append((start, self._record(), time.perf_counter() - t0))
        del self._pending[:-MAX_PENDING]

    def _record(self):
        event = self.event_class(enable_timing=True)
        event.record()
        return event

    def _read(self) -> None:
        while self._pending and self._pending[0][1].query():
            start, end, host_s = self._pending.pop(0)
            self.decide(start.elapsed_time(end) / 1e3, host_s)

    def decide(self, gpu_s: float, host_s: float) -> None:
        """One measured step: GPU seconds and host seconds between the two marks."""
        lag = gpu_s - host_s
        if self._hold > 0:
            self._hold -= 1
        elif gpu_s > 0:
            self._window.append(lag / gpu_s)
        if len(self._window) >= WINDOW:
            relative = statistics.median(self._window)
            del self._window[0]
            if relative < LOW and self.share < 1.0:
                self._change(min(1.0, self.share + STEP))
            elif relative > HIGH and self.share > 0.0:
                self._change(max(0.0, self.share - STEP))
        self.history.append((round(lag, 4), round(gpu_s, 4), self.share))

    def _change(self, share: float) -> None:
        self.share, self._hold, self._window = share, HOLD, []
