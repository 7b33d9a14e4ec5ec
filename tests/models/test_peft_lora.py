"""get_peft_model: the right parameters train, settings are honoured, bad input is a ConfigError."""
import math

import peft
import pytest
import torch

from slothnb.errors import ConfigError, HardwareError
from slothnb.models import checkpointing as ckpt
from slothnb.models.lora import DEFAULT_TARGETS, get_peft_model, trainable_parameter_names
from tiny_models import save_tiny_model, tiny_model

N_LAYERS = 2  # tiny_model default


def _lora_layers(pm):
    return {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_returns_peft_model_training_exactly_the_adapters():
    pm = get_peft_model(tiny_model("llama"), r=8, use_gradient_checkpointing=False)
    assert isinstance(pm, peft.PeftModel)
    names = trainable_parameter_names(pm)
    assert len(names) == N_LAYERS * len(DEFAULT_TARGETS) * 2
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == set(DEFAULT_TARGETS)
    a = next(m for m in _lora_layers(pm).values())
    assert a.lora_A["default"].weight.shape[0] == 8
    mark = pm._slothnb_lora
    assert mark is pm.get_base_model()._slothnb_lora
    assert mark["r"] == 8 and mark["lora_dropout"] == 0.0 and mark["bias"] == "none" and mark["fusable"]
    assert mark["use_gradient_checkpointing"] is False and mark["scaling"] == 2.0


@pytest.mark.parametrize("rslora,expected", [(False, 32 / 16), (True, 32 / math.sqrt(16))])
def test_scaling_plain_and_rslora(rslora, expected):
    pm = get_peft_model(tiny_model("llama"), r=16, lora_alpha=32, use_rslora=rslora, use_gradient_checkpointing=False)
    scales = [m.scaling["default"] for m in _lora_layers(pm).values()]
    assert len(scales) == N_LAYERS * len(DEFAULT_TARGETS)
    assert all(s == pytest.approx(expected) for s in scales)
    assert pm._slothnb_lora["scaling"] == pytest.approx(expected)


@pytest.mark.parametrize("arch,expected", [
    ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ("gemma2", set(DEFAULT_TARGETS)),
    ("qwen3", set(DEFAULT_TARGETS)),
])
def test_default_targets_follow_the_architecture(arch, expected):
    pm = get_peft_model(tiny_model(arch), use_gradient_checkpointing=False)
    assert set(pm._slothnb_lora["target_modules"]) == expected
    adapted = {n.rsplit(".", 1)[-1] for n in _lora_layers(pm)}
    assert adapted == expected


def _a_weights(pm):
    return [m.lora_A["default"].weight.detach().clone() for m in _lora_layers(pm).values()]


def test_same_seed_same_init_and_caller_rng_untouched():
    model = tiny_model("llama")  # seeds the global RNG itself, so build it first
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a1 = _a_weights(get_peft_model(model, random_state=11, use_gradient_checkpointing=False))
    assert torch.equal(torch.rand(3), expected_next)  # get_peft_model did not consume the caller's RNG
    a2 = _a_weights(get_peft_model(tiny_model("llama"), random_state=11, use_gradient_checkpointing=False))
    a3 = _a_weights(get_peft_model(tiny_model("llama"), random_state=12, use_gradient_checkpointing=False))
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert not any(torch.equal(x, z) for x, z in zip(a1, a3))


def test_embed_tokens_and_lm_head_train_fully_in_model_dtype():
    model = tiny_model("llama", dtype=torch.bfloat16)
    assert not model.config.tie_word_embeddings
    pm = get_peft_model(model, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"],
                        use_gradient_checkpointing=False)
    names = trainable_parameter_names(pm)
    full = [n for n in names if "lora_" not in n]
    assert sorted(full) == sorted(["base_model.model.model.embed_tokens.modules_to_save.default.weight",
                                   "base_model.model.lm_head.modules_to_save.default.weight"])
    assert len(names) - len(full) == N_LAYERS * 2 * 2
    hf = pm.get_base_model()
    for wrapper in (hf.model.embed_tokens, hf.lm_head):
        assert wrapper.modules_to_save["default"].weight.dtype == torch.bfloat16  # no fp32 vocab copies
        assert not wrapper.original_module.weight.requires_grad
    assert pm._slothnb_lora["modules_to_save"] == ["embed_tokens", "lm_head"]


def test_tied_embeddings_stay_tied_while_training():
    pm = get_peft_model(tiny_model("llama", tie_word_embeddings=True), target_modules=["q_proj", "lm_head"],
                        use_gradient_checkpointing=False)
    hf = pm.get_base_model()
    emb = hf.model.embed_tokens.modules_to_save["default"].weight
    head = hf.lm_head.modules_to_save["default"].weight
    assert emb is head and emb.requires_grad and pm._slothnb_lora["tied_embeddings"]
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    before = emb.detach().clone()
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        emb -= 0.5 * emb.grad
    assert not torch.equal(before, emb.detach())
    assert hf.model.embed_tokens.modules_to_save["default"].weight is hf.lm_head.modules_to_save["default"].weight


@pytest.mark.parametrize("kwargs,needle", [
    ({"r": 0}, "r=0"),
    ({"r": -4}, "rank"),
    ({"r": 2.5}, "rank"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"bias": "some"}, "bias='some'"),
    ({"use_gradient_checkpointing": "fast"}, "use_gradient_checkpointing"),
    ({"target_modules": ["q_proj", "qkv_proj"]}, "'qkv_proj'"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"target_modules": ["embed_tokens"]}, "at least one linear"),
    ({"modules_to_save": ["score"]}, "modules_to_save"),
    ({"max_seq_length": 0}, "max_seq_length"),
    ({"not_an_option": 1}, "not_an_option"),
])
def test_bad_input_is_a_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")) as e:
        get_peft_model(tiny_model("llama"), **kwargs)
    if "target_modules" in kwargs and kwargs["target_modules"] == ["q_proj", "qkv_proj"]:
        assert "down_proj" in str(e.value) and "q_proj" in str(e.value)  # lists what exists


def test_wrapping_twice_is_a_config_error():
    pm = get_peft_model(tiny_model("llama"), use_gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="already has LoRA"):
        get_peft_model(pm)


def test_loftq_without_cuda_is_a_hardware_error():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(HardwareError, match="LoftQ"):
        get_peft_model(tiny_model("llama"), loftq_config={"loftq_bits": 4})


def _randomize_b(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero, which would make every lora_A gradient zero
        for m in _lora_layers(pm).values():
            w = m.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)


def _loss_and_lora_grads(pm):
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    pm.train()
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(99)
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", [True, "slothnb"])
def test_checkpointed_lora_with_dropout_matches_no_checkpointing(mode, monkeypatch):
    def build(m):
        pm = get_peft_model(tiny_model("llama"), lora_dropout=0.25, use_gradient_checkpointing=m)
        _randomize_b(pm)
        return pm

    ref_loss, ref = _loss_and_lora_grads(build(False))
    runs = []
    real_run = ckpt._Call.run
    monkeypatch.setattr(ckpt._Call, "run", lambda self, t: runs.append(1) or real_run(self, t))
    pm = build(mode)
    # "slothnb" leaves the last layer's activations in place by default (its backward comes first)
    layers = ckpt.default_offload_layers(N_LAYERS) if mode == "slothnb" else list(range(N_LAYERS))
    assert pm._slothnb_lora["checkpointed_layers"] == layers and not pm._slothnb_lora["fusable"]
    loss, got = _loss_and_lora_grads(pm)
    assert len(runs) == (2 * len(layers) if mode == "slothnb" else 0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert got.keys() == ref.keys() and all(g.abs().sum() > 0 for g in got.values())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_checkpoint_layers_option():
    pm = get_peft_model(tiny_model("llama", num_hidden_layers=3), checkpoint_layers=[2])
    assert [layer.gradient_checkpointing for layer in ckpt.decoder_layers(pm)] == [False, False, True]


def _load_4bit(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_tiny_model("llama", tmp_path / "m", dtype=torch.bfloat16)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map=device, dtype=torch.bfloat16)


def test_4bit_base_trains_adapters_without_fp32_upcast(tmp_path):
    pm = get_peft_model(_load_4bit(tmp_path), r=4)
    hf = pm.get_base_model()
    assert pm._slothnb_lora["quantized_4bit"] and ckpt.is_checkpointing(pm)
    assert hf.model.norm.weight.dtype == torch.bfloat16  # peft's kbit prep would have made these fp32
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert hf.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    names = trainable_parameter_names(pm)
    assert names and all("lora_" in n for n in names)
    _randomize_b(pm)
    loss, grads = _loss_and_lora_grads(pm)
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())


def test_loftq_on_a_4bit_base_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="16-bit base"):
        get_peft_model(_load_4bit(tmp_path), loftq_config={"loftq_bits": 4})


@pytest.mark.gpu
def test_loftq_on_gpu_initialises_both_factors():
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    # lora_alpha == r: peft's LoftQ factors reconstruct the residual at scaling 1
    pm = get_peft_model(model, r=16, lora_alpha=16, loftq_config={"loftq_bits": 4, "loftq_iter": 1},
                        use_gradient_checkpointing=False)
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    assert b.abs().sum() > 0  # LoftQ starts B at the quantisation residual, not at zero
    after = layer.base_layer.weight.detach().float()
    # base + B @ A * scale approximates the original weight better than the quantised-residual base alone
    recon = after + layer.scaling["default"] * (b @ a)
    assert not torch.equal(after, before)  # the base now holds the 4-bit-representable weight
    assert (recon - before).norm() < 0.9 * (after - before).norm()
    assert pm._slothnb_lora["loftq"]


def test_adapters_are_packed_and_train_and_save_as_before(tmp_path):
    """get_peft_model packs the adapters (one storage per dtype, the A's of q/k/v and of gate/up side by
    side): the fused forward then casts them once a pass and reads x [A_q; A_k; A_v]^T from one matmul.
    Loss and gradients are bit-identical to unpacked adapters, and a saved adapter loads back."""
    from slothnb.kernels import adapter_casts as casts
    from slothnb.models.patching import patch_model

    def build(pack):
        model = tiny_model("llama", dtype=torch.bfloat16)
        assert patch_model(model)
        pm = get_peft_model(model, use_gradient_checkpointing=False)
        _randomize_b(pm)
        if not pack:
            for p in pm.parameters():
                p.data = p.data.clone()
        return pm

    packed, plain = build(True), build(False)
    adapters = [p for n, p in packed.named_parameters() if p.requires_grad]
    assert {p.dtype for p in adapters} == {torch.float32}
    assert len({p.untyped_storage().data_ptr() for p in adapters}) == 1
    attn = packed.get_base_model().model.layers[0].self_attn
    As = [getattr(attn, f"{k}_proj").lora_A["default"].weight for k in "qkv"]
    assert all(a.data_ptr() + a.numel() * 4 == b.data_ptr() for a, b in zip(As, As[1:]))
    casts.begin_pass()
    assert casts._stacked([casts._cast(a, torch.bfloat16) for a in As]).data_ptr() == \
        casts._cast(As[0], torch.bfloat16).data_ptr()

    results = []
    for pm in (packed, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_lora_grads(pm))
    (loss, grads), (ref_loss, ref) = results
    assert torch.equal(loss, ref_loss) and grads.keys() == ref.keys()
    assert all(torch.equal(grads[n], ref[n]) for n in ref)

    packed.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama", dtype=torch.bfloat16), tmp_path / "adapter")
    saved = dict(packed.named_parameters())
    for n, p in loaded.named_parameters():
        if ".lora_" in n:
            assert torch.equal(p, saved[n].to(p.dtype)), n
