"""The English text `pdserve eval` measures perplexity on: one the project did not write.

Lewis Carroll, "Alice's Adventures in Wonderland" (1865, public domain), in the Project
Gutenberg "Millennium Fulcrum Edition 2.9" that the Canterbury compression corpus calls
alice29.txt. PyPI's Brotli source distribution ships it as a test vector
(brotli-1.2.1/tests/testdata/alice29.txt, 152,089 bytes); the text stays in that archive and is
read from it at run time, so the repository carries no copy. Fetch the archive once with

    python -m pip download --no-deps --no-binary :all: Brotli==1.2.1 -d ~/.cache/pdserve/eval-text

(or into $PDSERVE_CACHE/eval-text). `--text FILE` measures any other UTF-8 text file instead.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

SDIST = "brotli-1.2.1.tar.gz"
MEMBER = "brotli-1.2.1/tests/testdata/alice29.txt"
SHA256 = "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"
INSTALL = 'python -m pip download --no-deps --no-binary :all: Brotli==1.2.1 -d "{dir}"'
TITLE = "Lewis Carroll, Alice's Adventures in Wonderland (Project Gutenberg, Canterbury corpus alice29.txt)"


class TextMissing(FileNotFoundError):
    """The evaluation text is not on this machine; the message says how to fetch it."""


@dataclass
class EvalText:
    text: str
    source: str  # where it was read from
    title: str


def cache_dir() -> Path:
    root = Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))
    return root / "eval-text"


def load_text(path: str | None = None) -> EvalText:
    """`path`: any UTF-8 text file; None: alice29.txt from the Brotli sdist in cache_dir()."""
    if path is not None:
        try:
            return EvalText(Path(path).read_text(encoding="utf-8"), str(path), Path(path).name)
        except (OSError, UnicodeDecodeError) as e:
            raise TextMissing(f"cannot read {path}: {e}") from None
    archive = cache_dir() / SDIST
    if not archive.exists():
        raise TextMissing(f"{archive} is missing; fetch it with: {INSTALL.format(dir=cache_dir())}")
    with tarfile.open(archive) as tar:
        try:
            data = tar.extractfile(MEMBER).read()
        except (KeyError, AttributeError):
            raise TextMissing(f"{archive} holds no {MEMBER}") from None
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise TextMissing(f"{archive}:{MEMBER} is not the expected text (sha256 mismatch)")
    return EvalText(normalize(data.decode("ascii")), f"{archive}:{MEMBER}", TITLE)


def normalize(text: str) -> str:
    """Paragraphs unwrapped to one line each, spaces collapsed: the 1991 file is hard-wrapped at
    about 65 columns with a centred title block, and line breaks in mid-sentence are layout, not
    the English the model should be scored on."""
    text = text.replace("\r\n", "\n").replace("\x1a", "")  # the file ends in a DOS end-of-file mark
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip()) + "\n"
