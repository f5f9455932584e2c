"""The text corpus of the tiny trained LM: a fixed selection of CPython 3.11 standard-library sources.

The corpus is committed as `models/data/corpus.txt.xz` and the file list as `models/data/SOURCES.txt`
(CPython 3.11.7, PSF License 2.0), so training and evaluation read the same bytes everywhere and
never touch the local standard library:

    text = load_corpus()                    # the whole corpus, as committed
    train, heldout = load_split("train"), load_split("heldout")

Format: each file is one document, `FILE_SEP + relative_path + "\\n" + source`, documents concatenated
in `SOURCES.txt` order. `FILE_SEP` is the ASCII file-separator control character, which no selected
source contains. The split is by file: every 20th document (indices 19, 39, ...) is held out.

`build_corpus()` regenerated the committed files once, from the local CPython 3.11.7 standard library;
it is kept to document (and reproduce) how the corpus was made, not to be run at training time.
"""

from __future__ import annotations

import lzma
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS_PATH = DATA_DIR / "corpus.txt.xz"
SOURCES_PATH = DATA_DIR / "SOURCES.txt"

FILE_SEP = "\x1c"  # ASCII "file separator": starts every document
HELDOUT_EVERY = 20  # document i is held out iff i % HELDOUT_EVERY == HELDOUT_EVERY - 1

CPYTHON_VERSION = "3.11.7"

# How the selection was made (build_corpus): every top-level module of the standard library except
# the ones below, then every .py file (outside test directories) of these packages, each group sorted
# by relative path.
EXCLUDED_TOP_LEVEL = (
    "__hello__.py",  # a two-line demo
    "antigravity.py",  # a joke
    "this.py",  # rot13-encoded text, not Python
)
EXCLUDED_PREFIXES = ("_sysconfigdata_",)  # build-machine specific, generated
PACKAGES = (
    "asyncio",
    "collections",
    "concurrent",
    "email",
    "http",
    "importlib",
    "json",
    "logging",
    "tomllib",
    "unittest",
    "urllib",
    "wsgiref",
    "xml",
    "zoneinfo",
)

_HEADER = f"""\
# Corpus of the tiny trained LM (models/corpus.py): CPython {CPYTHON_VERSION} standard-library sources.
#
# Origin: Lib/ of CPython {CPYTHON_VERSION} (https://github.com/python/cpython/tree/v{CPYTHON_VERSION}/Lib),
# as installed in <prefix>/lib/python3.11. Copyright (c) 2001-2023 Python Software Foundation;
# distributed under the PSF License Agreement, version 2 (https://docs.python.org/3/license.html).
# The files are unmodified (UTF-8, LF line endings).
#
# Selection: every top-level module except {", ".join(EXCLUDED_TOP_LEVEL)} and the generated
# _sysconfigdata_*.py, then every .py file outside test directories of the packages
# {", ".join(PACKAGES)}; each group sorted by path.
# corpus.txt.xz holds the files concatenated in the order below, each preceded by the byte 0x1c and
# its path on a line of its own (see models/corpus.py). Every 20th file (0-based index 19, 39, ...)
# is the held-out split; the rest is the training split.
#
# One relative path per line, in corpus order:
"""


def _select(stdlib: Path) -> list[str]:
    top = sorted(
        p.name
        for p in stdlib.glob("*.py")
        if p.name not in EXCLUDED_TOP_LEVEL and not p.name.startswith(EXCLUDED_PREFIXES)
    )
    packaged: list[str] = []
    for pkg in PACKAGES:
        rel = sorted(
            p.relative_to(stdlib).as_posix()
            for p in (stdlib / pkg).rglob("*.py")
            if not any(part.startswith("test") for part in p.relative_to(stdlib).parts)
        )
        packaged.extend(rel)
    return top + packaged


def build_corpus(stdlib: str | Path | None = None) -> tuple[int, int]:
    """Write SOURCES.txt and corpus.txt.xz from a CPython 3.11.7 standard library.

    Returns (raw bytes, compressed bytes). Deterministic: same stdlib in, same bytes out.
    """
    if stdlib is None:
        if sys.version.split()[0] != CPYTHON_VERSION:
            raise RuntimeError(f"build_corpus needs CPython {CPYTHON_VERSION}, running {sys.version.split()[0]}")
        stdlib = sysconfig.get_paths()["stdlib"]
    stdlib = Path(stdlib)
    paths = _select(stdlib)
    docs = []
    for rel in paths:
        text = (stdlib / rel).read_bytes().decode("utf-8")
        if FILE_SEP in text or "\r" in text:
            raise ValueError(f"{rel}: contains the file separator or a carriage return")
        docs.append(f"{FILE_SEP}{rel}\n{text}")
    raw = "".join(docs).encode("utf-8")
    # No container timestamps in .xz, and a fixed preset: byte-identical output for identical input.
    packed = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    SOURCES_PATH.write_text(_HEADER + "".join(p + "\n" for p in paths), encoding="utf-8")
    CORPUS_PATH.write_bytes(packed)
    load_corpus.cache_clear()
    return len(raw), len(packed)


@lru_cache(maxsize=1)
def load_corpus() -> str:
    """The committed corpus, decompressed (about 6.6 MB of text)."""
    return lzma.decompress(CORPUS_PATH.read_bytes()).decode("utf-8")


def load_documents() -> list[tuple[str, str]]:
    """(relative path, source text) for every file of the corpus, in corpus order."""
    docs = []
    for chunk in load_corpus().split(FILE_SEP)[1:]:
        path, _, text = chunk.partition("\n")
        docs.append((path, text))
    return docs


def split_of(index: int) -> str:
    """"heldout" or "train": the split that the document at `index` belongs to."""
    return "heldout" if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"


def load_split(split: str) -> str:
    """The documents of one split ("train" or "heldout"), in the corpus format, in corpus order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return "".join(
        f"{FILE_SEP}{path}\n{text}" for i, (path, text) in enumerate(load_documents()) if split_of(i) == split
    )


if __name__ == "__main__":
    n_raw, n_packed = build_corpus()
    print(f"wrote {CORPUS_PATH} ({n_raw} bytes raw, {n_packed} compressed) and {SOURCES_PATH}")
