"""The input embedding kept in host memory (slothnb.models.embedding_offload)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slothnb.errors import ConfigError
from slothnb.models.embedding_offload import HostEmbedding, offload_input_embedding, should_offload
from slothnb.models.lora import get_peft_model
from slothnb.saving.merged import merged_tensors
from tiny_models import tiny_model


def _untied(**kw):
    return tiny_model("llama", seed=0, tie_word_embeddings=False, **kw)


def test_host_embedding_is_a_buffer_with_the_same_state_dict_key_and_lookup():
    model = _untied()
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    table = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    host = offload_input_embedding(model)
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert torch.equal(host(ids), table[ids])
    names = {n for n, _ in model.named_parameters()}
    assert "model.embed_tokens.weight" not in names and "model.embed_tokens.weight" in model.state_dict()
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], table)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_merged_save_still_writes_the_embedding():
    model = get_peft_model(_untied(), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    table = model.get_base_model().get_input_embeddings().weight.detach().clone()
    offload_input_embedding(model.get_base_model())
    tensors = dict(merged_tensors(model, torch.float32))
    assert torch.equal(tensors["model.embed_tokens.weight"], table)


def test_should_offload_only_a_frozen_untied_cuda_table():
    untied, tied = _untied(), tiny_model("llama", seed=0, tie_word_embeddings=True)
    for p in untied.parameters():
        p.requires_grad_(False)
    tied.requires_grad_(False)
    assert not should_offload(untied, 0)  # on the CPU there is nothing to save
    assert not should_offload(tied, 0)
    if torch.cuda.is_available():
        assert should_offload(untied.cuda(), 0) and not should_offload(tied.cuda(), 0)
        assert not should_offload(untied, 1 << 40)  # too small to be worth a sync


def test_a_trained_embedding_is_refused():
    model = _untied()
    with pytest.raises(ValueError, match="trained"):
        offload_input_embedding(model)  # requires_grad is on: never silently freeze it


def test_get_peft_model_option_checks_and_auto_is_off_on_cpu():
    model = get_peft_model(_untied(), r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert model._slothnb_lora["offloaded_embedding"] is False
    assert type(model.get_base_model().get_input_embeddings()) is nn.Embedding
    with pytest.raises(ConfigError, match="offload_embedding"):
        get_peft_model(_untied(), r=4, offload_embedding="yes")
    with pytest.raises(ConfigError, match="CUDA"):
        get_peft_model(_untied(), r=4, offload_embedding=True)


@pytest.mark.gpu
def test_offloaded_embedding_on_gpu_frees_its_copy_and_trains_identically():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 33), device="cuda")

    def run(offload):
        model = _untied(dtype=torch.bfloat16).cuda()
        table_bytes = model.get_input_embeddings().weight.nbytes
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()  # measured around the wrap only: cuBLAS keeps a
        model = get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="slothnb",
                               offload_embedding=offload)  # workspace after the first run's matmuls
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated() - before
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.float().cpu() for p in model.parameters() if p.requires_grad]
        return model, allocated, table_bytes, loss.detach().cpu(), grads  # nothing left on the GPU

    plain, mem_plain, table_bytes, loss_plain, grads_plain = run(False)
    del plain
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    host, mem_host, _, loss_host, grads_host = run(True)
    assert host._slothnb_lora["offloaded_embedding"] is True
    assert host.get_base_model().get_input_embeddings().weight.device.type == "cpu"
    assert host.get_base_model().device.type == "cuda"  # model.device still names the GPU
    assert mem_plain - mem_host >= table_bytes  # the wrap freed the GPU table
    assert torch.equal(loss_plain, loss_host)
    for a, b in zip(grads_plain, grads_host):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gpu_gather_asserts_the_id_range_and_falls_back_when_triton_cannot_address_the_table(monkeypatch):
    """``HostEmbedding._gather_on_gpu`` (on the CPU here: the same asserts and kernel, interpreted)."""
    from slothnb.models import embedding_offload

    emb = nn.Embedding(20, 8)
    host = HostEmbedding(emb)
    ids = torch.tensor([[0, 19, 5]])
    assert torch.equal(host._gather_on_gpu(ids), F.embedding(ids, emb.weight.detach()))
    with pytest.raises(RuntimeError, match="outside the input embedding's 20 rows"):
        host._gather_on_gpu(torch.tensor([3, 20]))

    def refuse(table, ids):
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(embedding_offload, "gather_rows", refuse)
    monkeypatch.setattr(embedding_offload, "GPU_GATHER", True)
    with pytest.warns(UserWarning, match="the host gathers them"):
        assert host._gather_on_gpu(ids) is None
    assert embedding_offload.GPU_GATHER is False


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_gather", [True, False])
def test_host_embedding_lookup_on_gpu_both_ways(gpu_gather, monkeypatch):
    """The kernel's rows equal the host gather's, and the kernel's lookup never syncs the device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from slothnb.models import embedding_offload

    monkeypatch.setattr(embedding_offload, "GPU_GATHER", gpu_gather)
    emb = nn.Embedding(1000, 576).to(torch.bfloat16)
    host = HostEmbedding(emb)
    assert host.weight.is_pinned()
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    torch.cuda.set_sync_debug_mode("error" if gpu_gather else 0)
    try:
        rows = host(ids)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rows.is_cuda and torch.equal(rows, F.embedding(ids, emb.weight.detach().cuda()))
