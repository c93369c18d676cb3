"""The run directory, the unit everything passes around: read and written here and nowhere else.

``runs/<name>/`` holds ``config.yaml``, the dataset's manifest, ``metrics.jsonl``, checkpoints,
samples, reports and ``model/``: the model in the format the ecosystem loads. What kind of model a
folder holds is told by the metadata file beside its weights:

- image: ``model/aigc_image.json`` (``ImageMeta``) + weights (see ``generate/image.py``);
- music: ``model/aigc_music.json`` (``MusicMeta``) + a Hugging Face causal LM over event tokens;
- text: ``model/config.json`` (a Hugging Face model) or ``adapter_config.json`` (LoRA);
- sd: ``model/aigc_sd.json`` (``SDMeta``): a pretrained Stable Diffusion-family pipeline on this machine (by path),
  its default parameters, and the LoRA adapter trained on it, if any (``generate/sd.py``).

``model_folder`` accepts a run directory or a bare model folder (an exported or downloaded one).
``fingerprint`` is the model's version as the server, the CLI and the generation log report it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aigc.errors import UserError

TEXT, IMAGE, MUSIC, SD = "text", "image", "music", "sd"
IMAGE_META = "aigc_image.json"
SD_META = "aigc_sd.json"
MUSIC_META = "aigc_music.json"


def model_folder(path: str | Path) -> Path:
    """``path/model`` for a run directory, ``path`` itself for a bare model folder."""
    path = Path(path)
    return path / "model" if (path / "model").is_dir() else path


def detect_kind(path: str | Path) -> str | None:
    """``text``, ``image`` or ``music``; None when the folder holds no trained model."""
    folder = model_folder(path)
    if (folder / SD_META).is_file():
        return SD
    if (folder / IMAGE_META).is_file():
        return IMAGE
    if (folder / MUSIC_META).is_file():  # before TEXT: a music model is also an HF causal LM folder
        return MUSIC
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return TEXT
    return None


def require_kind(path: str | Path) -> str:
    kind = detect_kind(path)
    if kind is None:
        raise UserError(f"{path}: not a trained run (no model/config.json, model/{IMAGE_META}, model/{SD_META} or "
                        f"model/{MUSIC_META})")
    return kind


@dataclass(frozen=True)
class Fingerprint:
    version: str  # 12 hex digits; changes whenever a weight file is rewritten
    created: int  # newest file's mtime (seconds)
    size_bytes: int


def fingerprint(path: str | Path) -> Fingerprint:
    """A content-free fingerprint of the model's files (names, sizes, mtimes): cheap, and it changes on retraining."""
    folder = model_folder(path)
    h, newest, total = hashlib.sha256(), 0, 0
    files = [p for p in folder.rglob("*") if p.is_file()]
    if (folder / SD_META).is_file():  # the pretrained pipeline it runs on is part of the model
        base = Path(json.loads((folder / SD_META).read_text(encoding="utf-8"))["init_path"])
        files += [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(folder) if f.is_relative_to(folder) else f}:{st.st_size}:{st.st_mtime_ns}".encode())
        newest, total = max(newest, int(st.st_mtime)), total + st.st_size
    return Fingerprint(h.hexdigest()[:12], newest, total)


def _read_meta(path: str | Path, name: str, what: str, train: str) -> dict:
    meta = model_folder(path) / name
    if not meta.is_file():
        raise UserError(f"{path}: not {what} run (no model/{name}); train one with `{train}`")
    return json.loads(meta.read_text(encoding="utf-8"))


@dataclass
class ImageMeta:
    """What an image pipeline needs to rebuild its model (``model/aigc_image.json``)."""

    kind: str  # dcgan | vae | ddpm
    size: int
    channels: int
    condition: str  # none | class | caption
    classes: list[str] = field(default_factory=list)
    vocab: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # training captions, the default prompts of a caption model
    config: dict = field(default_factory=dict)  # the model section (DCGANConfig / VAEConfig / DiffusionConfig)
    step: int = 0

    def save(self, folder: Path) -> None:
        (Path(folder) / IMAGE_META).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ImageMeta:
        return cls(**_read_meta(path, IMAGE_META, "an image", "aigc train image"))


@dataclass
class SDMeta:
    """A Stable Diffusion-family run (``model/aigc_sd.json``): the pipeline it runs and its defaults."""

    init_path: str  # the pretrained pipeline: a diffusers folder or a single checkpoint file, on this machine
    family: str  # sd | sdxl
    format: str  # diffusers | single_file
    config: str | None = None  # a single file's architecture config (a diffusers folder)
    width: int = 512
    height: int = 512
    steps: int = 25
    guidance: float = 7.0
    scheduler: str = "dpm++ 2m karras"
    negative_prompt: str = ""
    lora: str | None = None  # the LoRA adapter trained on it (a file in model/), or None
    trigger: str = ""  # the word the adapter was trained to answer (DreamBooth style)
    step: int = 0

    def save(self, folder: Path) -> None:
        (Path(folder) / SD_META).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> SDMeta:
        return cls(**_read_meta(path, SD_META, "a Stable Diffusion", "aigc train image --init.path PIPELINE"))


@dataclass
class MusicMeta:
    """What the event tokens of a music model mean (``model/aigc_music.json``)."""

    format: int = 1
    ticks_per_quarter: int = 4
    voices: list[str] = field(default_factory=list)  # names of voices 0..n-1 (the most common part names)
    time_signature: str = "4/4"  # the most common one in training
    tempo: int = 96
    program: int = 52  # General MIDI program used for rendering (52: choir aahs)
    step: int = 0

    def save(self, folder: Path) -> None:
        (Path(folder) / MUSIC_META).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> MusicMeta:
        return cls(**_read_meta(path, MUSIC_META, "a music", "aigc train music"))
