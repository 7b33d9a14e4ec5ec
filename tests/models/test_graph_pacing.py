"""The share of layers replaying CUDA graphs, found from the host/GPU balance (slothnb.models.graph_pacing).

The pacer's decisions are tested from measured (GPU, host) times, its marks with stand-in events whose
"GPU" time is the host's (the host sets the pace) or twice it (the GPU does), and a model trained under
it on the CPU (stand-in graphs, as in test_layer_graphs) must train exactly as the eager one.
"""
import time

import pytest
import torch

from slothnb.models import graph_pacing, layer_graphs
from test_layer_graphs import ReplayingGraph, _model, _train


def test_the_share_follows_the_median_lag_of_a_window_of_steps():
    W, H = graph_pacing.WINDOW, graph_pacing.HOLD
    pacer = graph_pacing.SharePacer()
    for _ in range(W - 1):
        pacer.decide(0.320, 0.318)  # lag 2 ms < 3% of 320: the GPU caught up with the host
    assert pacer.share == 0.0  # not before a whole window
    pacer.decide(0.320, 0.318)
    assert pacer.share == graph_pacing.STEP
    for _ in range(H + W - 1):  # the steps right after a change are not counted, then a new window fills
        pacer.decide(0.320, 0.318)
    assert pacer.share == graph_pacing.STEP
    pacer.decide(0.320, 0.318)
    assert pacer.share == 2 * graph_pacing.STEP
    for _ in range(H):
        pacer.decide(0.330, 0.250)  # lag 80 ms > 15%: room to spare, but not counted yet
    for i in range(W):
        if i % 3 == 0:
            pacer.decide(0.330, 0.329)  # a host hiccup every third step: the median does not follow it
        else:
            pacer.decide(0.330, 0.250)
    assert pacer.share == graph_pacing.STEP
    for _ in range(H + W):
        pacer.decide(0.330, 0.300)  # lag 30 ms, 9%: within the band, nothing changes
    assert pacer.share == graph_pacing.STEP
    assert pacer.history[0][0] == pytest.approx(0.002) and pacer.history[W - 1][2] == graph_pacing.STEP


class _Event:
    """A CUDA event stand-in: "GPU" time is host time times ``pace`` (2: the GPU sets the pace)."""

    pace = 1.0

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3 * self.pace


def test_marks_are_read_once_their_events_completed(monkeypatch):
    monkeypatch.setattr(graph_pacing.SharePacer, "event_class", _Event)
    pacer = graph_pacing.SharePacer()
    pacer.step_end()  # no step open: nothing
    pacer.step_start()
    time.sleep(0.005)  # a step of 5 ms, "GPU" as long: the host sets the pace
    pacer.step_end()
    assert len(pacer._pending) == 1 and pacer.history == []
    monkeypatch.setattr(_Event, "query", lambda self: False)  # the GPU has not got there yet: not waited for
    pacer.step_start()
    assert len(pacer._pending) == 1
    monkeypatch.setattr(_Event, "query", lambda self: True)
    monkeypatch.setattr(graph_pacing, "WINDOW", 1)
    pacer.step_start()
    assert pacer._pending == [] and len(pacer.history) == 1 and pacer.share == graph_pacing.STEP


@pytest.fixture
def paced(monkeypatch):
    monkeypatch.setattr(graph_pacing.SharePacer, "event_class", _Event)
    monkeypatch.setattr(layer_graphs.LayerGraphs, "graph_class", ReplayingGraph)
    ReplayingGraph.log = []
    return ReplayingGraph.log


def test_a_host_bound_model_graphs_more_layers_and_trains_exactly_like_eager(paced, monkeypatch):
    monkeypatch.setattr(graph_pacing, "STEP", 0.5)
    monkeypatch.setattr(graph_pacing, "HOLD", 1)
    monkeypatch.setattr(graph_pacing, "WINDOW", 1)
    ref_losses, ref_grads = _train(_model(graphs=False, layers=4), steps=8)
    model = _model(graphs="adaptive", layers=4)
    hf = model.get_base_model()
    assert hf._slothnb_cuda_graphs == "adaptive"
    pacer = hf.model.layers[0]._slothnb_graphs.shared.pacer
    assert pacer.first == 0 and pacer.share == 0.0
    assert not hf.model.layers[-1]._slothnb_graphs.active()  # nothing graphed until the host is seen to lag
    losses, grads = _train(model, steps=8)
    assert losses == ref_losses
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    assert pacer.share == 1.0 and len(pacer.history) == 7  # read at each step's start but the first
    assert paced.count("capture") > 0 and paced.count("replay") > 0


def test_a_gpu_bound_model_stops_replaying_graphs(paced, monkeypatch):
    monkeypatch.setattr(_Event, "pace", 2.0)
    monkeypatch.setattr(graph_pacing, "HOLD", 0)
    monkeypatch.setattr(graph_pacing, "WINDOW", 1)
    model = _model(graphs="adaptive", layers=4)
    pacer = model.get_base_model().model.layers[0]._slothnb_graphs.shared.pacer
    pacer.share = 0.5
    _train(model, steps=6)
    assert pacer.share == 0.0 and paced.count("replay") == 0  # shrunk before any graph was replayed
