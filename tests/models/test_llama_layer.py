"""A checkpointed Llama-family layer written out (``arch.llama_layer``: its forward, recompute and
backward without autograd) gives the autograd path's loss and gradients bit for bit, and steps aside
wherever it does not apply."""
import pytest
import torch

from checkpoint_checks import checkpointed_lora_model as _lora_model
from checkpoint_checks import spy as _spy
from slothnb.kernels import lora as lora_kernels
from slothnb.kernels import lora_widened
from slothnb.models import carrying, checkpointing, host_offload
from slothnb.models.arch import llama_layer, sdpa_direct
from slothnb.models.patching import unpatch_model

LLAMA_LAYERS = ["llama", "qwen2", "mistral", "gemma"]


@pytest.fixture
def runs(monkeypatch):
    """How many checkpointed layers ran written out: one entry a backward (the recompute's), and the
    forwards in ``runs.forwards``."""
    seen = _Runs()
    real = llama_layer._forward

    def spy(plan, x, mask, recompute, **kw):
        (seen if recompute else seen.forwards).append(1)
        return real(plan, x, mask, recompute, **kw)

    monkeypatch.setattr(llama_layer, "_forward", spy)
    return seen


class _Runs(list):
    def __init__(self):
        super().__init__()
        self.forwards = []

    def clear(self):
        super().clear()
        self.forwards.clear()


def _step(model, accumulate=1, autocast=False, padded=False, device="cpu", seq=16):
    """Loss and every gradient after ``accumulate`` forward + backward passes on fixed ids."""
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    model.zero_grad(set_to_none=True)
    for _ in range(accumulate):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask if padded else None, labels=ids).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def _both_ways(model, monkeypatch, runs, **step):
    """(autograd path, written-out path) results, and how many layers the second one wrote out."""
    runs.clear()
    monkeypatch.setattr(llama_layer, "ENABLED", False)
    ref = _step(model, **step)
    assert not runs
    monkeypatch.setattr(llama_layer, "ENABLED", True)
    got = _step(model, **step)
    return ref, got, len(runs)


@pytest.mark.parametrize("arch", LLAMA_LAYERS)
def test_written_out_backward_matches_autograd_bit_for_bit(arch, monkeypatch, runs):
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)  # the tiny model's layers carry values too
    model = _lora_model(arch, layers=3)
    handed = _spy(monkeypatch, lora_kernels.LoraLinearFunction, 2)
    ref, got, written = _both_ways(model, monkeypatch, runs)
    assert written == 2 and len(runs.forwards) == 2  # every layer but the last is offload-checkpointed
    assert sum(g[0] is not None for g in handed) == 4  # each recompute, both ways, was handed o_proj's output
    _same(ref, got)


def test_each_call_is_planned_once_its_backward_runs_its_forwards_plan(monkeypatch, runs):
    model = _lora_model("llama", layers=3)
    plans = _recording(monkeypatch, llama_layer, "_plan", lambda a, kw: a[0])
    ref, got, written = _both_ways(model, monkeypatch, runs)
    assert written == 2
    _same(ref, got)
    plans.clear()
    _step(model)
    assert len(plans) == 2 and len(runs) == 4  # two checkpointed layers: each planned in its forward only
    plans.clear()
    model.base_model.model.model.layers[0].register_forward_hook(lambda *a: None)
    _step(model)  # a forward that did not apply leaves its backward nothing: that one checks afresh
    assert len(plans) == 3 and len(runs) == 5


def _recording(monkeypatch, owner, name, note):
    """Wrap ``owner.name`` so that each call appends ``note(args, kwargs)`` to the list returned."""
    notes, real = [], getattr(owner, name)

    def spy(*a, **kw):
        notes.append(note(a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, spy)
    return notes


@pytest.fixture
def flash_forwards(monkeypatch):
    """Calls of the direct fused-attention forward: ``["forward" | "recompute", ...]``."""
    return _recording(monkeypatch, sdpa_direct, "forward",
                      lambda a, kw: "recompute" if checkpointing.recomputing() else "forward")


@pytest.mark.parametrize("carry", [True, False])
def test_recompute_skips_the_attention_forward_it_was_handed(carry, monkeypatch, runs, flash_forwards):
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)
    monkeypatch.setattr(carrying, "CARRY_SDPA", carry)
    model = _lora_model("llama", layers=3)
    ref, got, written = _both_ways(model, monkeypatch, runs)
    assert written == 2
    # 3 layers: the last one is not checkpointed (its own module forward, SDPA under autograd)
    assert flash_forwards == ["forward"] * 2 + ["recompute"] * (0 if carry else 2)
    _same(ref, got)


@pytest.mark.parametrize("fused", ["cpu", "0"])
def test_the_second_norm_computes_the_residual_sum(fused, monkeypatch, runs):
    monkeypatch.setattr(llama_layer, "_RESIDUAL_ADD", fused)
    adds = _recording(monkeypatch, llama_layer, "rms_norm_forward", lambda a, kw: kw.get("add") is not None)
    model = _lora_model("qwen2", layers=3).to(torch.bfloat16)
    ref, got, written = _both_ways(model, monkeypatch, runs)
    assert written == 2 and adds.count(True) == (4 if fused == "cpu" else 0)  # 2 layers, forward + recompute
    _same(ref, got)


@pytest.mark.parametrize("written_pass", ["forward", "recompute"])
def test_a_recompute_that_runs_another_way_than_its_forward_reads_only_what_it_asks_for(
        written_pass, monkeypatch, runs):
    """Written-out forward + autograd recompute (or the reverse): the carried values are tagged, so the
    attention state one of them carries is never read as the other's o_proj output or G, U."""
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 1)
    model = _lora_model("llama", layers=3)
    monkeypatch.setattr(llama_layer, "ENABLED", False)
    ref = _step(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(llama_layer, "ENABLED", written_pass == "forward")
    loss = model(input_ids=ids, labels=ids).loss
    monkeypatch.setattr(llama_layer, "ENABLED", written_pass == "recompute")
    loss.backward()
    assert len(runs if written_pass == "recompute" else runs.forwards) == 2 and not (
        runs.forwards if written_pass == "recompute" else runs)
    _same(ref, (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", [
    dict(dtype=torch.bfloat16, padded=True, accumulate=2),  # 16-bit model, padding mask, .grad accumulated
    dict(dtype=torch.float32, autocast=True, input_grads=True),  # fp32 model under bf16 autocast: mixed dtypes
    dict(dtype=torch.bfloat16, autocast=True, input_grads=True, padded=True),
])
def test_dtypes_masks_input_grads_and_accumulation(arch, case, monkeypatch, runs):
    case = dict(case)
    model = _lora_model(arch, layers=3).to(case.pop("dtype"))
    if case.pop("input_grads", False):
        model.enable_input_require_grads()  # the layer inputs need gradients too
    ref, got, written = _both_ways(model, monkeypatch, runs, **case)
    assert written == 2 * case.get("accumulate", 1)
    _same(ref, got)


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma2"])
def test_other_layers_keep_the_autograd_path(arch, monkeypatch, runs):
    model = _lora_model(arch, layers=3)
    ref, got, written = _both_ways(model, monkeypatch, runs)
    assert written == 0
    _same(ref, got)
    has = [hasattr(layer, "_slothnb_written") for layer in model.base_model.model.model.layers]
    assert has == [arch == "qwen3"] * 3  # Qwen3's layer is Llama's; its q/k norms send it back in _plan


def _freeze_one_adapter(model):
    next(p for n, p in model.named_parameters() if "v_proj.lora_A" in n).requires_grad_(False)


def _hook_a_layer(model):
    model.base_model.model.model.layers[0].register_forward_hook(lambda *a: None)


def _unfreeze_a_norm(model):
    model.base_model.model.model.layers[0].input_layernorm.weight.requires_grad_(True)


def _hook_an_adapter(model):
    next(p for n, p in model.named_parameters() if "o_proj.lora_B" in n).register_hook(lambda g: g)


def _chunked_mlp(model, monkeypatch):
    from slothnb.models.arch import common

    monkeypatch.setattr(common, "MLP_CHUNK_TOKENS", 16)  # 32 tokens a call: the MLP runs in chunks


@pytest.mark.parametrize("change", [_freeze_one_adapter, _hook_a_layer, _unfreeze_a_norm, _hook_an_adapter,
                                    _chunked_mlp])
def test_what_it_does_not_cover_runs_through_autograd(change, monkeypatch, runs):
    model = _lora_model("llama", layers=3)
    if change is _chunked_mlp:
        change(model, monkeypatch)
    else:
        change(model)
    ref, got, written = _both_ways(model, monkeypatch, runs)
    # each change but the chunking touches layer 0 only: layer 1 is still written out
    assert written == (0 if change is _chunked_mlp else 1)
    _same(ref, got)


def test_only_the_layer_input_may_need_a_gradient():
    """A call whose other tensor inputs need gradients (e.g. trainable rotary tables) is not covered."""
    layer = object.__new__(torch.nn.Module)
    x, cos = torch.ones(1, 2, 4), torch.ones(1, 2, 4)
    assert llama_layer.backward(layer, (x,), {}, [x, cos], (torch.ones(1, 2, 4),), (True, True)) is None


def test_unpatch_drops_it():
    model = _lora_model("llama", layers=2)
    layers = model.base_model.model.model.layers
    assert all(len(getattr(layer, "_slothnb_written", ())) == 2 for layer in layers)
    unpatch_model(model)
    assert not any(hasattr(layer, "_slothnb_written") for layer in layers)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_backward_on_gpu_matches_autograd(arch, dtype, monkeypatch, runs, flash_forwards):
    """bf16 autocast over an fp32 or a bf16 model, offloaded inputs and every carried value (through
    pinned host memory)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)
    monkeypatch.setattr(carrying, "CARRY_MLP_EVERY", 1)
    monkeypatch.setattr(carrying, "CARRY_SDPA", "1")  # off by default on CUDA (carrying.CARRY_SDPA)
    model = _lora_model(arch, layers=4, device="cuda").to(dtype)
    for _ in range(6):  # the carried values' pinned buffers are pinned in the background, for later passes
        flash_forwards.clear()
        _step(model, autocast=True, device="cuda", seq=128)
        host_offload._POOL.wait_for_pinning()
        if flash_forwards == ["forward"] * 3:  # every layer found free buffers for its attention state
            break
    host_offload.COUNTS.clear()
    flash_forwards.clear()
    ref, got, written = _both_ways(model, monkeypatch, runs, autocast=True, device="cuda", seq=128)
    assert written == 3 and host_offload.COUNTS["gate_up_carried"] == 6
    assert flash_forwards == ["forward"] * 3  # the recomputes were handed the attention's output and lse
    _same(ref, got)


def _qlora_model(tmp_path, device, **config):
    from peft import LoraConfig, get_peft_model

    from slothnb.models.checkpointing import apply_gradient_checkpointing
    from slothnb.models.patching import patch_model
    from tiny_models import nf4_llama

    model = nf4_llama(tmp_path, device=device, **config)
    patch_model(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
    apply_gradient_checkpointing(model, "slothnb")
    model.train()
    return model


@pytest.mark.parametrize("fused_qkv", [False, True])
def test_written_out_qlora_on_cpu_matches_autograd(tmp_path, monkeypatch, runs, flash_forwards, fused_qkv):
    """NF4 bases through bitsandbytes' CPU quantisation and the interpreted kernels: the widened q/k/v
    (also as one matmul, ``FUSED_QKV``) and gate/up matmuls, the norm writing their input, the recompute's
    dequantised weights kept for the backward, the attention state carried, h = x + o in the norm; bit for
    bit the autograd path's."""
    monkeypatch.setattr(lora_widened, "FUSED_QKV", fused_qkv)
    monkeypatch.setattr(carrying, "CARRY_MIN_BYTES", 0)
    assert lora_widened.KEEP_GATE_UP  # on by default: the count of kept weights below includes gate/up
    kept = _recording(monkeypatch, lora_kernels, "_backward", lambda a, kw: kw.get("kept") is not None)
    model = _qlora_model(tmp_path, "cpu", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=3, vocab_size=128)
    ref, got, written = _both_ways(model, monkeypatch, runs, autocast=True)
    assert written == 2 and flash_forwards == ["forward"] * 2
    # written out, each recompute kept q/k/v and (with G, U not carried in one layer of two) gate/up
    assert kept.count(True) == 2 + 1
    _same(ref, got)


@pytest.mark.gpu
def test_written_out_backward_on_gpu_qlora_matches_autograd(tmp_path, monkeypatch, runs):
    """NF4 bases (the widened q/k/v and gate/up matmuls), bf16 autocast, a padded batch."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(lora_widened, "KEEP_GATE_UP", True)
    model = _qlora_model(tmp_path, 0, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=3, vocab_size=512)
    for padded in (True, False):  # a padding mask keeps SDPA; none: its fused kernels called directly
        ref, got, written = _both_ways(model, monkeypatch, runs, autocast=True, padded=padded, device="cuda", seq=256)
        assert written == 2
        _same(ref, got)
