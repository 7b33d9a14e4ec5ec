"""A frozen output head kept in host memory while training: on the GPU from a forward's start to its loss.

LoRA never trains the output head, yet it is one of the largest tensors on the card: Llama-3.1-8B's
lm_head is 128,256 x 4,096 bf16 = 0.98 GiB; Llama-3.2-1B's, tied to its input embedding, 0.49 GiB of a
~2.3 GiB model. A training step uses it once: the fused linear cross-entropy computes the hidden states'
gradient in its forward and keeps nothing of the head for the backward. So while training the table
lives in pinned host memory. A training forward with labels queues the head's host->device copy on a
stream of its own as it starts (``prefetch``): in a forward the link's host->device direction has nothing
else to carry (the offloaded checkpoints go the other way), and the copy (~9 ms for Llama-3.2-1B's head
at ~55 GB/s) runs beside the layers. The loss waits for it (``take``), and the GPU copy is freed once the loss is
computed. The backward, where the recomputes' temporaries (and the CUDA graphs' pool) sit, then runs
0.5-1 GiB lighter; the forward holds what it held before.

In eval mode (``for_inference``, ``model.eval()``) the head keeps one GPU copy, made at its first use:
generation runs the head every token. ``model.train()`` drops it.

The table is a buffer named ``weight`` (not a parameter), so the state dict keeps the head's key and
``model.device`` stays the GPU. A tied head (the input embedding is the same tensor) shares one pinned
table with a ``HostEmbedding``, which keeps the state-dict key; the head's buffer is then not persistent,
as transformers saves a tied head under the embedding's key only. Not applied to a trained head (full
fine-tuning of lm_head, or LoRA on it), a head with a bias, or off CUDA. ``offload_head=False`` in
``get_peft_model`` keeps it on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slothnb.models import host_offload
from slothnb.models.embedding_offload import HostEmbedding

MIN_BYTES = 256 * 2**20  # smaller heads free too little GPU memory to be worth a copy every step


# Benchmarks (``--ab-switch``): True keeps one GPU copy while training too, as in eval mode, so the cost
# of the per-forward copy can be measured step by step in one process.
KEEP_RESIDENT = False


class HostHead(nn.Module):
    """The ``nn.Linear`` output head over a frozen table in pinned host memory (see the module's docstring)."""

    def __init__(self, linear: nn.Linear, table: torch.Tensor | None = None):
        """``table``: an existing pinned copy of the head's weight to share (a tied input embedding's)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_device = linear.weight.device
        tied = table is not None
        if table is None:
            table = linear.weight.detach().to("cpu")
            if torch.cuda.is_available():
                table = table.pin_memory()
        self.register_buffer("weight", table, persistent=not tied)
        self.training = linear.training
        self._pending = None  # (GPU copy, its ready event): queued by prefetch, handed out by take
        self._resident = None  # eval mode: one GPU copy kept for generation

    def prefetch(self) -> None:
        """Queue the host->device copy on the head's own stream (once; ``take`` hands it out)."""
        dev = self.compute_device
        if (self._pending is not None or self.weight.device == dev or dev.type != "cuda" or KEEP_RESIDENT
                or (self._resident is not None and not self.training)):
            return
        # its own stream, not the offloaded checkpoints': queued there, the copy (9-33 ms) would hold up the
        # layers' device->host offloads behind it, and the forward with them (H100, Llama-3.2-1B with CUDA
        # graphs: 8% slower a step)
        current, side = torch.cuda.current_stream(dev), host_offload._side_stream(dev, "head")
        gpu = torch.empty(self.weight.shape, dtype=self.weight.dtype, device=dev)  # in the compute stream's order
        side.wait_stream(current)  # earlier users of that memory are done with it
        with torch.cuda.stream(side):
            gpu.copy_(self.weight, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        self._pending = (gpu, ready)

    def take(self, device: torch.device) -> torch.Tensor:
        """The head's weight on ``device`` for one use: the table itself where it already lies, the eval
        copy, or the prefetched copy (fetched now if none was), which the current stream waits for.
        The caller drops it after use: that frees it."""
        if self.weight.device == device:
            return self.weight
        if not self.training or KEEP_RESIDENT:
            if self._resident is None or self._resident.device != device:
                self._resident = self.weight.to(device)
            return self._resident
        self._resident = None  # (left by KEEP_RESIDENT)
        if self._pending is None or self._pending[0].device != device:
            self._pending = None
            self.compute_device = device
            self.prefetch()
        gpu, ready = self._pending
        self._pending = None
        torch.cuda.current_stream(device).wait_event(ready)
        return gpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.take(x.device))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self._resident = None  # training fetches the head per forward
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias=False, "
                f"on {self.weight.device.type} (slothnb offloaded)")


def prefetch(head: nn.Module) -> None:
    """At a training forward's start: queue the head's copy if it is a ``HostHead``."""
    if isinstance(head, HostHead):
        head.prefetch()


def _tied(hf_model: nn.Module, head: nn.Module) -> bool:
    emb = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight is not None and weight.data_ptr() == head.weight.data_ptr()


def should_offload(hf_model: nn.Module, min_bytes: int = MIN_BYTES) -> bool:
    """True when the output head is a frozen, bias-free CUDA ``nn.Linear`` of at least ``min_bytes``
    (and, if tied, its input embedding a plain ``nn.Embedding``)."""
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    w = head.weight
    if not w.is_cuda or w.requires_grad or w.numel() * w.element_size() < min_bytes:
        return False
    return not _tied(hf_model, head) or type(hf_model.get_input_embeddings()) is nn.Embedding


def offload_output_head(hf_model: nn.Module) -> HostHead:
    """Replaces the model's output head (and a tied input embedding) by host-memory ones; frees the GPU copy."""
    head = hf_model.get_output_embeddings()
    if head.weight.requires_grad:
        raise ValueError("the output head is trained: it must stay on the GPU (do not offload it)")
    table = None
    if _tied(hf_model, head):
        emb = hf_model.get_input_embeddings()
        host_emb = HostEmbedding(emb)
        hf_model.set_input_embeddings(host_emb)
        emb.weight = None
        table = host_emb.weight
    host = HostHead(head, table)
    hf_model.set_output_embeddings(host)
    head.weight = None  # drop the module's reference so its GPU storage is freed now
    return host
