"""Finishing a generated image for delivery, in the only order that keeps every mark verifiable:

1. the invisible watermark goes into the pixels (images of at least 256x256);
2. generation parameters go into PNG text metadata (the ``parameters`` convention of the Stable
   Diffusion web UIs: the prompt, then ``Key: value, ...``), when the tenant's policy allows;
3. the C2PA manifest is signed last, over the final bytes (any later change invalidates it).
"""
from __future__ import annotations

import io
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from aigc.govern import image_watermark


def unused_path(folder: Path, stem: str, suffixes: tuple[str, ...] = (".png",)) -> Path:
    """``folder/stem`` (no suffix), or ``stem-2``, ``stem-3``, ... : the first name free for every suffix, so a new
    file never replaces an earlier one (the same seed twice gives two files)."""
    candidate, n = stem, 1
    while any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
        n += 1
        candidate = f"{stem}-{n}"
    return folder / candidate


def parameters_text(prompt: str, params: dict) -> str:
    """``prompt\\nSteps: 25, Sampler: DDIM, CFG scale: 3.0, Seed: 1, Size: 256x256, Model: m, Model hash: v``."""
    rest = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None and v != "")
    return f"{prompt}\n{rest}" if prompt else rest


@dataclass
class Delivered:
    data: bytes
    watermark_id: int | None
    signed: bool
    filters: list[str]


def finish_png(img: Image.Image, *, watermark: bool, parameters: str | None, provenance=None, manifest: dict | None = None,
               watermark_id: int | None = None) -> Delivered:
    filters = []
    wm_id = None
    if watermark and min(img.size) >= image_watermark.MIN_SIDE:
        wm_id = watermark_id if watermark_id is not None else secrets.randbits(32)
        img = image_watermark.embed(img, wm_id)
        filters.append("watermark:image:dwtDctSvd")
    info = None
    if parameters:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        filters.append("metadata:parameters")
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    data = buf.getvalue()
    signed = False
    if provenance is not None:
        if manifest is not None and wm_id is not None:
            for a in manifest.get("assertions", []):
                if a.get("label") == "org.aigc.generation":
                    a["data"]["watermark"] = "invisible (dwtDctSvd)"
        data = provenance.sign(data, "image/png", manifest or {})
        signed = True
        filters.append("c2pa")
    return Delivered(data, wm_id, signed, filters)
