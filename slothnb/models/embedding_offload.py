"""A frozen input embedding kept in host memory: the GPU gets only the rows a batch uses.

LoRA never trains the input embedding, yet on an untied model it is one of the largest frozen
tensors on the card: Llama-3.1-8B's is 128,256 x 4,096 bf16 = 0.98 GiB, a sixth of its whole
QLoRA footprint (the NF4 decoder is ~3.7 GiB). A lookup needs only ``tokens x hidden`` of it
(32 MiB for a 2 x 2,048 batch), so the table lives in pinned host memory and
a GPU kernel reads the rows it needs from there over PCIe (``kernels.row_gather``: no
sync, nothing on the host); ~tokens x hidden bytes over the link per forward (~1.5 ms for 8,192
tokens of Llama-3.1-8B), nothing in backward (the table is frozen, its input is not
differentiable). Numbers are bit-identical: a gather copies the rows exactly.
``SLOTHNB_EMBEDDING_GPU_GATHER=0`` (or a Triton that cannot address the pinned table) takes the
older path: the ids copied to the host (a device sync), the rows gathered there into a pinned
buffer and copied over.

The table is registered as a persistent *buffer* named ``weight``, not a parameter: the state
dict keeps its key (``...embed_tokens.weight``), so saving is unchanged, while transformers'
``model.device`` (the first parameter's device) stays the GPU. ``model.to(device)`` moves the
buffer like any other; on the ids' device the lookup is a plain ``F.embedding``.
Not applied to a tied embedding (it is the output head too), to a trained one, or off CUDA.
"""
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from slothnb.kernels.row_gather import gather_rows

GPU_GATHER = os.environ.get("SLOTHNB_EMBEDDING_GPU_GATHER", "1") != "0"
MIN_BYTES = 256 * 2**20  # smaller tables free too little GPU memory to be worth the link traffic


class HostEmbedding(nn.Module):
    """``nn.Embedding`` lookup over a frozen table held in (pinned) host memory."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        table = embedding.weight.detach().to("cpu")
        if torch.cuda.is_available():
            table = table.pin_memory()
        self.register_buffer("weight", table, persistent=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device == self.weight.device:
            return F.embedding(ids, self.weight, self.padding_idx)
        if GPU_GATHER and ids.is_cuda and self.weight.is_pinned():
            rows = self._gather_on_gpu(ids)
            if rows is not None:
                return rows
        host_ids = ids.to("cpu").reshape(-1)
        rows = torch.empty((host_ids.numel(), self.embedding_dim), dtype=self.weight.dtype, pin_memory=ids.is_cuda)
        torch.index_select(self.weight, 0, host_ids, out=rows)
        # the caching host allocator keeps the pinned block until the copy has run
        return rows.to(ids.device, non_blocking=True).view(*ids.shape, self.embedding_dim)

    def _gather_on_gpu(self, ids: torch.Tensor):
        """The rows read by a GPU kernel from the pinned table, or None (and the host path from now on)
        when this Triton cannot launch on a host pointer."""
        global GPU_GATHER
        # out-of-range ids stop the GPU with a device-side assert, as F.embedding on the GPU does
        torch._assert_async(((ids >= 0) & (ids < self.num_embeddings)).all(),
                            f"token id outside the input embedding's {self.num_embeddings} rows")
        try:
            return gather_rows(self.weight, ids)
        except (RuntimeError, ValueError) as e:  # e.g. "Pointer argument cannot be accessed from Triton"
            GPU_GATHER = False
            warnings.warn(f"slothnb: gathering embedding rows on the GPU failed ({e}); the host gathers them")
            return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on {self.weight.device.type} (slothnb offloaded)"


def should_offload(hf_model: nn.Module, min_bytes: int = MIN_BYTES) -> bool:
    """True when the input embedding is a frozen, untied CUDA ``nn.Embedding`` of at least ``min_bytes``."""
    emb = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    if type(emb) is not nn.Embedding or not emb.weight.is_cuda or emb.weight.requires_grad:
        return False
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    if head_weight is not None and head_weight.data_ptr() == emb.weight.data_ptr():
        return False
    return emb.weight.numel() * emb.weight.element_size() >= min_bytes


def offload_input_embedding(hf_model: nn.Module) -> HostEmbedding:
    """Replaces the model's input embedding by a ``HostEmbedding`` (frees its GPU copy); returns it."""
    emb = hf_model.get_input_embeddings()
    if emb.weight.requires_grad:
        raise ValueError("the input embedding is trained: it must stay on the GPU (do not offload it)")
    host = HostEmbedding(emb)
    hf_model.set_input_embeddings(host)
    emb.weight = None  # drop the module's reference so its GPU storage is freed now
    return host
