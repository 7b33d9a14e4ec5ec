"""The trainable adapters in the compute dtype: cast once a model pass, packed so that one launch casts all.

Under bf16 autocast the fused LoRA ops (``kernels/lora.py``) need 16-bit copies of fp32 adapters. A
copy is made once per model pass (``begin_pass``) and reused by the forward, its checkpoint
recomputes and the backward (``_cast``). Adapters packed into one flat tensor (``pack_adapters``) are
cast together in one launch, and projections that share an input read their A matrices side by side
as one view (``_stacked``).
"""
import os
import weakref

import torch

_CASTS: dict = {}  # id(param) -> (weakref(param), pass, version, dtype, cast copy)
_PASS = 0  # bumped by begin_pass(); 0 = no model pass announced, so nothing is cached


def begin_pass() -> None:
    """Announce a new model forward pass: cast copies of the adapters are made afresh.

    The patched model calls this at the top of every forward, so a copy lives for one forward,
    its checkpoint recomputes and its backward, and never across an optimizer step (a fused
    AdamW updates parameters in place without bumping their ``_version``).
    """
    global _PASS
    _PASS += 1


# ``torch.cuda.is_current_stream_capturing`` without its Python wrapper (called for every cast).
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, cached for the current model pass (see ``begin_pass``).

    fp32 A/B under bf16 autocast would otherwise be cast (one launch each) by every forward, every
    checkpoint recompute and every backward; with the cache each adapter is cast once per step.
    The copy is exactly ``t.to(dtype)``; it holds r x (in + out) 16-bit numbers per projection.
    """
    if t.dtype == dtype:
        return t
    if _PASS == 0:
        return t.to(dtype)
    # A CUDA graph (slothnb.models.layer_graphs) must record the cast itself: a cached copy made
    # outside it would be read at every replay after this pass has dropped it.
    cached = not (t.is_cuda and _capturing())
    key = id(t)
    hit = _CASTS.get(key) if cached else None
    version = t._version
    if hit is not None and hit[0]() is t and hit[1:4] == (_PASS, version, dtype):
        return hit[4]
    copy = _packed_cast(t, dtype) if cached else None
    if copy is None:
        copy = t.detach().to(dtype) if t.requires_grad and torch.is_grad_enabled() else t.to(dtype)
    if cached:
        _CASTS[key] = (weakref.ref(t, lambda _, k=key: _CASTS.pop(k, None)), _PASS, version, dtype, copy)
    return copy


class _Pack:
    """Where ``pack_adapters`` put a group of adapters: one storage (by address and size), their dtype,
    and this pass's cast of all of them. No reference to the storage is kept: if the adapters move
    (``model.to(...)``) the old one is freed, and the address check sends them down the plain path."""

    __slots__ = ("ptr", "nbytes", "numel", "dtype", "members", "cast")

    def __init__(self, flat: torch.Tensor):
        self.ptr, self.nbytes = flat.untyped_storage().data_ptr(), flat.untyped_storage().nbytes()
        self.numel, self.dtype = flat.numel(), flat.dtype
        self.members = []  # weakrefs to the parameters
        self.cast = None  # (pass, dtype, the whole group in dtype, each member's _version when cast)

    def cast_for_pass(self, storage, dtype):
        """(the group in ``dtype``, the members' versions then): made by this pass's first request."""
        if self.cast is None or self.cast[:2] != (_PASS, dtype):
            flat = torch.empty(0, dtype=self.dtype, device=storage.device).set_(storage, 0, (self.numel,))
            versions = [p._version if p is not None else None for p in (m() for m in self.members)]
            self.cast = (_PASS, dtype, flat.to(dtype), versions)
        return self.cast[2], self.cast[3]


_PACKS: dict = {}  # id(param) -> (weakref(param), _Pack, offset in the pack, index among its members)


def pack_adapters(params) -> int:
    """Store ``params`` as views of one flat tensor per (device, dtype); returns how many were packed.

    Why: under bf16 autocast every fp32 adapter is cast once per pass (``_cast``), one launch each:
    224 launches a step for a 1B Llama, 448 for an 8B, on a host that sets the 1B step's pace. Packed,
    the first cast of a pass casts the whole group in one launch and the others are views of it (same
    values, same bits). The parameters stay the same objects (``p.data`` is re-pointed), so optimizers,
    state dicts and peft's saving work as before; non-contiguous or non-floating ones are left alone.
    ``SLOTHNB_PACK_ADAPTERS=0`` leaves all of them alone (benchmarks).
    """
    if os.environ.get("SLOTHNB_PACK_ADAPTERS", "1") == "0":
        return 0
    groups: dict = {}
    for p in params:
        if p.is_floating_point() and p.is_contiguous() and p.numel():
            groups.setdefault((p.device, p.dtype), {})[id(p)] = p  # by id: each parameter once
    packed = 0
    with torch.no_grad():
        for (device, dtype), members in groups.items():
            members = list(members.values())
            flat = torch.empty(sum(p.numel() for p in members), dtype=dtype, device=device)
            pack, offset = _Pack(flat), 0
            for i, p in enumerate(members):
                n = p.numel()
                flat[offset:offset + n].copy_(p.reshape(-1))
                p.data = flat[offset:offset + n].view(p.shape)
                ref = weakref.ref(p, lambda _, k=id(p): _PACKS.pop(k, None))
                pack.members.append(ref)
                _PACKS[id(p)] = (ref, pack, offset, i)
                offset += n
            packed += len(members)
    return packed


def _packed_cast(t: torch.Tensor, dtype: torch.dtype):
    """``t`` in ``dtype`` as a view of its pack's cast for this pass, or None when ``t`` is not packed
    (or no longer lives where ``pack_adapters`` put it)."""
    entry = _PACKS.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    _, pack, offset, index = entry
    storage = t.untyped_storage()
    if (storage.data_ptr() != pack.ptr or storage.nbytes() != pack.nbytes or t.dtype != pack.dtype
            or t.storage_offset() != offset or not t.is_contiguous()):
        return None
    cast, versions = pack.cast_for_pass(storage, dtype)
    if versions[index] != t._version:  # changed in place since the group was cast
        return None
    return cast[offset:offset + t.numel()].view(t.shape)


def _stacked(As) -> torch.Tensor:
    """``torch.cat(As)`` (adapters of one input, ``[r_j, in]`` each), as a view when they already lie
    one after another in memory (casts of adapters that ``pack_adapters`` placed side by side)."""
    if len(As) == 1:
        return As[0]
    first, end, storage = As[0], As[0].data_ptr(), As[0].untyped_storage().data_ptr()
    for A in As:
        if (A.data_ptr() != end or A.untyped_storage().data_ptr() != storage or not A.is_contiguous()
                or A.shape[1:] != first.shape[1:] or A.dtype != first.dtype):
            return torch.cat(As)
        end += A.numel() * A.element_size()
    return first.as_strided((sum(A.shape[0] for A in As), *first.shape[1:]), first.stride())
