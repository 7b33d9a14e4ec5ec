"""The output head kept in host memory while training (slothnb.models.head_offload)."""
import gc
import weakref

import pytest
import torch
from torch import nn

from slothnb.errors import ConfigError
from slothnb.models.embedding_offload import HostEmbedding
from slothnb.models.head_offload import HostHead, offload_output_head, should_offload
from slothnb.models.lora import get_peft_model
from slothnb.models.patching import patch_model
from slothnb.saving.merged import merged_tensors
from tiny_models import tiny_model


def _model(tied, **kw):
    return tiny_model("llama", seed=0, tie_word_embeddings=tied, **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_host_head_keeps_the_state_dict_and_the_logits(tied):
    model = _model(tied)
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    head = model.get_output_embeddings().weight.detach().clone()
    keys = set(model.state_dict())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    host = offload_output_head(model)
    assert isinstance(model.get_output_embeddings(), HostHead) and torch.equal(host.weight, head)
    assert "lm_head.weight" not in {n for n, _ in model.named_parameters()}
    if tied:  # one table for both: the embedding keeps its key, the head's is dropped as transformers drops it
        emb = model.get_input_embeddings()
        assert isinstance(emb, HostEmbedding) and emb.weight is host.weight
        assert set(model.state_dict()) == keys - {"lm_head.weight"}
    else:
        assert set(model.state_dict()) == keys and torch.equal(model.state_dict()["lm_head.weight"], head)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("tied", [False, True])
def test_merged_save_writes_the_same_tensors(tied):
    model = get_peft_model(_model(tied), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    before = dict(merged_tensors(model, torch.float32))
    offload_output_head(model.get_base_model())
    after = dict(merged_tensors(model, torch.float32))
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name


def test_should_offload_only_a_frozen_bias_free_cuda_head():
    model = _model(False)
    model.requires_grad_(False)
    assert not should_offload(model, 0)  # on the CPU there is nothing to save
    if torch.cuda.is_available():
        model = model.cuda()
        assert should_offload(model, 0) and not should_offload(model, 1 << 40)
        model.get_output_embeddings().weight.requires_grad_(True)
        assert not should_offload(model, 0)  # a trained head stays where the optimizer updates it


def test_a_trained_head_is_refused():
    with pytest.raises(ValueError, match="trained"):
        offload_output_head(_model(False))  # requires_grad is on: never silently freeze it


def test_get_peft_model_option_checks_and_auto_is_off_on_cpu():
    model = get_peft_model(_model(False), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert model._slothnb_lora["offloaded_head"] is False
    assert type(model.get_base_model().get_output_embeddings()) is nn.Linear
    with pytest.raises(ConfigError, match="offload_head"):
        get_peft_model(_model(False), r=4, offload_head="yes")
    with pytest.raises(ConfigError, match="CUDA"):
        get_peft_model(_model(False), r=4, offload_head=True)


@pytest.mark.gpu
@pytest.mark.parametrize("tied", [False, True])
def test_offloaded_head_on_gpu_frees_its_copy_trains_identically_and_generates(tied):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 33), device="cuda")

    def run(offload):
        model = _model(tied, dtype=torch.bfloat16).cuda()
        patch_model(model)  # slothnb's loss: the head is used once, in the forward
        head_bytes = model.get_output_embeddings().weight.nbytes
        gpu_head = weakref.ref(model.get_output_embeddings().weight)
        model = get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="slothnb",
                               offload_head=offload)
        gc.collect()
        freed = gpu_head() is None
        model.train()
        losses, grads = [], None
        for _ in range(2):  # the second forward fetches the head again: nothing is kept between steps
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            after_loss = torch.cuda.memory_allocated()
            loss.backward()
            losses.append(loss.detach().cpu())
            grads = [p.grad.float().cpu() for p in model.parameters() if p.requires_grad]
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().cpu()
        return model, freed, head_bytes, losses, grads, logits, after_loss

    plain, freed_plain, head_bytes, losses_plain, grads_plain, logits_plain, after_loss_plain = run(False)
    del plain
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    host, freed_host, _, losses_host, grads_host, logits_host, after_loss = run(True)
    base = host.get_base_model()
    assert host._slothnb_lora["offloaded_head"] is True and base.device.type == "cuda"
    assert base.get_output_embeddings().weight.device.type == "cpu"
    assert isinstance(base.get_input_embeddings(), HostEmbedding) == tied
    assert freed_host and not freed_plain  # the wrap dropped the GPU head
    for a, b in zip(losses_plain, losses_host):
        assert torch.equal(a, b)
    for a, b in zip(grads_plain, grads_host):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(logits_plain, logits_host)  # eval: the head's GPU copy kept for generation
    head = base.get_output_embeddings()
    assert head._resident is not None and head._pending is None
    host.train()
    assert head._resident is None
    # the loss's copy of the head is freed once the loss is computed, before the backward
    assert after_loss_plain - after_loss >= head_bytes


@pytest.mark.gpu
def test_keep_resident_switched_step_by_step_trains_identically_on_gpu(monkeypatch):
    """The benchmarks' switch: steps that keep one GPU copy and steps that fetch it, in turns."""
    from slothnb.models import head_offload

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 33), device="cuda")

    def run(switch):
        model = _model(False, dtype=torch.bfloat16).cuda()
        patch_model(model)
        model = get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="slothnb", offload_head=True)
        model.train()
        head = model.get_base_model().get_output_embeddings()
        losses = []
        for step in range(4):
            monkeypatch.setattr(head_offload, "KEEP_RESIDENT", switch and step % 2 == 1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach().cpu())
            assert (head._resident is not None) == head_offload.KEEP_RESIDENT and head._pending is None
        return losses

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_auto_offloads_the_head_only_with_cuda_graphs(monkeypatch):
    """Without graphs the backward seldom holds the step's peak, so "auto" leaves the head on the GPU."""
    from slothnb.models import head_offload

    monkeypatch.setattr(head_offload, "MIN_BYTES", 0)  # the tiny head counts as large

    def offloaded(graphs):
        model = get_peft_model(_model(False, dtype=torch.bfloat16).cuda(), r=4, lora_alpha=8,
                               use_gradient_checkpointing="slothnb", cuda_graphs=graphs)
        return model._slothnb_lora["offloaded_head"]

    assert offloaded(False) is False and offloaded(True) is True
