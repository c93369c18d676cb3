"""Built-in corpora that need no download, for the demo, the tests and first experiments.

- ``pydoc``: the Python language reference topics shipped with CPython (``pydoc_data.topics``),
  about 465K characters of English, one document per topic.
- ``tang``: 1,200 Tang poems (public domain; a sample of the chinese-poetry collection, MIT licence,
  see ``builtin/tang-sample.LICENSE``), traditional characters, each document ``《title》`` then the poem.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from aigc.errors import UserError

HERE = Path(__file__).parent / "builtin"
NAMES = ("pydoc", "tang")


def load(name: str) -> tuple[list[tuple[str, str, int]], dict]:
    """Return ([(text, source, line)], source record) for built-in corpus ``name``."""
    if name == "pydoc":
        from pydoc_data import topics

        docs = [(topics.topics[key], f"builtin:pydoc/{key}", 1) for key in sorted(topics.topics)]
        raw = json.dumps(topics.topics, sort_keys=True).encode()
    elif name == "tang":
        path = HERE / "tang-sample.jsonl"
        raw = path.read_bytes()
        docs = []
        for i, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            poem = json.loads(line)
            if len(poem["text"]) < 10 or not poem["title"]:  # a few entries of the source are empty fragments
                continue
            docs.append((f"《{poem['title']}》\n{poem['text']}", "builtin:tang", i))
    else:
        raise UserError(f"unknown built-in corpus {name!r} (available: {', '.join(NAMES)})")
    source = {"path": f"builtin:{name}", "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw), "documents": len(docs)}
    return docs, source
