"""Safetensors only: pickle checkpoints (.bin, .pt, .pth, .pkl, .ckpt) can run code when loaded.

Every loader in slothnb goes through `assert_safetensors_only` before reading weights, so a
checkpoint that exists only in pickle form is refused with a message saying how to convert it,
instead of being unpickled.
"""
from pathlib import Path

from slothnb.errors import ConfigError, ModelNotFoundError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_HOW_TO_FIX = (
    "slothnb reads safetensors only, because unpickling a checkpoint can run arbitrary code. "
    "Convert it once in a trusted environment: load it with transformers/peft and call "
    "save_pretrained(dir, safe_serialization=True), or use safetensors.torch.save_file."
)


def assert_safetensors_only(path) -> list[Path]:
    """Return the safetensors weight files at `path` (a file or a folder), or raise.

    A folder holding safetensors next to pickle files is accepted (the safetensors are what gets
    read); a folder whose weights exist only as pickle files, or a pickle file itself, is refused.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"No checkpoint at {str(path)!r}: the path does not exist.")
    if path.is_file():
        if path.suffix == ".safetensors":
            return [path]
        if path.suffix in PICKLE_SUFFIXES:
            raise ConfigError(f"Refusing to load pickle checkpoint {str(path)!r}. {_HOW_TO_FIX}")
        raise ConfigError(f"{str(path)!r} is not a .safetensors file. {_HOW_TO_FIX}")
    weights = sorted(path.glob("*.safetensors"))
    if weights:
        return weights
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(
            f"{str(path)!r} holds only pickle checkpoints ({', '.join(pickles)}). {_HOW_TO_FIX}"
        )
    raise ModelNotFoundError(f"No .safetensors weights in {str(path)!r}.")
