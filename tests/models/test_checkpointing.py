"""Checkpointing modes give the gradients of no checkpointing; "slothnb" really runs its own function."""
import pytest
import torch
from torch import nn

from slothnb.errors import ConfigError
from slothnb.models import checkpointing as ckpt
from slothnb.models import host_offload
from slothnb.models.checkpointing import apply_gradient_checkpointing, checkpoint_policy, offloaded_checkpoint
from tiny_models import tiny_model


def _model(layers=3, dropout=0.0, arch="llama"):
    m = tiny_model(arch, seed=0, num_hidden_layers=layers, attention_dropout=dropout)
    return m.train()


def _fake_offload(monkeypatch, on_restore=None):
    """Offloading forced on for CPU tensors, with a stand-in that records what is stored/restored."""
    stored, restored = [], []

    class FakeOffload:
        def __init__(self, x, far_ahead=True):
            self.copy = x.detach().clone()
            stored.append(tuple(x.shape))

        def restore(self):
            restored.append(1)
            if on_restore is not None:
                on_restore(self.copy)
            return self.copy

    monkeypatch.setattr(host_offload, "worth_offloading", lambda t: True)
    monkeypatch.setattr(host_offload, "OffloadedTensor", FakeOffload)
    return stored, restored


def _loss_and_grads(model, seed=123):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for every mode, if RNG is preserved in the recompute
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("mode", [True, "slothnb"])
def test_modes_match_no_checkpointing(mode, dropout, monkeypatch):
    model = _model(dropout=dropout)
    ref_loss, ref_grads = _loss_and_grads(model)
    runs = []
    real_run = ckpt._Call.run
    monkeypatch.setattr(ckpt._Call, "run", lambda self, t: runs.append(1) or real_run(self, t))

    chosen = apply_gradient_checkpointing(model, mode)
    # "slothnb" leaves the last layer un-checkpointed by default (default_offload_layers)
    assert chosen == ([0, 1] if mode == "slothnb" else [0, 1, 2]) and ckpt.is_checkpointing(model)
    loss, grads = _loss_and_grads(model)

    assert len(runs) == (4 if mode == "slothnb" else 0)  # a forward and a recompute per checkpointed layer
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    if dropout:  # the test would be vacuous if dropout did nothing: another seed changes the loss
        other, _ = _loss_and_grads(model, seed=7)
        assert not torch.allclose(other, loss)


@pytest.mark.parametrize("arch", ["gemma2", "phi3", "qwen3"])
def test_slothnb_matches_on_other_architectures(arch):
    model = _model(layers=2, arch=arch)
    ref_loss, ref = _loss_and_grads(model)
    apply_gradient_checkpointing(model, "slothnb")
    loss, got = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_only_the_hidden_states_are_offloaded(monkeypatch):
    """With offloading forced on CPU: one offload per layer, of the [B, S, H] hidden states only
    (cos/sin and masks stay shared), restored once each in backward, gradients unchanged."""
    model = _model()
    _, ref = _loss_and_grads(model)
    stored, restored = _fake_offload(monkeypatch)
    apply_gradient_checkpointing(model, "slothnb", layers=[0, 1, 2])
    _, got = _loss_and_grads(model)
    assert stored == [(2, 24, 64)] * 3 and len(restored) == 3
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)


def test_false_turns_checkpointing_off():
    model = _model()
    apply_gradient_checkpointing(model, "slothnb")
    assert apply_gradient_checkpointing(model, False) == []
    assert not ckpt.is_checkpointing(model)
    assert not any(layer.gradient_checkpointing for layer in ckpt.decoder_layers(model))


def test_frozen_input_still_reaches_trainable_weights():
    """No input requires grad (frozen embeddings, no input-grad hook), yet LoRA-like weights must get grads."""
    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp.down_proj" in name)
    _, ref = _loss_and_grads(model)
    apply_gradient_checkpointing(model, "slothnb")
    for h in getattr(model, "_require_grads_hooks", []):
        h.remove()
    _, got = _loss_and_grads(model)
    assert len(got) == 3
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)


class _TupleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, *, bias, scale, tag=None):
        y = self.lin(x) * scale + bias
        return y, None, torch.tensor([len(tag)]), {"sq": y.pow(2)}


def test_tuple_outputs_non_tensor_kwargs_and_kwarg_grads():
    import functools

    torch.manual_seed(0)
    layer = _TupleLayer()
    x = torch.randn(3, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)  # a keyword tensor that needs grad: must not be lost

    def run(fn):
        for t in (x, bias, *layer.parameters()):
            t.grad = None
        out = fn()
        (out[0].sum() + out[3]["sq"].sum()).backward()
        return out, [t.grad.clone() for t in (x, bias, *layer.parameters())]

    ref_out, ref_g = run(lambda: layer(x, bias=bias, scale=2.0, tag="ab"))
    fn = functools.partial(layer.forward, bias=bias, tag="ab")
    got_out, got_g = run(lambda: offloaded_checkpoint(fn, x, scale=2.0))
    assert got_out[1] is None and got_out[2].tolist() == [2] and not got_out[2].requires_grad
    torch.testing.assert_close(got_out[0], ref_out[0])
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b)


def test_without_grad_it_just_calls():
    layer = _TupleLayer()
    with torch.no_grad():
        out = offloaded_checkpoint(layer, torch.randn(2, 8), bias=torch.zeros(8), scale=1.0, tag="")
    assert out[0].grad_fn is None


def test_policy_and_layer_selection():
    model = _model(layers=4)
    assert checkpoint_policy(model) == [0, 1, 2, 3]
    per_layer = ckpt.layer_activation_bytes(model.config, tokens=128)
    gib = 1024**3
    assert checkpoint_policy(model, budget_gib=0, seq_len=128) == [0, 1, 2, 3]
    assert checkpoint_policy(model, budget_gib=4 * per_layer / gib, seq_len=128) == []
    # 3 layers' worth: one is the recompute working space, two layers keep activations
    assert checkpoint_policy(model, budget_gib=3 * per_layer / gib, seq_len=128) == [0, 1]
    assert checkpoint_policy(model, budget_gib=3 * per_layer / gib, batch_size=2, seq_len=128) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="budget_gib"):
        checkpoint_policy(model, budget_gib=-1)

    assert apply_gradient_checkpointing(model, "slothnb", layers=[1, 3]) == [1, 3]
    flags = [layer.gradient_checkpointing for layer in ckpt.decoder_layers(model)]
    assert flags == [False, True, False, True]
    with pytest.raises(ConfigError, match="4 decoder layers"):
        apply_gradient_checkpointing(model, True, layers=[4])


def test_slothnb_default_keeps_only_the_last_layer():
    """Without layers or budget: "slothnb" offloads all but the last layer, True checkpoints all."""
    model = _model(layers=4)
    assert ckpt.default_offload_layers(4) == [0, 1, 2] and ckpt.default_offload_layers(1) == [0]
    assert apply_gradient_checkpointing(model, "slothnb") == [0, 1, 2]
    layers = ckpt.decoder_layers(model)
    assert [layer._gradient_checkpointing_func for layer in layers] == [offloaded_checkpoint] * 3 + [
        ckpt.last_layer_checkpoint]  # the last layer decides per call (see the next test)
    assert apply_gradient_checkpointing(model, True) == [0, 1, 2, 3]
    per_layer = ckpt.layer_activation_bytes(model.config, tokens=128)
    assert apply_gradient_checkpointing(model, "slothnb", budget_gib=3 * per_layer / 1024**3, seq_len=128) == [0, 1]


def test_with_cuda_graphs_the_default_policy_checkpoints_the_last_layer_too(monkeypatch):
    """Graphs replay the last layer as well, so it no longer holds its activations through the loss;
    SLOTHNB_GRAPH_LAST_LAYER=0 restores the plain default."""
    model = _model(layers=3)
    assert apply_gradient_checkpointing(model, "slothnb", cuda_graphs=True) == [0, 1, 2]
    layers = ckpt.decoder_layers(model)
    assert [layer._gradient_checkpointing_func for layer in layers] == [offloaded_checkpoint] * 3
    assert all(layer.gradient_checkpointing and layer._slothnb_graphs is not None for layer in layers)
    monkeypatch.setattr(ckpt, "GRAPH_LAST_LAYER", False)
    assert apply_gradient_checkpointing(model, "slothnb", cuda_graphs=True) == [0, 1]
    assert layers[-1]._gradient_checkpointing_func is ckpt.last_layer_checkpoint
    assert apply_gradient_checkpointing(model, "slothnb", cuda_graphs=False) == [0, 1]


def test_partial_checkpointing_matches_reference():
    model = _model(layers=4)
    ref_loss, ref = _loss_and_grads(model)
    apply_gradient_checkpointing(model, "slothnb", layers=[0, 2])
    loss, got = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["fast", 2, "yes"])
def test_unknown_mode_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="use_gradient_checkpointing"):
        apply_gradient_checkpointing(_model(layers=1), bad)


def test_mode_aliases():
    assert ckpt.normalize_mode("unsloth") == "slothnb"
    assert ckpt.normalize_mode(None) is False
    assert ckpt.normalize_mode("True") is True


@pytest.mark.gpu
def test_offloaded_peak_is_lower_than_standard_on_gpu():
    """24 layers x 8192 tokens x 1024 hidden in bf16: standard checkpointing keeps ~384 MiB of layer
    inputs on the GPU, "slothnb" keeps them in pinned CPU memory."""
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", hidden_size=1024, intermediate_size=1024, num_hidden_layers=24,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device("cuda"):  # 170M parameters: initialised on the GPU, not on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    for name, p in model.named_parameters():
        p.requires_grad_("layernorm" in name)  # tiny trainable set: activations dominate the peak
    ids = torch.randint(0, cfg.vocab_size, (1, 8192), device="cuda")

    def peak(mode):
        apply_gradient_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        grads = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        return torch.cuda.max_memory_allocated() - base, grads

    standard, g_std = peak(True)
    offloaded, g_off = peak("slothnb")
    saved_inputs = 24 * 8192 * 1024 * 2
    assert offloaded < standard - saved_inputs // 2, (standard / 2**20, offloaded / 2**20)
    # bf16 gradients summed over 8,192 tokens, and SDPA's backward is not deterministic run to run: an
    # element near zero may differ by ~1e-3 (seen twice in 2 x 1,024: 1.05e-3 in session 23, the largest
    # gradient being ~0.1); a broken offload differs by the gradients' own size
    for a, b in zip(g_off, g_std):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=max(2e-3, 1e-2 * b.abs().max().item()))


@pytest.mark.gpu
def test_prefetch_chain_and_no_host_sync_on_gpu():
    """Three offloaded layers in a row: forward and backward never synchronise the host (sync debug
    mode raises), restoring a layer has already queued the copy of the one before it, and the
    gradients equal the plain chain's."""
    torch.manual_seed(0)
    layers = [nn.Linear(256, 256).cuda() for _ in range(3)]
    x = torch.randn(4, 64, 256, device="cuda", requires_grad=True)

    def run(checkpointed):
        for t in (x, *[p for l in layers for p in l.parameters()]):
            t.grad = None
        h = x
        for layer in layers:
            h = offloaded_checkpoint(layer, h) if checkpointed else layer(h)
        h.square().sum().backward()
        return [t.grad.clone() for t in (x, *[p for l in layers for p in l.parameters()])]

    ref = run(False)
    run(True)  # warm-up: pinned buffers are allocated once, then pooled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run(True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    host_offload.release_finished_copies()  # every device->host copy has finished: no input is held for it
    assert not host_offload._IN_FLIGHT


def test_the_graph_holds_no_reference_to_offloaded_inputs():
    """Between forward and backward the only copy of an offloaded input is the pinned one: the
    autograd node must not keep the GPU tensor alive (a regression that cost GiBs at 8K tokens)."""
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8, requires_grad=True) * 1.0
    scale = torch.ones(8)
    out = offloaded_checkpoint(lambda h, s=None: layer(h) * s, x, s=scale)
    node = out.grad_fn
    assert not any(isinstance(v, torch.Tensor) for v in node.call.leaves)
    out.sum().backward()
    assert layer.weight.grad is not None


# ------------------------------------------------------------------------------------ host budget
def test_layers_over_the_host_budget_stay_on_the_device(monkeypatch):
    """4 layers, room for 2 inputs: the first 2 are offloaded, the last 2 kept (plain recompute);
    gradients unchanged, and the next step admits 2 again (restored bytes were released)."""
    model = _model(layers=4)
    _, ref = _loss_and_grads(model)
    nbytes = 2 * 24 * 64 * 4  # [B, S, H] fp32
    budget = host_offload.HostBudget(limit_bytes=int(2.5 * nbytes))
    stored, restored = _fake_offload(monkeypatch, on_restore=lambda copy: budget.release(copy.nbytes))
    monkeypatch.setattr(host_offload, "HOST_BUDGET", budget)
    apply_gradient_checkpointing(model, "slothnb", layers=[0, 1, 2, 3])
    for _ in range(2):
        stored.clear(), restored.clear()
        _, got = _loss_and_grads(model)
        assert len(stored) == 2 and len(restored) == 2 and budget.in_use == 0
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)


def test_last_layer_is_checkpointed_only_for_long_inputs(monkeypatch):
    """Default "slothnb": the last layer runs plainly for short inputs and is offload-checkpointed
    once its input passes LAST_LAYER_KEEP_BYTES; gradients are the same either way."""
    runs = []
    real_run = ckpt._Call.run
    monkeypatch.setattr(ckpt._Call, "run", lambda self, t: runs.append(1) or real_run(self, t))
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))

    def grads(keep_bytes):
        monkeypatch.setattr(ckpt, "LAST_LAYER_KEEP_BYTES", keep_bytes)
        model = _model(layers=3)
        apply_gradient_checkpointing(model, "slothnb")
        model.train()
        runs.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        return len(runs), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    short_runs, short = grads(1 << 40)
    long_runs, long = grads(0)
    assert (short_runs, long_runs) == (2 * 2, 2 * 3)  # forward + recompute per checkpointed layer
    for name in short:
        torch.testing.assert_close(long[name], short[name], rtol=1e-5, atol=1e-6)


def test_recompute_state_replays_the_forward_rng_then_restores_the_current_one():
    from slothnb.kernels._utils import RecomputeState

    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = RecomputeState([torch.zeros(1)])
    in_forward = torch.rand(4)
    torch.rand(4)  # the run goes on
    saved = torch.get_rng_state()
    next_draw = torch.rand(4)
    torch.set_rng_state(saved)
    with state.replay():
        assert torch.equal(torch.rand(4), in_forward)  # the forward's draws again
        assert torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
    assert torch.equal(torch.rand(4), next_draw)  # and the run's own stream afterwards
    assert not torch.is_autocast_enabled("cpu")

    unpreserved = RecomputeState([torch.zeros(1)], preserve_rng=False)
    saved = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(saved)
    with unpreserved.replay():
        assert torch.equal(torch.rand(4), expected)  # nothing replayed: the current stream
