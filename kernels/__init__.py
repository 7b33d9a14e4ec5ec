"""slothnb.kernels: hand-written Triton ops with exact autograd.

This folder is installed as ``slothnb.kernels`` (see pyproject's package-dir);
it never imports transformers. One op per file: Triton kernels, a
``torch.autograd.Function``, a small functional face, and a plain-PyTorch
reference (``*_reference``) that the tests compare against in float64.

Every functional face dispatches: Triton on CUDA tensors (or on CPU tensors
when ``TRITON_INTERPRET=1``, which is how the CPU test-suite runs them), and an
exact PyTorch path otherwise, so CPU training works without the interpreter.
"""
from ._utils import use_triton, INTERPRET

__all__ = ["use_triton", "INTERPRET"]
