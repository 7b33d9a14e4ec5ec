"""Keep Python's full garbage collections out of the training steps.

With a model loaded, the process holds ~600K Python objects (torch, transformers, peft, bitsandbytes and
the model's modules). CPython's cyclic collector walks all of them in every full (generation-2)
collection: 256 and 316 ms on the H100 machines' hosts, inside one step of every ten to twenty of the
Llama-3.1-8B QLoRA benchmark (docs/benchmarks.md, session 14). A step whose host work sets its pace
pays that in full. ``gc.freeze()`` moves every object alive now into a permanent generation that
collections skip; objects made later (each step's temporaries) are collected as before.

The cost: a reference cycle alive at the freeze that dies later is not reclaimed until it is unfrozen.
``FastLanguageModel.from_pretrained`` unfreezes first, so a model loaded earlier and dropped since can
still be collected. ``SLOTHNB_GC_FREEZE=0`` turns freezing off.
"""
from __future__ import annotations

import gc
import os


def enabled() -> bool:
    return os.environ.get("SLOTHNB_GC_FREEZE", "1") != "0"


def freeze_for_training() -> int:
    """Collect once, then freeze what is alive (the model, the libraries); returns how many objects
    are frozen (0 when switched off). Called by ``for_training`` and ``SlothTrainer.train``."""
    if not enabled():
        return 0
    gc.collect()  # garbage that exists now is freed, not frozen
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Give every frozen object back to the collector (before loading another model)."""
    gc.unfreeze()
