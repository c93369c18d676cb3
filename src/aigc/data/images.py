"""Image dataset preparation: folders of PNG/JPEG/WebP, or built-in digits and shapes, to arrays.

Input folders: one sub-folder per class (``cats/001.png`` has class ``cats``; images directly in the
root have no class), and optionally ``captions.jsonl`` in the root, one ``{"file": "cats/001.png",
"caption": "..."}`` per line. Every image is decoded, converted to RGB or grayscale (transparent
pixels over white), resized so its shorter side matches and centre-cropped to a square.

Corrupt, zero-byte, truncated or oversized files are skipped, counted and named in the manifest; if
nothing usable is left that is a one-line error, and nothing is written.

Output folder::

    train.npz, val.npz   images (N, H, W, C) uint8, labels (N,) int64 (-1 = no class)
    train.jsonl, val.jsonl one record per image: source, class, caption (+ attributes for shapes)
    manifest.json        options, sources, classes, counts, skipped files, augmentation
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from aigc.data import store
from aigc.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
BUILTIN = ("digits", "shapes")


@dataclass
class ImagePrepareOptions:
    size: int = 32
    mode: Literal["rgb", "gray"] = "rgb"
    hflip: bool = False  # random horizontal flips while training (off for digits and positional captions)
    val_fraction: float = 0.1
    seed: int = 1337
    count: int = 5000  # built-in shapes: how many images to draw
    max_bytes: int = 50_000_000  # larger files are skipped as oversized
    max_pixels: int = 40_000_000  # width x height above this is skipped as oversized (decompression bombs)

    def validate(self) -> None:
        if not 4 <= self.size <= 512 or self.size % 4:
            raise UserError(f"size must be a multiple of 4 between 4 and 512, got {self.size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.count < 1 or self.max_bytes < 1 or self.max_pixels < 1:
            raise UserError("count, max_bytes and max_pixels must be >= 1")


@dataclass
class Item:
    image: np.ndarray  # (H, W, C) uint8
    cls: str | None
    caption: str | None
    source: str
    attributes: dict | None = None


# ---------------------------------------------------------------- decoding

def load_image(data: bytes, opts: ImagePrepareOptions) -> np.ndarray:
    """Decode, convert, resize and centre-crop one file; raises ValueError with the reason if unusable."""
    from PIL import Image

    if not data:
        raise ValueError("empty file")
    if len(data) > opts.max_bytes:
        raise ValueError(f"oversized file ({len(data)} bytes > {opts.max_bytes})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
                if w * h > opts.max_pixels:
                    raise ValueError(f"oversized image ({w}x{h} pixels > {opts.max_pixels})")
                probe.verify()
            img = Image.open(io.BytesIO(data))
            img.load()  # a truncated file fails here ("image file is truncated")
        except ValueError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"oversized image ({e})") from None
        except Exception as e:  # PIL raises many types for bad data: UnidentifiedImageError, OSError, SyntaxError
            raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        backdrop = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(backdrop, img)
    img = img.convert("RGB" if opts.mode == "rgb" else "L")
    return resize_crop(img, opts.size)


def resize_crop(img, size: int) -> np.ndarray:
    """Shorter side to ``size`` (Lanczos), then the centre square: (size, size, C) uint8."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _read_captions(root: Path) -> dict[str, str]:
    path = root / "captions.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or not isinstance(rec.get("caption"), str):
            raise UserError(f"{path}:{n}: each line needs string fields \"file\" and \"caption\"")
        captions[Path(rec["file"]).as_posix()] = rec["caption"].strip()
    return captions


def read_folder(root: Path, opts: ImagePrepareOptions) -> tuple[list[Item], list[dict], dict]:
    """All images under ``root``: (items, skipped [{file, reason}], source record)."""
    if not root.exists():
        raise UserError(f"{root}: no such file or folder")
    if not root.is_dir():
        raise UserError(f"{root}: image input must be a folder (class sub-folders, optional captions.jsonl)")
    captions = _read_captions(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    items, skipped = [], []
    digest = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        try:
            image = load_image(data, opts)
        except ValueError as e:
            skipped.append({"file": str(f), "reason": str(e)})
            continue
        parts = Path(rel).parts
        cls = parts[0] if len(parts) > 1 else None
        items.append(Item(image, cls, captions.get(rel), f"{root.name}/{rel}"))
    unknown = sorted(set(captions) - {f.relative_to(root).as_posix() for f in files})
    if unknown:
        raise UserError(f"{root / 'captions.jsonl'}: captions for files that are not there: {', '.join(unknown[:5])}"
                        + (" ..." if len(unknown) > 5 else ""))
    source = {"path": str(root), "files": len(files), "images": len(items), "skipped": len(skipped),
              "captions": len(captions), "sha256": digest.hexdigest()}
    return items, skipped, source


# ---------------------------------------------------------------- built-in datasets

def builtin_items(name: str, opts: ImagePrepareOptions) -> tuple[list[Item], dict]:
    from PIL import Image

    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
        items = []
        for i, (arr, label) in enumerate(zip(raw, d.target)):
            img = Image.fromarray(arr, mode="L")
            if opts.mode == "rgb":
                img = img.convert("RGB")
            small = img.resize((opts.size, opts.size), Image.Resampling.BICUBIC) if opts.size != 8 else img
            a = np.asarray(small, dtype=np.uint8)
            items.append(Item(a[:, :, None] if a.ndim == 2 else a, str(int(label)), None, f"builtin:digits/{i}"))
        source = {"path": "builtin:digits", "images": len(items), "sha256": hashlib.sha256(raw.tobytes()).hexdigest(),
                  "origin": "scikit-learn load_digits (UCI optical recognition of handwritten digits)"}
        return items, source
    if name == "shapes":
        from aigc.data import shapes

        images, specs = shapes.generate(opts.count, opts.size, seed=opts.seed)
        items = []
        for i, (arr, spec) in enumerate(zip(images, specs)):
            if opts.mode == "gray":
                arr = np.asarray(Image.fromarray(arr).convert("L"))[:, :, None]
            items.append(Item(arr, spec.shape, spec.caption, f"builtin:shapes/{i}", spec.as_dict()))
        source = {"path": "builtin:shapes", "images": len(items), "seed": opts.seed,
                  "sha256": hashlib.sha256(images.tobytes()).hexdigest(), "origin": "generated by aigc.data.shapes"}
        return items, source
    raise UserError(f"unknown built-in image dataset {name!r} (available: {', '.join(BUILTIN)})")


# ---------------------------------------------------------------- prepare

def _split(items: list[Item], opts: ImagePrepareOptions) -> tuple[list[Item], list[Item]]:
    """Seeded split by source name, so adding images never moves existing ones across the split."""
    def score(item: Item) -> float:
        h = hashlib.sha256(f"{opts.seed}:{item.source}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    train = [it for it in items if score(it) >= opts.val_fraction]
    val = [it for it in items if score(it) < opts.val_fraction]
    if opts.val_fraction > 0 and not val and len(train) > 1:  # tiny sets: hold out at least one image
        val = [train.pop()]
    return train, val


def _write_split(folder: Path, split: str, items: list[Item], classes: list[str], channels: int, size: int) -> None:
    images = np.stack([it.image for it in items]) if items else np.zeros((0, size, size, channels), np.uint8)
    labels = np.asarray([classes.index(it.cls) if it.cls is not None else -1 for it in items], dtype=np.int64)
    np.savez(folder / f"{split}.npz", images=images, labels=labels)
    with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as f:
        for it in items:
            rec = {"source": it.source, "class": it.cls, "caption": it.caption}
            if it.attributes:
                rec["attributes"] = it.attributes
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def prepare(inputs: list[str | Path], out: str | Path, opts: ImagePrepareOptions | None = None,
            builtin: list[str] | None = None, overwrite: bool = False) -> dict:
    """Read, convert, split and write an image dataset atomically; return the manifest."""
    opts = opts or ImagePrepareOptions()
    opts.validate()
    out = Path(out)
    if not inputs and not builtin:
        raise UserError("nothing to prepare: give image folders or --builtin digits|shapes")
    store.check_writable(out, overwrite)
    started = time.time()
    items: list[Item] = []
    skipped: list[dict] = []
    sources: list[dict] = []
    for name in builtin or []:
        b_items, source = builtin_items(name, opts)
        items.extend(b_items)
        sources.append(source)
    for root in inputs:
        f_items, f_skipped, source = read_folder(Path(root), opts)
        items.extend(f_items)
        skipped.extend(f_skipped)
        sources.append(source)
    if not items:
        reasons = sorted({s["reason"].split(" (")[0] for s in skipped})
        raise UserError("no usable images" + (f": {len(skipped)} skipped ({', '.join(reasons)})" if skipped else " found"))
    classes = sorted({it.cls for it in items if it.cls is not None}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    unlabelled = sum(it.cls is None for it in items)
    if classes and unlabelled:
        raise UserError(f"{unlabelled} images have no class (they sit in the root folder) while others do; "
                        "put every image in a class sub-folder, or none")
    captioned = sum(it.caption is not None for it in items)
    if 0 < captioned < len(items):
        raise UserError(f"captions cover {captioned} of {len(items)} images; give every image a caption, or none")
    train, val = _split(items, opts)
    channels = 3 if opts.mode == "rgb" else 1

    with store.atomic_folder(out, overwrite) as tmp:
        for split, part in (("train", train), ("val", val)):
            _write_split(tmp, split, part, classes, channels, opts.size)
        manifest = {
            **store.manifest("image", started, opts),
            "size": opts.size,
            "channels": channels,
            "classes": classes,
            "captions": captioned == len(items),
            "attributes": sorted(items[0].attributes) if items[0].attributes else [],
            "augment": {"hflip": opts.hflip},
            "sources": sources,
            "images": {"read": len(items) + len(skipped), "skipped": len(skipped), "train": len(train), "val": len(val)},
            "skipped": skipped,
        }
        store.write_manifest(tmp, manifest, ("train.npz", "val.npz", "train.jsonl", "val.jsonl"))
    return manifest


@dataclass
class ImageSplit:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64, -1 = no class
    records: list[dict]

    @property
    def captions(self) -> list[str | None]:
        return [r.get("caption") for r in self.records]


def load_prepared(path: str | Path) -> tuple[ImageSplit, ImageSplit, dict]:
    """Read a prepared image folder: (train, val, manifest)."""
    p = Path(path)
    manifest = store.read_manifest(p, "image")
    splits = []
    for split in ("train", "val"):
        with np.load(p / f"{split}.npz") as z:
            images, labels = z["images"], z["labels"]
        records = [json.loads(line) for line in (p / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        splits.append(ImageSplit(images, labels, records))
    return splits[0], splits[1], manifest
