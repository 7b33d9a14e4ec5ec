"""CUDA graphs of checkpointed layers (slothnb.models.layer_graphs).

On the CPU a stand-in graph re-runs what was "captured" on replay, so what is tested here is the
plumbing a real graph depends on: the layer reads its inputs only from the static buffers, outputs
and gradients come back through them, parameter gradients accumulate, and training gives the same
numbers as the eager path. The GPU tests capture real graphs.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from slothnb.errors import ConfigError, HardwareError
from slothnb.models import carrying, graph_capture, layer_graphs
from slothnb.models.arch import llama_layer
from slothnb.models.checkpointing import apply_gradient_checkpointing
from slothnb.models.patching import patch_model
from tiny_models import tiny_model


class ReplayingGraph:
    """Capture runs the body and keeps it; replay runs it again. Static buffers are all it can see."""

    log: list = []

    def __init__(self, device, pool):
        self.body = None

    def capture(self, body):
        ReplayingGraph.log.append("capture")
        self.body = body
        return body()

    def replay(self):
        ReplayingGraph.log.append("replay")
        self.body()


class FailingGraph(ReplayingGraph):
    def capture(self, body):
        raise RuntimeError("operation not permitted when stream is capturing")


def _model(graphs, layers=3, dropout=0.0, seed=0):
    model = tiny_model("llama", seed=seed, num_hidden_layers=layers).train()
    patch_model(model)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, target_modules="all-linear")
    model = get_peft_model(model, cfg)
    apply_gradient_checkpointing(model, "slothnb", cuda_graphs=graphs)
    return model


def _train(model, steps=3, accumulate=1, seq=8, lr=1e-2, device="cpu"):
    """AdamW steps on fixed random batches (bf16 autocast on CUDA); the losses and the last gradients."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        for micro in range(accumulate):
            ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(step * 7 + micro))
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids.to(device), labels=ids.to(device)).loss
            loss.backward()
            losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.fixture
def replaying(monkeypatch):
    monkeypatch.setattr(layer_graphs.LayerGraphs, "graph_class", ReplayingGraph)
    ReplayingGraph.log = []
    return ReplayingGraph.log


@pytest.mark.parametrize("accumulate", [1, 2])
def test_graphed_layers_train_exactly_like_eager(replaying, accumulate):
    ref_losses, ref_grads = _train(_model(graphs=False), accumulate=accumulate)
    assert replaying == []
    losses, grads = _train(_model(graphs=True), accumulate=accumulate)
    # 3 layers, the last one too (checkpointing.GRAPH_LAST_LAYER): 3 graphed layers x (forward + backward)
    assert replaying.count("capture") == 6
    assert replaying.count("replay") == 6 * (3 * accumulate - 1)  # every call after the first
    assert losses == ref_losses
    assert grads.keys() == ref_grads.keys() and any("layers.0." in n for n in grads)
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


def test_a_share_of_the_layers_graphed_and_the_rest_eager_train_exactly_like_eager(replaying, monkeypatch):
    assert [i for i in range(8) if layer_graphs.in_share(i, 0.5)] == [1, 3, 5, 7]
    assert [i for i in range(8) if layer_graphs.in_share(i, 0.25)] == [3, 7]
    assert all(layer_graphs.in_share(i, 1.0) for i in range(8)) and not any(layer_graphs.in_share(i, 0) for i in range(8))
    ref_losses, ref_grads = _train(_model(graphs=False, layers=4), accumulate=2)
    monkeypatch.setattr(layer_graphs, "SHARE", 0.5)
    losses, grads = _train(_model(graphs=True, layers=4), accumulate=2)
    # layers 1 and 3 graphed (forward + backward each), layers 0 and 2 eager; every call after the first replays
    assert replaying.count("capture") == 4 and replaying.count("replay") == 4 * (3 * 2 - 1)
    assert losses == ref_losses
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    # ACTIVE off (read at every call): the graphs stay captured but nothing replays
    replaying.clear()
    monkeypatch.setattr(layer_graphs, "ACTIVE", False)
    assert _train(_model(graphs=True, layers=4), steps=2)[0] == _train(_model(graphs=False, layers=4), steps=2)[0]
    assert replaying == []


def test_forward_graphs_alone_train_exactly_like_eager_and_the_eager_layers_keep_their_turns_to_carry(
        replaying, monkeypatch):
    """BACKWARD "0" with a share of 0.5: layers 1 and 3 replay their forwards only, and their recompute +
    backward run eagerly, recomputing what a graph cannot carry. Layers 0 and 2 run eagerly and carry G and U
    both: each graphed layer passes its turn (``carrying.pass_gate_up_turn``), so the carrying layers stay
    one in CARRY_MLP_EVERY by position. Without that, layer 2 would have been the next offer after layer 0's."""
    import itertools

    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)  # the tiny layers carry as an 8B layer does
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 2)
    ref_losses, ref_grads = _train(_model(graphs=False, layers=4), accumulate=2)
    kept, real_carry = [], carrying.carry

    def carry(t, allowed=True, tag=""):
        if tag == "gate":
            kept.append(allowed)
        return real_carry(t, allowed, tag)

    monkeypatch.setattr(carrying, "carry", carry)
    monkeypatch.setattr(carrying, "_GATE_UP_SEEN", itertools.count())
    monkeypatch.setattr(carrying, "_GATE_UP_LAST", [-100])
    monkeypatch.setattr(layer_graphs, "SHARE", 0.5)
    monkeypatch.setattr(layer_graphs, "BACKWARD", "0")
    losses, grads = _train(_model(graphs=True, layers=4), accumulate=2)
    # layers 1 and 3: a forward graph each, captured on their second call and replayed on every later one
    assert replaying.count("capture") == 2 and replaying.count("replay") == 2 * (3 * 2 - 1)
    assert losses == ref_losses
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    assert kept == [True] * (2 * 3 * 2)  # the eager layers' forwards: 2 a pass, 6 passes, every one carried
    kept.clear()
    monkeypatch.setattr(carrying, "pass_gate_up_turn", lambda x: None)  # (the counter-check: turns not passed)
    _train(_model(graphs=True, layers=4), steps=1)
    assert True in kept and False in kept


def test_cuda_graphs_forward_replays_every_second_layers_forward_alone(replaying):
    """``cuda_graphs="forward"`` sets that up per model (no module switches): layers 1 and 3 of 4 replay
    their forwards, no backward is captured, the last layer is checkpointed too, and training is eager's."""
    assert layer_graphs.choice("Forward") == layer_graphs.FORWARD_ONLY
    with pytest.raises(ConfigError, match="'forward'"):
        layer_graphs.choice("backward")
    ref_losses, ref_grads = _train(_model(graphs=False, layers=4), accumulate=2)
    model = _model(graphs="forward", layers=4)
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    losses, grads = _train(model, accumulate=2)
    assert replaying.count("capture") == 2 and replaying.count("replay") == 2 * (3 * 2 - 1)
    assert [bool(layer._slothnb_graphs._fwd) and any(isinstance(v, tuple) for v in layer._slothnb_graphs._fwd.values())
            for layer in layers] == [False, True, False, True]
    assert not any(isinstance(v, tuple) for layer in layers for v in layer._slothnb_graphs._bwd.values())
    assert losses == ref_losses
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    apply_gradient_checkpointing(model, False)  # for_inference, then for_training: the model's choice holds
    apply_gradient_checkpointing(model, "slothnb")
    assert layers[0]._slothnb_graphs.shared.forward_only
    assert [layer._slothnb_graphs.active() for layer in layers] == [False, True, False, True]
    with pytest.MonkeyPatch.context() as mp:  # read at each call: a benchmark switches it between steps
        mp.setattr(layer_graphs, "FORWARD_SHARE", 1.0)
        assert all(layer._slothnb_graphs.active() for layer in layers)
    apply_gradient_checkpointing(model, "slothnb", cuda_graphs=True)  # re-applied: every layer, both passes
    assert not layers[0]._slothnb_graphs.shared.forward_only
    assert all(layer._slothnb_graphs.active() for layer in layers)


def test_cuda_graphs_forward_from_the_environment(monkeypatch):
    monkeypatch.setenv(layer_graphs.ENV, "forward")  # what bench/run_gpu.sh's graphs:CASE sets
    layers = _model(graphs=None).get_base_model().model.layers
    assert all(layer._slothnb_graphs.shared.forward_only for layer in layers)


def test_cuda_graphs_forward_leaves_long_inputs_eager(replaying, monkeypatch):
    """Above ``FORWARD_MAX_BYTES`` of layer input (long sequences, where the GPU's forward outlasts the host's)
    "forward" captures nothing: every layer runs and carries as without graphs."""
    monkeypatch.setattr(layer_graphs, "FORWARD_MAX_BYTES", 2 * 8 * 64 * 4 - 1)  # a byte under this batch's input
    ref_losses, _ = _train(_model(graphs=False, layers=4), steps=2)
    losses, _ = _train(_model(graphs="forward", layers=4), steps=2)
    assert replaying == [] and losses == ref_losses
    monkeypatch.setattr(layer_graphs, "FORWARD_MAX_BYTES", 2 * 8 * 64 * 4)  # exactly it: graphed
    _train(_model(graphs="forward", layers=4), steps=2)
    assert replaying.count("capture") == 2


@pytest.mark.parametrize("attention_state", ["0", "cpu"])
def test_a_carrying_layer_runs_its_forward_eagerly_and_feeds_its_carried_values_to_its_backward_graph(
        replaying, monkeypatch, attention_state):
    """With FORWARD "auto", layers whose forward carries values (8B shapes: the attention output, G and U) keep their eager,
    carrying forward and replay their recompute + backward as a graph fed those values; a carried value
    that is not a tensor (the attention state's extras) keeps that backward eager."""
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)  # the tiny layers carry as an 8B layer does
    monkeypatch.setattr(carrying, "CARRY_SDPA", attention_state)
    monkeypatch.setattr(layer_graphs, "FORWARD", "auto")  # (not the default: it lost on the GPU)
    ref_losses, ref_grads = _train(_model(graphs=False, layers=3), steps=4, accumulate=2)
    captured, written = {"forward": 0, "fed": []}, []
    real_fwd, real_bwd = layer_graphs.LayerGraphs._capture_forward, layer_graphs.LayerGraphs._capture_backward
    real_written = llama_layer.backward

    def capture_forward(self, *a):
        captured["forward"] += 1
        return real_fwd(self, *a)

    def capture_backward(self, call, inputs, grad_outs, needs, values):
        captured["fed"].append(sorted(tag for tag, v in values if v is not None))
        return real_bwd(self, call, inputs, grad_outs, needs, values)

    monkeypatch.setattr(layer_graphs.LayerGraphs, "_capture_forward", capture_forward)
    monkeypatch.setattr(layer_graphs.LayerGraphs, "_capture_backward", capture_backward)
    monkeypatch.setattr(llama_layer, "backward", lambda *a, **k: written.append("accumulate" in k) or real_written(*a, **k))
    model = _model(graphs=True, layers=3)
    losses, grads = _train(model, steps=4, accumulate=2)
    assert losses == ref_losses
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    assert captured["forward"] == 0  # carrying forwards stay eager
    if attention_state == "0":
        fed = captured["fed"]
        assert fed and all("o_proj" in tags for tags in fed) and any("gate" in tags and "up" in tags for tags in fed)
        assert replaying.count("replay") > 0 and True in written  # the written-out backward, captured
    else:
        assert replaying == [] and captured["fed"] == []


def test_layers_share_their_static_buffers(replaying):
    model = _model(graphs=True)
    _train(model, steps=2)
    layers = model.get_base_model().model.layers
    shared = layers[0]._slothnb_graphs.shared
    assert all(layer._slothnb_graphs.shared is shared for layer in layers)
    assert _model(graphs=True).get_base_model().model.layers[0]._slothnb_graphs.shared is not shared  # per model
    del layers[1]._slothnb_graphs
    apply_gradient_checkpointing(model, "slothnb")  # re-applied: a layer that lost its graphs joins the others
    assert layers[1]._slothnb_graphs.shared is shared
    roles = sorted(role for role, _ in shared.banks)
    # one input set, one output set (forward output = backward output gradient), one input gradient:
    # shared by both graphed layers and both passes
    assert roles == ["grad-in", "in", "out"]


def test_the_switch_comes_from_the_argument_the_model_or_the_environment(monkeypatch):
    monkeypatch.delenv(layer_graphs.ENV, raising=False)
    model = _model(graphs=None)
    layers = model.get_base_model().model.layers
    assert not any(hasattr(layer, "_slothnb_graphs") for layer in layers)
    monkeypatch.setenv(layer_graphs.ENV, "1")
    model = _model(graphs=None)
    layers = model.get_base_model().model.layers
    assert all(isinstance(layer._slothnb_graphs, layer_graphs.LayerGraphs) for layer in layers)
    apply_gradient_checkpointing(model, "slothnb")  # re-applied (for_training): the model's choice holds
    monkeypatch.delenv(layer_graphs.ENV)
    apply_gradient_checkpointing(model, "slothnb")
    assert all(hasattr(layer, "_slothnb_graphs") for layer in layers)
    apply_gradient_checkpointing(model, False)  # for_inference
    assert not any(hasattr(layer, "_slothnb_graphs") for layer in layers)
    apply_gradient_checkpointing(model, "slothnb")  # for_training: the graphs come back
    assert all(hasattr(layer, "_slothnb_graphs") for layer in layers)
    apply_gradient_checkpointing(model, True, cuda_graphs=True)  # standard checkpointing: no graphs
    assert not any(hasattr(layer, "_slothnb_graphs") for layer in layers)


def test_graphs_by_default_for_cuda_models_of_0_2_to_4b_parameters(monkeypatch):
    model = _model(graphs=False).get_base_model()
    monkeypatch.delenv(layer_graphs.ENV, raising=False)
    monkeypatch.setattr(layer_graphs, "AUTO_MIN_PARAMS", 0)  # the tiny model counts as small, not tiny
    assert layer_graphs.default_for(model) is False  # on the CPU there is nothing to replay
    monkeypatch.setenv(layer_graphs.ENV, "1")
    assert layer_graphs.default_for(model) is True  # the environment decides when set
    monkeypatch.setenv(layer_graphs.ENV, "0")
    assert layer_graphs.default_for(model) is False
    if torch.cuda.is_available():
        monkeypatch.delenv(layer_graphs.ENV)
        model = model.cuda()
        assert layer_graphs.default_for(model) is True
        monkeypatch.setattr(layer_graphs, "AUTO_MAX_PARAMS", 10)
        assert layer_graphs.default_for(model) == layer_graphs.FORWARD_ONLY  # past the host-bound sizes
    monkeypatch.setenv(layer_graphs.ENV, "adaptive")
    assert layer_graphs.default_for(model) == layer_graphs.ADAPTIVE
    monkeypatch.setenv(layer_graphs.ENV, "sometimes")
    with pytest.raises(ConfigError, match="'adaptive'"):
        layer_graphs.default_for(model)


def test_the_default_by_size_graphs_whole_layers_of_small_models_and_the_forward_of_large_ones():
    small, large = layer_graphs.AUTO_MIN_PARAMS, layer_graphs.AUTO_MAX_PARAMS
    assert layer_graphs.by_size(135_000_000) is False  # SmolLM2-135M: tiny, nothing to gain
    assert layer_graphs.by_size(small) is True and layer_graphs.by_size(1_236_000_000) is True  # Llama-3.2-1B
    assert layer_graphs.by_size(large) is True
    assert layer_graphs.by_size(large + 1) == layer_graphs.FORWARD_ONLY
    assert layer_graphs.by_size(3_212_749_824) is True  # Llama-3.2-3B: whole layers won there (session 32)
    assert layer_graphs.by_size(4_778_561_536) == layer_graphs.FORWARD_ONLY  # bench's 4.8B: the forward won
    assert layer_graphs.by_size(8_030_000_000) == layer_graphs.FORWARD_ONLY  # Llama-3.1-8B


def test_dropout_keeps_a_layer_eager(replaying):
    _train(_model(graphs=True, dropout=0.1), steps=2)
    assert replaying == []  # a graph would replay one dropout mask forever


def test_a_failed_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setattr(layer_graphs.LayerGraphs, "graph_class", FailingGraph)
    ref_losses, ref_grads = _train(_model(graphs=False), steps=3)
    with pytest.warns(RuntimeWarning, match="runs eagerly, its CUDA graph failed: RuntimeError"):
        losses, grads = _train(_model(graphs=True), steps=3)
    assert losses == ref_losses
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name


def _cuda_model(graphs, arch="llama"):
    model = tiny_model(arch, seed=0, num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2).to("cuda", torch.bfloat16).train()
    patch_model(model)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    apply_gradient_checkpointing(model, "slothnb", cuda_graphs=graphs)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_real_cuda_graphs_train_like_eager_on_gpu(arch):
    ref_losses, ref_grads = _train(_cuda_model(False, arch), steps=5, seq=256, lr=1e-3, device="cuda")
    model = _cuda_model(True, arch)
    losses, grads = _train(model, steps=5, seq=256, lr=1e-3, device="cuda")
    layer = model.get_base_model().model.layers[0]
    graphs = layer._slothnb_graphs
    assert any(isinstance(v, tuple) for v in graphs._fwd.values())  # captured, not fallen back
    assert any(isinstance(v, tuple) for v in graphs._bwd.values())
    # the adapters change every step: a stale cast or a stale parameter inside a graph shows here
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=2e-3)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=2e-2, atol=1e-4, msg=name)
    reserved, allocated = graph_capture.pool_usage()
    assert reserved == graph_capture.pool_bytes() > allocated >= 0
    graph = next(v[0] for v in layer._slothnb_graphs._bwd.values() if isinstance(v, tuple))
    assert 0 < graph.transient <= reserved  # a backward's temporaries: in the pool, unseen by the allocator
    live = graph_capture.replay_peak(reset=True)
    assert live > torch.cuda.memory_allocated() and graph_capture.replay_peak() == 0


@pytest.mark.gpu
def test_carrying_layers_feed_their_backward_graphs_through_host_memory_on_gpu(monkeypatch):
    """8B-style layers on the GPU: the forward runs eagerly and carries its attention output, G and U
    through pinned host memory; the recompute + backward replays as a graph fed those values."""
    from slothnb.models import host_offload

    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)
    monkeypatch.setattr(layer_graphs, "FORWARD", "auto")
    monkeypatch.setattr(carrying, "GATE_UP_BACKLOG_PAIRS", 1e9)  # the link's pace may not refuse any here
    ref_losses, ref_grads = _train(_cuda_model(False), steps=5, seq=256, lr=1e-3, device="cuda")
    host_offload.COUNTS.clear()
    model = _cuda_model(True)
    losses, grads = _train(model, steps=5, seq=256, lr=1e-3, device="cuda")
    assert host_offload.COUNTS["gate_up_carried"] > 0
    for layer in model.get_base_model().model.layers:
        assert not any(isinstance(v, tuple) for v in layer._slothnb_graphs._fwd.values())  # eager, carrying
    fed = [key[-2] for layer in model.get_base_model().model.layers
           for key, v in layer._slothnb_graphs._bwd.items() if isinstance(v, tuple)]
    assert fed and any(dict(tags).get("gate") for tags in fed)  # a backward graph fed the carried G and U
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=2e-3)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=2e-2, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["switches", "forward"])
def test_forward_graphs_alone_beside_carrying_eager_layers_train_like_eager_on_gpu(monkeypatch, how):
    """8B-style layers on the GPU, half of them graphed forward-only (BACKWARD "0" and SHARE 0.5, or
    ``cuda_graphs="forward"``): those replay their forwards and recompute eagerly; the others run eagerly and
    carry G and U through pinned host memory."""
    from slothnb.models import host_offload

    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)
    monkeypatch.setattr(carrying, "GATE_UP_BACKLOG_PAIRS", 1e9)  # the link's pace may not refuse any here
    ref_losses, ref_grads = _train(_cuda_model(False), steps=5, seq=256, lr=1e-3, device="cuda")
    if how == "switches":
        monkeypatch.setattr(layer_graphs, "SHARE", 0.5)
        monkeypatch.setattr(layer_graphs, "BACKWARD", "0")
    host_offload.COUNTS.clear()
    model = _cuda_model(True if how == "switches" else "forward")
    losses, grads = _train(model, steps=5, seq=256, lr=1e-3, device="cuda")
    assert host_offload.COUNTS["gate_up_carried"] > 0
    layers = model.get_base_model().model.layers
    graphed = [any(isinstance(v, tuple) for v in layer._slothnb_graphs._fwd.values()) for layer in layers]
    assert graphed == [False, True, False, True]
    assert not any(isinstance(v, tuple) for layer in layers for v in layer._slothnb_graphs._bwd.values())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=2e-3)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=2e-2, atol=1e-4, msg=name)


@pytest.mark.gpu
def test_a_replay_peak_counts_the_graph_temporaries_the_allocator_does_not_see_on_gpu():
    """A graph whose body holds a 64 MiB temporary: a replay adds 64 MiB that max_memory_allocated misses,
    and the capture restarted that counter, keeping what it held for peak_before_capture."""
    graph_capture.peak_before_capture(reset=True)
    x = torch.ones(1024, device="cuda")
    out = torch.empty_like(x)
    big = torch.empty(96 << 20, dtype=torch.uint8, device="cuda")
    del big  # the counter's peak is now 96 MiB above what is allocated
    before = torch.cuda.max_memory_allocated()
    graph = graph_capture.Graph(x.device, torch.cuda.graph_pool_handle())

    def body():
        tmp = torch.full((16 << 20,), 2.0, device="cuda")  # 64 MiB, freed inside the capture
        out.copy_(x * tmp[:1024])

    graph.capture(body)
    assert graph_capture.peak_before_capture(reset=True) >= before
    assert (64 << 20) <= graph.transient < (80 << 20)
    graph_capture.replay_peak(reset=True)
    torch.cuda.reset_peak_memory_stats()
    allocated = torch.cuda.memory_allocated()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, 2 * x)
    assert torch.cuda.max_memory_allocated() < allocated + (1 << 20)  # the allocator saw nothing of tmp
    assert graph_capture.replay_peak(reset=True) == allocated + graph.transient


@pytest.mark.gpu
def test_real_cuda_graphs_qlora_train_like_eager_on_gpu(tmp_path, monkeypatch):
    """NF4 bases: the graphs record the dequantisation into the widened weight, the adapter-in-matmul
    path and the chunked h A_d^T of the recompute (4 chunks of the 2 x 256 x 768 h here)."""
    pytest.importorskip("bitsandbytes")
    import transformers

    from slothnb.kernels import lora as lora_ops

    monkeypatch.setattr(lora_ops, "H_CHUNK_BYTES", 192 << 10)

    tiny_model("llama", seed=0, num_hidden_layers=3, hidden_size=256, intermediate_size=768,
               num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)

    def build(graphs):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                                  dtype=torch.bfloat16, device_map={"": 0})
        patch_model(model)
        torch.manual_seed(1)
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, target_modules="all-linear")
        model = get_peft_model(model.train(), cfg)
        apply_gradient_checkpointing(model, "slothnb", cuda_graphs=graphs)
        return model

    ref_losses, ref_grads = _train(build(False), steps=4, seq=256, lr=1e-3, device="cuda")
    model = build(True)
    losses, grads = _train(model, steps=4, seq=256, lr=1e-3, device="cuda")
    graphs = model.get_base_model().model.layers[0]._slothnb_graphs
    assert any(isinstance(v, tuple) for v in graphs._bwd.values())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=2e-3)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=2e-2, atol=1e-4, msg=name)


def test_static_inputs_copy_only_what_changed():
    cos = torch.randn(4, 8)
    bank = graph_capture.StaticInputs([torch.empty(2, 8), cos])
    x1 = torch.randn(2, 8)
    bank.load([x1, cos])
    first = bank.buffers[1].clone()
    cos_seen = bank.last[1]
    bank.load([torch.randn(2, 8), cos])  # the next layer: a new hidden state, the same cos
    assert bank.last[1] is cos_seen and torch.equal(bank.buffers[1], first)
    cos.mul_(2)  # changed in place: its version moved on, so it is copied again
    bank.load([x1, cos])
    assert torch.equal(bank.buffers[1], cos) and torch.equal(bank.buffers[0], x1)
    del x1  # the bank does not keep a layer input alive
    assert bank.last[0][0]() is None


def test_new_shapes_beyond_the_limit_run_eagerly(replaying, monkeypatch):
    monkeypatch.setattr(layer_graphs, "MAX_SIGNATURES", 2)
    model = _model(graphs=True, layers=2)
    graphs = model.get_base_model().model.layers[0]._slothnb_graphs
    with pytest.warns(RuntimeWarning, match="has seen 2 input shapes"):
        for length in (6, 7, 8):
            ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
            model(input_ids=ids, labels=ids).loss.backward()
    assert list(graphs._fwd.values()) == ["seen", "seen", "eager"]
    assert list(graphs._bwd.values()) == ["seen", "seen", "eager"]


def test_a_capture_that_breaks_the_random_generator_stops_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(layer_graphs.LayerGraphs, "graph_class", FailingGraph)
    monkeypatch.setattr(layer_graphs.LayerGraphs, "generator_usable", staticmethod(lambda device: False))
    with pytest.raises(HardwareError, match="random number generator unusable.*without CUDA graphs") as caught:
        _train(_model(graphs=True), steps=2)
    assert "operation not permitted when stream is capturing" in str(caught.value.__cause__)


@pytest.mark.gpu
def test_the_defaults_of_a_small_model_graph_it_and_offload_its_head_on_gpu(monkeypatch):
    """A 0.21B-parameter model on the GPU: slothnb's get_peft_model turns the graphs on by itself, the head
    follows them into host memory, and training matches the eager, head-on-GPU model step for step."""
    from slothnb.models import head_offload
    from slothnb.models.lora import get_peft_model as slothnb_peft

    monkeypatch.delenv(layer_graphs.ENV, raising=False)
    monkeypatch.setattr(head_offload, "MIN_BYTES", 0)  # its 64 MiB head counts as large

    def build(**kw):
        model = tiny_model("llama", seed=0, num_hidden_layers=15, hidden_size=1024, intermediate_size=2816,
                           num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
        model = model.to("cuda", torch.bfloat16)
        patch_model(model)
        size = layer_graphs.parameter_count(model)  # what default_for counts (the head leaves them later)
        return slothnb_peft(model, r=8, lora_alpha=16, init_lora_weights=False, random_state=0, **kw).train(), size

    ref, _ = build(cuda_graphs=False, offload_head=False)
    assert not ref._slothnb_lora["cuda_graphs"] and not ref._slothnb_lora["offloaded_head"]
    ref_losses, ref_grads = _train(ref, steps=4, seq=256, lr=1e-3, device="cuda")
    del ref
    model, size = build()
    assert size > layer_graphs.AUTO_MIN_PARAMS
    assert model._slothnb_lora["cuda_graphs"] and model._slothnb_lora["offloaded_head"]
    losses, grads = _train(model, steps=4, seq=256, lr=1e-3, device="cuda")
    layers = model.get_base_model().model.layers
    assert all(any(isinstance(v, tuple) for v in layer._slothnb_graphs._bwd.values()) for layer in layers)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=2e-3)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=2e-2, atol=1e-4, msg=name)
