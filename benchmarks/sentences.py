"""Build `models/data/sentences.txt`, the fixed sentences MiniLM embeddings are compared on.

    python -m benchmarks.sentences          # rewrites the committed file (deterministic)

Origin: docstrings of the CPython 3.11.7 standard-library sources in the committed corpus
(`models/data/corpus.txt.xz`, PSF License 2.0). From every module, class and function docstring
the first sentence of its first paragraph is kept when it is plain English prose (8-30 words,
letters and simple punctuation, ending in a full stop, no code); duplicates are dropped, and
COUNT sentences are taken evenly spaced over the rest in corpus order.
"""

from __future__ import annotations

import ast
import re

from models.corpus import load_documents
from models.metrics import SENTENCES_PATH

COUNT = 256  # 8 batches of 32
_PROSE = re.compile(r"[A-Z][A-Za-z ,;'()\-]+\.")


def candidates() -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for _, source in load_documents():
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a few files are templates or use syntax newer than this Python
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            first = re.split(r"(?<=\.)\s", para)[0]
            if _PROSE.fullmatch(first) and 8 <= len(first.split()) <= 30 and first not in seen:
                seen.add(first)
                out.append(first)
    return out


def select(count: int = COUNT) -> list[str]:
    pool = candidates()
    if len(pool) < count:
        raise RuntimeError(f"only {len(pool)} candidate sentences, need {count}")
    return [pool[i * len(pool) // count] for i in range(count)]


def main() -> None:
    sentences = select()
    header = [
        "# Evaluation sentences for all-MiniLM-L6-v2 (models.metrics.load_sentences; '#' lines skipped).",
        "# Drawn by `python -m benchmarks.sentences` from docstrings of the CPython 3.11.7 standard-library",
        "# sources in models/data/corpus.txt.xz (PSF License 2.0): first sentences of plain prose, deduplicated,",
        f"# {len(sentences)} taken evenly spaced in corpus order.",
    ]
    SENTENCES_PATH.write_text("\n".join(header + sentences) + "\n", encoding="utf-8")
    print(f"wrote {len(sentences)} sentences to {SENTENCES_PATH}")


if __name__ == "__main__":
    main()
