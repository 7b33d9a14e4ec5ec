"""Test set-up shared by every test.

Without a CUDA GPU the Triton kernels run in Triton's interpreter, which has to
be switched on before triton is first imported, hence here, before any test
module imports slothnb.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SLOTHNB_QUIET_INSTALL", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _unfreeze_python_gc():
    """``for_training`` and the trainer freeze what is alive out of Python's full collections
    (``slothnb.python_gc``); the tests share one process, so each one gives it back afterwards."""
    yield
    import gc

    gc.unfreeze()


@pytest.fixture(autouse=True)
def _release_cuda_memory(request):
    """The GPU tests share one process and run in any order: after each, whatever it left behind is
    collected and the allocator's cached blocks handed back, so the next test's peak-memory assertions
    and headroom are its own."""
    yield
    if HAS_CUDA and "gpu" in request.keywords:
        import gc

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
