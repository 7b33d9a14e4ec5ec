"""The adapters' thin matmuls (one side of rank r) through cuBLASLt.

A LoRA layer's step makes many products whose one dimension is the adapter rank: ``x A^T``
``[N, r]``, ``dY B`` ``[N, r]``, the gradients ``dY^T (x A^T)`` ``[out, r]`` and ``(dY B)^T x``
``[r, in]``, and ``(x A^T) B^T`` with K = r. An 8B QLoRA step at 2 x 2,048 tokens makes ~700 of them.
torch sends a CUDA matmul to cuBLAS unless told otherwise, and cuBLAS picks split-K kernels for these
shapes that run slower than the ones cuBLASLt picks (H100, torch 2.11: ``x A^T`` at [4,096 x 4,096] x
[4,096 x 16] took 28.3 us of GPU with cuBLAS and 17.3 with cuBLASLt; ``B^T dY^T`` 25.2 and 16.5) and
cost the host more (~5-10 us a call). The large base matmuls stay with cuBLAS (one of them,
``dY W``, ran ~10% slower with cuBLASLt).

torch's choice is a process-wide preference read at every matmul, so ``thin_mm`` sets it for its own
call only and puts back what it found: the user's matmuls, and a user's own preference, are left alone.
``LT = False`` (``SLOTHNB_THIN_MATMUL_LT=0``) leaves the choice to torch (benchmarks); off CUDA
nothing changes.
"""
import os

import torch

_get_backend = getattr(torch._C, "_get_blas_preferred_backend", None)
_set_backend = getattr(torch._C, "_set_blas_preferred_backend", None)
_CUBLASLT = getattr(getattr(torch._C, "_BlasBackend", None), "Cublaslt", None)
_AVAILABLE = None not in (_get_backend, _set_backend, _CUBLASLT) and torch.version.hip is None
# Read at every call, so a benchmark can switch it step by step.
LT = os.environ.get("SLOTHNB_THIN_MATMUL_LT", "1") != "0"


def _mm(a, b, out, out_dtype):
    if out_dtype is not None:
        return torch.mm(a, b, out_dtype=out_dtype)
    if out is not None:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b)


def thin_mm(a: torch.Tensor, b: torch.Tensor, out=None, out_dtype=None) -> torch.Tensor:
    """``a @ b`` (2-D; into ``out``, or in ``out_dtype`` where torch supports it) with cuBLASLt on CUDA.

    Exactly ``torch.mm(a, b, out=out)`` / ``torch.mm(a, b, out_dtype=out_dtype)``: the same errors,
    the same result up to the kernel cuBLASLt picks."""
    if not (LT and _AVAILABLE and a.is_cuda):
        return _mm(a, b, out, out_dtype)
    previous = _get_backend()
    if previous == _CUBLASLT:
        return _mm(a, b, out, out_dtype)
    _set_backend(_CUBLASLT)
    try:
        return _mm(a, b, out, out_dtype)
    finally:
        _set_backend(previous)


__all__ = ["thin_mm"]
