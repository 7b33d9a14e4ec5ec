"""The one exception family slothnb raises for bad input.

Every message names the problem and says what to do about it. Subclasses also
derive from the built-in exception a caller would naturally catch.
"""


class SlothError(Exception):
    """Base class: bad input or an environment slothnb cannot work in."""


class ModelNotFoundError(SlothError, FileNotFoundError):
    """A model path or name that resolves to nothing (locally or on the hub)."""


class ConfigError(SlothError, ValueError):
    """An option out of range or inconsistent with the model (r <= 0, unknown target module...)."""


class DatasetError(SlothError, ValueError):
    """A dataset that cannot be trained on (missing field, empty, every label masked...)."""


class HardwareError(SlothError, RuntimeError):
    """The machine cannot do what was asked (4-bit without bitsandbytes/CUDA, bf16 on an old GPU, OOM)."""


class TrainingStopped(SlothError, RuntimeError):
    """Training was stopped by a guard (loss exactly 0 or NaN); the last checkpoint is kept."""
