"""slothnb.kernels: hand-written Triton ops with exact autograd.

This folder is installed as ``slothnb.kernels`` (see pyproject's package-dir);
it never imports transformers. One op per file: Triton kernels, a
``torch.autograd.Function``, a small functional face, and a plain-PyTorch
reference (``*_reference``) that the tests compare against in float64.

Every functional face dispatches: Triton on CUDA tensors (or on CPU tensors
when ``TRITON_INTERPRET=1``, which is how the CPU test-suite runs them), and an
exact PyTorch path otherwise, so CPU training works without the interpreter.
"""
if __name__ == "kernels":
    # Imported as a top-level "kernels": only possible when a source checkout's root is on
    # sys.path (python -m from the repository root). That name belongs to Hugging Face's
    # kernels library, which transformers and bitsandbytes probe for: step aside for it, or
    # fail exactly like a package that is not installed.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or ".") != _root])
    if _spec is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
    else:
        # Not installed: look like what transformers takes for a stray namespace folder (no
        # __file__, no __version__) and export nothing, so probes answer "not available".
        del globals()["__file__"]
        __path__ = []
else:
    from ._utils import use_triton, INTERPRET

__all__ = ["use_triton", "INTERPRET"]
