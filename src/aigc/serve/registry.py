"""The model registry: which run directories are served, under which id and version, and which are
loaded. Models load lazily on first use into an LRU bounded by a memory budget; a model in use by a
request is never unloaded under it (the request holds its own reference).

A modality plugs in with a loader in ``LOADERS`` (a literal dict, greppable) and a ``kind`` test in
``aigc.run.detect_kind``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from aigc.errors import UserError
from aigc.run import IMAGE, MUSIC, TEXT, detect_kind, fingerprint, require_kind

log = logging.getLogger(__name__)

ECHO = "echo"  # a stub text engine for gateway tests and benchmarks


@dataclass
class ModelEntry:
    id: str
    kind: str  # text | image | music | echo
    path: Path | None
    version: str
    created: int
    size_bytes: int
    owned_by: str = "aigc"
    info: dict = field(default_factory=dict)


def entry_for(run: Path, model_id: str | None = None) -> ModelEntry:
    run = Path(run)
    kind = require_kind(run)
    fp = fingerprint(run)
    return ModelEntry(model_id or run.name, kind, run, fp.version, fp.created, fp.size_bytes)


class Registry:
    def __init__(self, entries: list[ModelEntry], memory_budget_mb: int = 4096, max_batch: int = 32, context: int = 1024):
        ids = [e.id for e in entries]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise UserError(f"two models share the id {sorted(dup)[0]!r}: pass them as NAME=PATH")
        self.entries = {e.id: e for e in entries}
        self.budget = memory_budget_mb * 2**20
        self.max_batch, self.context = max_batch, context
        self.loaded: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()
        self.loading: dict[str, threading.Lock] = {}

    @classmethod
    def from_paths(cls, paths: list[str], models_dir: Path | None = None, echo: list[str] | None = None, **kw) -> Registry:
        entries = []
        if models_dir is not None:
            if not Path(models_dir).is_dir():
                raise UserError(f"models folder not found: {models_dir}")
            entries += [entry_for(p) for p in sorted(Path(models_dir).iterdir()) if p.is_dir() and detect_kind(p)]
        for spec in paths:
            name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
            if not Path(path).exists():
                raise UserError(f"run directory not found: {path}")
            entries.append(entry_for(Path(path), name or None))
        for name in echo or []:
            entries.append(ModelEntry(name, ECHO, None, "echo", int(time.time()), 0, info={"note": "echoes the prompt; for gateway tests"}))
        if not entries:
            raise UserError("nothing to serve: pass run directories, --models-dir or --echo-model")
        return cls(entries, **kw)

    def get(self, model_id: str) -> ModelEntry:
        entry = self.entries.get(model_id)
        if entry is None:
            raise KeyError(model_id)
        return entry

    def acquire(self, model_id: str):
        """The loaded model (loading it, and evicting others past the budget, if needed). Blocking: call off the event loop."""
        entry = self.get(model_id)
        with self.lock:
            if model_id in self.loaded:
                self.loaded.move_to_end(model_id)
                return self.loaded[model_id]
            gate = self.loading.setdefault(model_id, threading.Lock())
        with gate:  # one load per model even when many requests arrive at once
            with self.lock:
                if model_id in self.loaded:
                    return self.loaded[model_id]
            t0 = time.perf_counter()
            handle = LOADERS[entry.kind](entry, self)
            log.info("loaded model", extra={"model": model_id, "seconds": round(time.perf_counter() - t0, 3)})
            with self.lock:
                self.loaded[model_id] = handle
                self._evict()
            return handle

    def resident_bytes(self) -> int:
        return sum(self.entries[m].size_bytes * 2 for m in self.loaded)  # weights + working memory, roughly

    def _evict(self) -> None:
        while len(self.loaded) > 1 and self.resident_bytes() > self.budget:
            victim, handle = self.loaded.popitem(last=False)
            log.info("evicted model", extra={"model": victim})
            close = getattr(handle, "close", None)
            if close:
                threading.Thread(target=close, daemon=True).start()  # finishes its in-flight sequences first

    def close(self) -> None:
        with self.lock:
            handles = list(self.loaded.values())
            self.loaded.clear()
        for h in handles:
            close = getattr(h, "close", None)
            if close:
                close()


class LockedPipeline:
    """An image or music pipeline with a lock: sampling is compute-bound, requests take turns."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.lock = threading.Lock()

    def generate(self, **kw):
        with self.lock:
            return self.pipeline.generate(**kw)


def _load_text(entry: ModelEntry, reg: Registry):
    from aigc.generate.text import TextGenerator
    from aigc.serve.batching import SerialTextEngine, TextEngine

    gen = TextGenerator.from_path(entry.path)
    if gen.fast:
        return TextEngine(gen, max_batch=reg.max_batch, context=reg.context, name=entry.id)
    return SerialTextEngine(gen, name=entry.id)


def _load_image(entry: ModelEntry, reg: Registry):
    from aigc.generate.image import ImagePipeline

    return LockedPipeline(ImagePipeline.from_run(entry.path))


def _load_music(entry: ModelEntry, reg: Registry):
    from aigc.generate.music import MusicPipeline

    return LockedPipeline(MusicPipeline.from_run(entry.path))


def _load_echo(entry: ModelEntry, reg: Registry):
    from aigc.serve.batching import EchoEngine

    return EchoEngine()


LOADERS = {TEXT: _load_text, IMAGE: _load_image, MUSIC: _load_music, ECHO: _load_echo}
