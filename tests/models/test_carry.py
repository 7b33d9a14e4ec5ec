"""A checkpointed layer's forward hands its attention output projection's result to its recompute
(``carrying.carry`` / ``carried``, ``SLOTHNB_CARRY_ATTN_OUTPUT=1``): the recompute skips that
projection's base matmul, and the loss and every gradient stay bit-identical."""
import pytest
import torch

from checkpoint_checks import checkpointed_lora_model as _lora_model
from checkpoint_checks import loss_and_grads as _loss_and_grads
from checkpoint_checks import spy as _spy
from slothnb.errors import ConfigError
from slothnb.kernels import lora as lora_kernels
from slothnb.kernels.lora import LoraWeights, lora_linear
from slothnb.models import carrying, host_offload


@pytest.fixture(autouse=True)
def _tiny_models_carry_too(monkeypatch):
    """These tiny models are far below the size from which carrying pays (``CARRY_MIN_BYTES``)."""
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)


def _base_matmuls(monkeypatch):
    """Per lora_linear forward: whether it was handed its output (no base matmul) instead of computing it."""
    return _spy(monkeypatch, lora_kernels.LoraLinearFunction, 2)  # the ``given`` argument: [output or None]


def _counts(given):
    handed = sum(g[0] is not None for g in given)
    return {"computed": len(given) - handed, "handed": handed}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma", "phi3", "gemma2"])
def test_carried_attention_output_skips_the_recompute_matmul_with_identical_gradients(arch, monkeypatch):
    model = _lora_model(arch)
    monkeypatch.setattr(carrying, "CARRY", False)
    ref_loss, ref = _loss_and_grads(model)
    monkeypatch.setattr(carrying, "CARRY", True)
    given = _base_matmuls(monkeypatch)
    loss, got = _loss_and_grads(model)
    # 2 layers: 2 forwards compute o_proj; the recompute of layer 0 is handed it
    assert _counts(given) == {"computed": 2, "handed": 1}
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys() and any("o_proj.lora_A" in n for n in got)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_nothing_is_carried_when_off_or_outside_a_checkpoint(monkeypatch):
    model = _lora_model("llama")
    monkeypatch.setattr(carrying, "CARRY", False)
    given = _base_matmuls(monkeypatch)
    _loss_and_grads(model)
    assert _counts(given) == {"computed": 3, "handed": 0}  # 2 forwards + 1 recompute
    carrying.carry(torch.ones(2))  # no layer forward is recording: a no-op
    assert carrying.carried() is None


def test_host_budget_keeps_room_for_the_layer_inputs():
    budget = host_offload.HostBudget(limit_bytes=100)
    assert budget.admit(40, reserve=40) and budget.in_use == 40
    assert not budget.admit(40, reserve=40)  # 40 + 40 + 40 > 100: the next layer input comes first
    assert budget.admit(40) and budget.in_use == 80


def test_lora_linear_refuses_an_output_of_the_wrong_shape():
    p = LoraWeights(torch.randn(6, 4), None, torch.randn(2, 4, requires_grad=True),
                    torch.randn(6, 2, requires_grad=True), 1.0)
    x = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="output= must be"):
        lora_linear(x, p, output=torch.empty(3, 5))
    y = lora_linear(x, p, output=x @ p.weight.t() + (x @ p.A.t()) @ p.B.t())
    y.sum().backward()
    assert p.A.grad is not None and p.B.grad is not None


@pytest.mark.gpu
def test_carry_on_gpu_goes_through_host_memory_and_trains_identically(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _lora_model("llama", layers=4, device="cuda")
    monkeypatch.setattr(carrying, "CARRY", False)
    ref_loss, ref = _loss_and_grads(model, seq=128, device="cuda")
    monkeypatch.setattr(carrying, "CARRY", True)
    for _ in range(3):  # each pass requests the pinned buffers it lacked; they are pinned in the
        _loss_and_grads(model, seq=128, device="cuda")  # background, free for a later pass
        host_offload._POOL.wait_for_pinning()
    offloaded = []
    real = host_offload.OffloadedTensor.__init__
    monkeypatch.setattr(host_offload.OffloadedTensor, "__init__",
                        lambda self, x, **kw: offloaded.append(tuple(x.shape)) or real(self, x, **kw))
    loss, got = _loss_and_grads(model, seq=128, device="cuda")
    hidden = model.config.hidden_size
    assert offloaded.count((2, 128, hidden)) == 6  # 3 layer inputs + 3 attention outputs
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


# --------------------------------------------------------------------------------- the MLP's G and U
def _mlp_handed(monkeypatch):
    """Per lora_mlp forward: whether it was handed G and U (``(gate_up, keep)``, argument 3)."""
    return _spy(monkeypatch, lora_kernels.LoraMLPFunction, 3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma", "phi3", "gemma2"])
@pytest.mark.parametrize("with_attention_output", [True, False])
def test_carried_gate_and_up_skip_their_recompute_with_identical_gradients(arch, with_attention_output,
                                                                           monkeypatch):
    model = _lora_model(arch)
    ref_loss, ref = _loss_and_grads(model)
    monkeypatch.setattr(carrying, "CARRY_MLP", True)
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 1)
    # both at once share one FIFO, popped in call order; alone, the MLP still records
    monkeypatch.setattr(carrying, "CARRY", with_attention_output)
    io = _mlp_handed(monkeypatch)
    given = _base_matmuls(monkeypatch)
    loss, got = _loss_and_grads(model)
    handed = [g is not None for g, _ in io]
    # 2 forwards + the recompute of layer 0; Phi-3's fused gate_up_proj does not carry
    assert handed == ([False, False, False] if arch == "phi3" else [False, False, True])
    assert _counts(given)["handed"] == int(with_attention_output)  # only when asked for
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_gate_and_up_are_not_carried_per_token_chunk_or_over_the_copy_limit(monkeypatch):
    from slothnb.models.arch import common

    model = _lora_model("llama", layers=3)
    ref_loss, ref = _loss_and_grads(model, seq=24)
    monkeypatch.setattr(carrying, "CARRY_MLP", True)
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 1)
    monkeypatch.setattr(common, "MLP_CHUNK_TOKENS", 16)  # 48 tokens: chunked, whose recompute runs per chunk
    io = _mlp_handed(monkeypatch)
    loss, got = _loss_and_grads(model, seq=24)
    assert not any(g is not None for g, _ in io)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    # on the GPU, copies still queued beyond one layer's G and U: this layer's are not carried (recomputed)
    monkeypatch.setattr(host_offload, "worth_offloading", lambda t: True)
    for pacing, measure in (("backlog", "link_backlog_bytes"), ("in_flight", "in_flight_bytes")):
        monkeypatch.setattr(carrying, "GATE_UP_PACING", pacing)
        monkeypatch.setattr(host_offload, "link_backlog_bytes", lambda: 0)
        monkeypatch.setattr(host_offload, "in_flight_bytes", lambda: 0)
        monkeypatch.setattr(host_offload, measure, lambda: 1 << 40)
        entries = []
        with carrying._carry_scope("record", entries):
            carrying._keep_gate_up(torch.ones(4, 8), torch.ones(4, 8))
        assert entries == [("gate", None), ("up", None)], pacing
        monkeypatch.setattr(host_offload, measure, lambda: 2 * 4 * 8 * 4)  # exactly one layer's G and U
        assert carrying._link_has_room(torch.ones(4, 8), torch.ones(4, 8)), pacing


def test_lora_mlp_refuses_gate_up_of_the_wrong_shape():
    ps = [LoraWeights(torch.randn(o, i), None, torch.randn(2, i, requires_grad=True),
                      torch.randn(o, 2, requires_grad=True), 1.0) for o, i in ((8, 4), (8, 4), (4, 8))]
    x = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="gate_up= must be"):
        lora_kernels.lora_mlp(x, *ps, gate_up=(torch.empty(3, 8), torch.empty(3, 7)))


@pytest.mark.gpu
def test_carried_gate_and_up_on_gpu_train_identically(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _lora_model("llama", layers=4, device="cuda")
    ref_loss, ref = _loss_and_grads(model, seq=128, device="cuda")
    monkeypatch.setattr(carrying, "CARRY_MLP", True)
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 1)
    _loss_and_grads(model, seq=128, device="cuda")  # pinned buffers requested, pinned in the background
    host_offload._POOL.wait_for_pinning()
    io = _mlp_handed(monkeypatch)
    loss, got = _loss_and_grads(model, seq=128, device="cuda")
    assert any(g is not None for g, _ in io)  # at least one recompute was handed G and U
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_gate_and_up_are_carried_in_one_layer_of_every_few(monkeypatch):
    """Every layer's G and U would be ~7x a layer input's bytes over PCIe each way: the forward would wait."""
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 3)
    for slots in ("fixed", "spaced"):
        monkeypatch.setattr(carrying, "GATE_UP_SLOTS", slots)
        monkeypatch.setattr(carrying, "_GATE_UP_SEEN", __import__("itertools").count())
        monkeypatch.setattr(carrying, "_GATE_UP_LAST", [-100])
        entries = []
        with carrying._carry_scope("record", entries):
            for _ in range(7):
                carrying._keep_gate_up(torch.ones(4, 8), torch.ones(4, 8))
        carried = [entries[i][1] is not None for i in range(0, 14, 2)]
        assert carried == [True, False, False, True, False, False, True], slots
        assert all((entries[i][1] is None) == (entries[i + 1][1] is None) for i in range(0, 14, 2))  # G and U together


def test_a_layer_refused_for_link_room_passes_its_turn_to_the_next(monkeypatch):
    """"spaced" slots: offer 2 finds the link behind, so offer 3 carries and the spacing counts from there;
    "fixed" slots wait for offer 4. No two carrying layers are ever adjacent. Each refusal is counted by reason."""
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 2)
    monkeypatch.setattr(host_offload, "worth_offloading", lambda t: True)
    monkeypatch.setattr(host_offload, "pinned_buffers_ready", lambda t, n: True)
    monkeypatch.setattr(host_offload, "offload_carried", lambda t: "offloaded")
    for slots, expected in (("spaced", [True, False, False, True, False, True]),
                            ("fixed", [True, False, False, False, True, False])):
        monkeypatch.setattr(carrying, "GATE_UP_SLOTS", slots)
        monkeypatch.setattr(carrying, "_GATE_UP_SEEN", __import__("itertools").count())
        monkeypatch.setattr(carrying, "_GATE_UP_LAST", [-100])
        monkeypatch.setattr(host_offload, "COUNTS", __import__("collections").Counter())
        entries = []
        with carrying._carry_scope("record", entries):
            for i in range(6):
                backlog = 1 << 40 if i == 2 else 0
                monkeypatch.setattr(host_offload, "link_backlog_bytes", lambda b=backlog: b)
                carrying._keep_gate_up(torch.ones(4, 8), torch.ones(4, 8))
        assert [entries[i][1] is not None for i in range(0, 12, 2)] == expected, slots
        assert host_offload.COUNTS["gate_up_no_link_room"] == 1, slots
        assert host_offload.COUNTS["gate_up_carried"] == sum(expected), slots
        assert host_offload.COUNTS["gate_up_not_its_turn"] == 6 - sum(expected) - 1, slots
    # a turn and link room, but the host budget has none: counted as such
    monkeypatch.setattr(host_offload, "offload_carried", lambda t: None)
    monkeypatch.setattr(carrying, "_GATE_UP_LAST", [-100])
    with carrying._carry_scope("record", []):
        carrying._keep_gate_up(torch.ones(4, 8), torch.ones(4, 8))
    assert host_offload.COUNTS["gate_up_no_host_room"] == 1


def test_a_layer_refused_for_want_of_pinned_buffers_keeps_its_turn(monkeypatch):
    """Until the pool has buffers (the first step), the layers whose turn it is ask for them and the spacing
    holds: the step asks for as many pairs as will be carried, not for one pair a layer."""
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 2)
    monkeypatch.setattr(carrying, "GATE_UP_SLOTS", "spaced")
    monkeypatch.setattr(carrying, "_GATE_UP_SEEN", __import__("itertools").count())
    monkeypatch.setattr(carrying, "_GATE_UP_LAST", [-100])
    monkeypatch.setattr(host_offload, "worth_offloading", lambda t: True)
    monkeypatch.setattr(host_offload, "link_backlog_bytes", lambda: 0)
    monkeypatch.setattr(host_offload, "COUNTS", __import__("collections").Counter())
    asked = []
    monkeypatch.setattr(host_offload, "pinned_buffers_ready", lambda t, n: asked.append(n) and False)
    with carrying._carry_scope("record", []):
        for _ in range(6):
            carrying._keep_gate_up(torch.ones(4, 8), torch.ones(4, 8))
    assert asked == [2, 2, 2]  # offers 0, 2, 4
    assert host_offload.COUNTS["gate_up_no_pinned_buffers"] == 3 and host_offload.COUNTS["gate_up_not_its_turn"] == 3


def test_gate_and_up_too_large_to_carry_ask_for_no_pinned_buffers(monkeypatch):
    """At long context G alone outgrows CARRY_MAX_BYTES: no host memory is pinned for a pair never carried."""
    monkeypatch.setattr(carrying, "CARRY_MAX_BYTES", 64)
    monkeypatch.setattr(carrying, "_GATE_UP_LAST", [-100])
    monkeypatch.setattr(host_offload, "worth_offloading", lambda t: True)
    monkeypatch.setattr(host_offload, "link_backlog_bytes", lambda: 0)
    monkeypatch.setattr(host_offload, "COUNTS", __import__("collections").Counter())
    monkeypatch.setattr(host_offload, "pinned_buffers_ready", lambda t, n: pytest.fail("asked for buffers"))
    entries = []
    with carrying._carry_scope("record", entries):
        carrying._keep_gate_up(torch.ones(4, 8), torch.ones(4, 8))  # 128 bytes each
    assert entries[0][1] is None and entries[1][1] is None
    assert host_offload.COUNTS["gate_up_too_large"] == 1


def test_values_too_large_for_the_host_are_not_carried(monkeypatch):
    monkeypatch.setattr(carrying, "CARRY_MAX_BYTES", 64)
    entries = []
    with carrying._carry_scope("record", entries):
        carrying.carry(torch.ones(16))  # 64 bytes: carried
        carrying.carry(torch.ones(17))  # 68 bytes: recomputed
    assert entries[0][1] is not None and entries[1][1] is None


def test_small_layers_carry_nothing(monkeypatch):
    """Below CARRY_MIN_BYTES of input (the host-bound 1B shape) neither client carries, in both passes."""
    model = _lora_model("llama")
    ref_loss, ref = _loss_and_grads(model)
    monkeypatch.setattr(carrying, "CARRY", True)
    monkeypatch.setattr(carrying, "CARRY_MLP", True)
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 1)
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 1 << 30)
    io, given = _mlp_handed(monkeypatch), _base_matmuls(monkeypatch)
    loss, got = _loss_and_grads(model)
    assert not any(g is not None for g, _ in io) and _counts(given)["handed"] == 0
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
