"""patch_model: patched models give transformers' numbers (logits, loss, LoRA gradients, generate).

Every architecture is built tiny and random (fp32, CPU; the kernels run in Triton's interpreter),
patched on a deep copy, and compared against the untouched original (tolerances ~1e-5).
"""
import copy
import logging

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from slothnb.models.patching import is_patched, patch_model, unpatch_model
from tiny_models import VOCAB_SIZE, tiny_model

# Overrides on tiny_models' configs that make every feature bite at seq <= 14: sliding windows
# shorter than the sequence, soft-caps small enough to change the numbers.
OVERRIDES = {
    "llama": {}, "llama-eager": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "phi3": {},
    "mistral": dict(sliding_window=5),
    "phi3-partial": dict(partial_rotary_factor=0.5),  # Phi-4-mini style: RoPE on part of each head
    "gemma2": dict(sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
}
ARCHS = list(OVERRIDES)
MODELS = [a for a in ARCHS if "-" not in a]  # the variants matter where gradients flow
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
LORA_TARGETS = {"phi3": PHI3_TARGETS, "phi3-partial": PHI3_TARGETS}
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD = 3  # tiny_tokenizer's <|pad|>
TOL = dict(rtol=1e-4, atol=1e-5)


def build(arch, seed=0, **overrides):
    model = tiny_model(arch.split("-")[0], seed=seed, **OVERRIDES[arch], **overrides)
    if arch.endswith("-eager"):
        model.set_attn_implementation("eager")
    torch.manual_seed(seed)
    with torch.no_grad():  # weights big enough that every term moves the logits
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if arch.startswith("gemma") else 1.0))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def pair(arch, **overrides):
    ref = build(arch, **overrides)
    patched = copy.deepcopy(ref)
    assert patch_model(patched)
    return ref, patched


def batch(seq=12, pad_left=True, train_pad_rows=True):
    """ids, mask, labels for 2 rows, row 0 padded. With left padding, the last pad position predicts
    the first real token: HF trains that fully-masked query row, and its gradient is whatever the
    attention kernel makes of a row with nothing to attend to (eager: uniform, SDPA: zeros, SDPA with
    a float mask: its own). ``train_pad_rows=False`` leaves that label out, as a sane collator does."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, VOCAB_SIZE, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_left:
        mask[0, :3] = 0
    else:
        mask[0, -4:] = 0
    ids[mask == 0] = PAD
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :2] = -100  # prompt tokens not trained
    if pad_left and not train_pad_rows:
        labels[0, 3] = -100
    return ids, mask, labels


def add_lora(model, arch, **extra):
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=LORA_TARGETS.get(arch, ALL_SEVEN), **extra)
    torch.manual_seed(3)
    return get_peft_model(model, cfg)


def trained_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", MODELS)
def test_eval_logits_and_loss_match(arch):
    ref, patched = pair(arch)
    ids, mask, labels = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, labels=labels)
        got = patched(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()  # padded query rows are garbage in both; compare the real tokens
    torch.testing.assert_close(got.logits[keep], want.logits[keep], **TOL)
    torch.testing.assert_close(got.loss, want.loss, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gradients_match_with_padding(arch):
    ref, patched = pair(arch)
    ref, patched = add_lora(ref, arch), add_lora(patched, arch)  # peft wraps after patching
    ref.train(), patched.train()
    # eager masks are additive floats: SDPA's backward through fully masked rows is not eager's
    ids, mask, labels = batch(pad_left=arch != "qwen3", train_pad_rows=arch != "llama-eager")
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits is None, "training with labels must not build the [B, S, V] logits"
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    want.loss.backward(), got.loss.backward()
    g_ref, g_got = trained_grads(ref), trained_grads(patched)
    assert g_ref.keys() == g_got.keys() and len(g_ref) == 2 * 2 * len(LORA_TARGETS.get(arch, ALL_SEVEN))
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_sequences_and_num_items_in_batch(arch):
    ref, patched = pair(arch)
    ref = add_lora(ref, arch)
    patched = add_lora(patched, arch)
    ref.train(), patched.train()
    ids = torch.randint(8, VOCAB_SIZE, (1, 14), generator=torch.Generator().manual_seed(2))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5]])  # three packed documents
    labels = ids.clone()
    labels[0, [0, 5, 8]] = -100
    n = torch.tensor(37)  # items of the whole accumulated batch, not of this micro-batch
    want = ref(input_ids=ids, position_ids=position_ids, labels=labels, num_items_in_batch=n)
    got = patched(input_ids=ids, position_ids=position_ids, labels=labels, num_items_in_batch=n)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    want.loss.backward(), got.loss.backward()
    g_ref, g_got = trained_grads(ref), trained_grads(patched)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", MODELS)
def test_embed_tokens_and_lm_head_trained(arch):
    ref, patched = pair(arch, tie_word_embeddings=False)
    ref = add_lora(ref, arch, modules_to_save=["embed_tokens", "lm_head"])
    patched = add_lora(patched, arch, modules_to_save=["embed_tokens", "lm_head"])
    ref.train(), patched.train()
    ids, mask, labels = batch(pad_left=False)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    want.loss.backward(), got.loss.backward()
    g_ref, g_got = trained_grads(ref), trained_grads(patched)
    assert any("lm_head" in n for n in g_ref) and any("embed_tokens" in n for n in g_ref)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["gemma", "phi3"])
def test_lora_on_lm_head_takes_the_generic_loss(arch):
    targets = LORA_TARGETS.get(arch, ALL_SEVEN) + ["lm_head"]
    ref, patched = pair(arch, tie_word_embeddings=False)
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=targets)
    torch.manual_seed(3)
    ref = get_peft_model(ref, LoraConfig(**cfg))
    torch.manual_seed(3)
    patched = get_peft_model(patched, LoraConfig(**cfg))
    ref.train(), patched.train()
    ids, mask, labels = batch()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    want.loss.backward(), got.loss.backward()
    g_ref, g_got = trained_grads(ref), trained_grads(patched)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_lora_dropout_takes_the_generic_path_and_still_matches():
    ref, patched = pair("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, target_modules=ALL_SEVEN)
    torch.manual_seed(3)
    ref = get_peft_model(ref, cfg)
    torch.manual_seed(3)
    patched = get_peft_model(patched, copy.deepcopy(cfg))
    ref.train(), patched.train()
    ids, mask, labels = batch()
    torch.manual_seed(5)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.manual_seed(5)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("arch", MODELS)
def test_greedy_generate_is_identical(arch):
    ref, patched = pair(arch)
    ids, mask, _ = batch(seq=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    want = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    got = patched.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_patching_is_per_instance_and_reversible(caplog):
    ref, patched = pair("llama")
    other = copy.deepcopy(ref)
    assert is_patched(patched) and not is_patched(other)
    cls = type(patched.model.layers[0].self_attn)
    assert "forward" not in cls.__dict__ or cls.forward is not patched.model.layers[0].self_attn.forward
    assert "forward" not in other.model.layers[0].self_attn.__dict__
    assert "forward" not in other.__dict__
    ids, mask, labels = batch()
    ref.train(), other.train()
    assert other(input_ids=ids, attention_mask=mask, labels=labels).logits is not None  # HF's forward
    unpatch_model(patched)
    assert not is_patched(patched) and "forward" not in patched.model.layers[0].mlp.__dict__
    patched.train()
    assert patched(input_ids=ids, attention_mask=mask, labels=labels).logits is not None


def test_return_logits_flag_and_tuple_output():
    ref, patched = pair("llama")
    patched.train()
    ids, mask, labels = batch()
    patched._slothnb_return_logits = True
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    want = ref.train()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, want, **TOL)
    out.loss.backward()
    torch.testing.assert_close(out.logits, want, **TOL)  # the caller's logits survive the backward
    loss, logits = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)[:2]
    torch.testing.assert_close(loss, out.loss, **TOL)


def test_unsupported_architecture_stays_unpatched_with_a_warning(caplog):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    with caplog.at_level(logging.WARNING, logger="slothnb.models.patching"):
        assert patch_model(model) is False
    assert "gpt2" in caplog.text and "unpatched" in caplog.text
    assert not any("forward" in m.__dict__ for m in model.modules())


def _q_proj(model):
    return model.get_base_model().model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("extra, fusable", [
    (dict(), True),
    (dict(lora_dropout=0.1), False),
    (dict(use_dora=True), False),
])
def test_fusable_adapter_only_for_plain_lora(extra, fusable):
    from slothnb.models.lora_fusion import fusable_adapter, linear_weight

    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_SEVEN)
    kw.update(extra)
    model = get_peft_model(build("llama"), LoraConfig(**kw))
    q = _q_proj(model)
    assert (fusable_adapter(q) == "default") is fusable
    assert fusable_adapter(model.get_base_model().lm_head) is None  # not a LoRA layer
    assert linear_weight(model.get_base_model().lm_head)[0] is model.get_base_model().lm_head.weight
    if fusable:
        with model.disable_adapter():
            assert fusable_adapter(q) is None
        q.merge()
        assert fusable_adapter(q) is None


def test_fused_lora_kernels_are_used_when_fusable(monkeypatch):
    from slothnb.models.arch import _ops

    calls = []
    for name in ("lora_qkv", "lora_linear", "lora_mlp"):
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    ref, patched = pair("llama")
    patched = add_lora(patched, "llama")
    ids, mask, labels = batch()
    patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert sorted(set(calls)) == ["lora_linear", "lora_mlp", "lora_qkv"] and len(calls) == 6


def test_gradient_checkpointing_gives_the_same_gradients():
    ref, patched = pair("llama")
    ref, patched = add_lora(ref, "llama"), add_lora(patched, "llama")
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.train(), patched.train()
    ids, mask, labels = batch(pad_left=False)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    want.backward(), got.backward()
    g_ref, g_got = trained_grads(ref), trained_grads(patched)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_patch_after_get_peft_model_and_twice():
    ref = add_lora(build("mistral"), "mistral")
    patched = copy.deepcopy(ref)
    assert patch_model(patched) and patch_model(patched) and is_patched(patched)
    ref.train(), patched.train()
    ids, mask, labels = batch(pad_left=False)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, **TOL)
    want.backward(), got.backward()
    g_ref, g_got = trained_grads(ref), trained_grads(patched)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_fusion_lookup_is_cached_and_invalidated():
    """lora_weights answers from a per-module cache, recomputed when the adapter state changes."""
    from slothnb.models import lora_fusion

    model = add_lora(build("llama", num_hidden_layers=1), "llama")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    first = lora_fusion.lora_weights(q)
    assert first is not None and lora_fusion.lora_weights(q) is first  # cached: the same bundle
    q.scaling["default"] = 5.0
    rescaled = lora_fusion.lora_weights(q)
    assert rescaled is not first and rescaled[0].scale == 5.0
    q.merge()
    assert lora_fusion.lora_weights(q) is None  # merged: run the module
    q.unmerge()
    assert lora_fusion.lora_weights(q)[0].A is q.lora_A["default"].weight
    with model.disable_adapter():
        assert lora_fusion.lora_weights(q) is None
    q.base_layer.weight.requires_grad_(True)
    assert lora_fusion.lora_weights(q) is None


def test_fused_adamw_steps_reach_the_fused_forward():
    """Under 16-bit autocast the fused path casts the fp32 adapters; a fused AdamW (which updates in
    place without bumping ``_version``) must still change what the next forward computes."""
    model = get_peft_model(tiny_model("llama", seed=0), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], init_lora_weights=False))
    assert patch_model(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    ids = torch.randint(0, VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert len(set(losses)) == 3 and losses[-1] < losses[0], losses
