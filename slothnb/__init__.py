"""slothnb: fast, memory-frugal LoRA/QLoRA fine-tuning on one GPU, made visible in Jupyter.

The public names are imported lazily so that ``import slothnb`` stays cheap and
changes nothing in transformers (models are patched per instance, never globally).
"""
import importlib
import os

__version__ = "0.1.0"

# pyproject installs the top-level kernels/ folder as slothnb.kernels. A source checkout
# run without installing (the GPU machine runs the tree it is sent) gets the same mapping:
# the repository root joins this package's search path, so "slothnb.kernels" is kernels/.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_root, "kernels", "_utils.py")) and _root not in __path__:
    __path__.append(_root)

_EXPORTS = {
    "FastLanguageModel": "slothnb.fast_language_model",
    "stream": "slothnb.models.generation",
    "generate": "slothnb.models.generation",
    "SlothTrainer": "slothnb.training",
    "SlothTrainingArguments": "slothnb.training",
    "train_on_responses_only": "slothnb.training",
    "MemoryRecorder": "slothnb.memory",
    "record_stage": "slothnb.memory",
}

__all__ = list(_EXPORTS) + ["load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slothnb' has no attribute {name!r}")


def load_ipython_extension(ipython):
    """``%load_ext slothnb``: registers the notebook magics (the engine never imports them)."""
    from slothnb.notebook import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from slothnb.notebook import unload_ipython_extension as _unload

    _unload(ipython)
