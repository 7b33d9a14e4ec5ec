"""slothnb.python_gc: for_training freezes what is alive out of Python's full collections;
from_pretrained gives it back; SLOTHNB_GC_FREEZE=0 leaves the collector alone."""
import gc
import weakref

import pytest
from tiny_models import save_tiny_model

from slothnb import FastLanguageModel, python_gc


class Node:
    """A reference cycle: only the cyclic collector frees it."""

    def __init__(self):
        self.me = self


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("gcf") / "m")


def test_for_training_freezes_and_from_pretrained_unfreezes(folder):
    model, _ = FastLanguageModel.from_pretrained(str(folder), patch=False)
    assert gc.get_freeze_count() == 0
    cycle = Node()
    alive = weakref.ref(cycle)
    FastLanguageModel.for_training(model)
    frozen = gc.get_freeze_count()
    assert frozen > 10_000  # the model and the libraries around it
    del cycle
    gc.collect()
    assert alive() is not None  # frozen: a full collection does not walk it
    later = Node()  # made after the freeze: collected as usual
    later_ref = weakref.ref(later)
    del later
    gc.collect()
    assert later_ref() is None
    FastLanguageModel.from_pretrained(str(folder), patch=False)  # a new load unfreezes first
    gc.collect()
    assert alive() is None


def test_switched_off_by_the_environment(folder, monkeypatch):
    monkeypatch.setenv("SLOTHNB_GC_FREEZE", "0")
    model, _ = FastLanguageModel.from_pretrained(str(folder), patch=False)
    FastLanguageModel.for_training(model)
    assert gc.get_freeze_count() == 0 and python_gc.freeze_for_training() == 0


def test_freeze_collects_garbage_first_rather_than_freezing_it():
    cycle = Node()
    alive = weakref.ref(cycle)
    del cycle
    assert python_gc.freeze_for_training() > 0
    python_gc.unfreeze()
    assert alive() is None
