"""Writing outputs so that a crash never leaves half of one, and the prepared-dataset manifest.

- ``atomic_folder(out)``: fill a temp folder beside ``out``, then swap it into place (the old content
  is removed only after the swap); on any error the temp folder goes and ``out`` is untouched.
- ``write_bytes(path, data)``: the same for one file (a temp file, then an atomic rename).
- ``manifest(kind, started, options)`` / ``write_manifest`` / ``read_manifest``: the ``manifest.json``
  every prepared dataset carries (what made it, counts, and the SHA-256 of each file).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from aigc.errors import UserError


def check_writable(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temp folder to fill; moved to ``out`` when the block ends without an error."""
    out = Path(out)
    check_writable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def manifest(kind: str, started: float, options) -> dict:
    """The head every manifest starts with: kind, format, when, how long, the options used."""
    return {"kind": kind, "format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 3), "options": asdict(options)}


def write_manifest(folder: Path, manifest: dict, files: tuple[str, ...]) -> dict:
    """Add the SHA-256 of ``files`` (names in ``folder``) and write ``folder/manifest.json``."""
    manifest["files"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return manifest


def read_manifest(path: str | Path, kind: str) -> dict:
    """The manifest of a prepared ``kind`` dataset, or a clear error naming the command that makes one."""
    p = Path(path)
    manifest_path = p / "manifest.json"
    how = "aigc data prepare" + ("" if kind == "text" else f" --kind {kind}")
    if not manifest_path.is_file():
        noun = "corpus" if kind == "text" else "dataset"
        raise UserError(f"{p}: not a prepared {noun} (no manifest.json); run `{how}` first")
    found = json.loads(manifest_path.read_text(encoding="utf-8"))
    if found.get("kind", "text") != kind:
        raise UserError(f"{p}: a prepared {found.get('kind', 'unknown')} dataset, not a{'n' if kind[0] in 'aeiou' else ''} {kind} one")
    return found
