"""Finishing a generated file for delivery: the one path the CLI and the server both take, for PNG,
JPEG, WAV and MP4, in the only order that keeps every mark verifiable:

1. the invisible watermark goes into the pixels (images of at least 256x256; a video's frames are
   marked while they are encoded, so for MP4 this step only records the mark) or the sound (WAV of at least
   ``audio_watermark.MIN_SECONDS``; a video's soundtrack is marked before it is encoded, with the frames' id);
2. generation parameters go into the file's metadata when the tenant's policy allows: a PNG text chunk
   ``parameters`` or a JPEG EXIF UserComment, both in the Stable Diffusion web UIs' convention (the
   prompt, then ``Key: value, ...``);
3. the C2PA manifest is signed last, over the final bytes (any later change invalidates it);
4. ``Delivered.save`` writes the file atomically (a reader never sees half of it).

The same 32-bit id goes into every mark of one output (frames and soundtrack), so any of them leads to its generation.
"""
from __future__ import annotations

import hashlib
import io
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from aigc.data import store
from aigc.errors import UserError
from aigc.govern import audio_watermark, image_watermark

PNG, JPEG, WAV, MP3, FLAC, MP4 = "image/png", "image/jpeg", "audio/wav", "audio/mpeg", "audio/flac", "video/mp4"
SUFFIX = {PNG: ".png", JPEG: ".jpg", WAV: ".wav", MP3: ".mp3", FLAC: ".flac", MP4: ".mp4"}
AUDIO = {WAV: "wav", MP3: "mp3", FLAC: "flac"}  # audio arrives as WAV and leaves in the format asked
JPEG_QUALITY = 92  # the watermark (dwtDctSvd) survives down to about 75
_USER_COMMENT, _EXIF_IFD = 0x9286, 0x8769


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


def read_parameters(data: bytes) -> str | None:
    """The ``parameters`` text a PNG or JPEG was delivered with, or None."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "PNG":
            return img.text.get("parameters")
        raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw if isinstance(raw, str) else None


@dataclass
class Claim:
    """What a file's C2PA manifest says: its title, the model and version that made it, and any more facts."""

    title: str
    model: str
    version: str
    extra: dict = field(default_factory=dict)


@dataclass
class Delivered:
    data: bytes
    mime: str
    watermark_id: int | None
    signed: bool
    filters: list[str]  # what was applied, for the generation log: watermark:..., metadata:parameters, c2pa

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def save(self, path: Path) -> Path:
        return store.write_bytes(path, self.data)


def finish(content: Image.Image | bytes, mime: str, *, watermark: bool = False, parameters: str | None = None,
           provenance=None, claim: Claim | None = None, watermark_id: int | None = None, audio_key: bytes | None = None,
           audio_marked: bool = False) -> Delivered:
    """Watermark, describe, sign: ``content`` is a PIL image for PNG and JPEG, WAV bytes for audio (WAV, MP3, FLAC:
    marked, then encoded as ``mime``), the encoded bytes for MP4.

    ``provenance`` (a ``govern.c2pa.Provenance``) and ``claim`` sign the result; without them it is not signed.
    A WAV is marked with ``audio_key`` (the server's audio-watermark secret) when ``watermark`` is on.
    For MP4, ``watermark_id`` is the mark its frames already carry (None: unmarked), and ``audio_marked`` says whether
    its soundtrack carries it too."""
    if mime not in SUFFIX:
        raise UserError(f"cannot deliver {mime!r}: one of {', '.join(SUFFIX)}")
    filters: list[str] = []
    wm_id = None
    if mime in (PNG, JPEG):
        img = content
        if watermark and min(img.size) >= image_watermark.MIN_SIDE:
            wm_id = watermark_id if watermark_id is not None else secrets.randbits(32)
            img = image_watermark.embed(img, wm_id)
            filters.append("watermark:image:dwtDctSvd")
        buf = io.BytesIO()
        if mime == PNG:
            info = None
            if parameters:
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", parameters)
            img.save(buf, format="PNG", pnginfo=info)
        else:
            exif = Image.Exif()
            if parameters:
                exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
            img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())
        if parameters:
            filters.append("metadata:parameters")
        data = buf.getvalue()
    else:
        if not isinstance(content, (bytes, bytearray)):
            raise TypeError(f"{mime} content must be bytes")
        data = bytes(content)
        if mime == MP4 and watermark_id is not None:
            wm_id = watermark_id
            filters.append("watermark:image:dwtDctSvd")
            if audio_marked:
                filters.append("watermark:audio:stdm")
        if mime in AUDIO and (mime != WAV or (watermark and audio_key is not None)):  # else: the WAV as it is
            from aigc.data.audio import encode, read_wav, write_wav

            audio, rate = read_wav(data)
            if watermark and audio_key is not None and len(audio) / rate >= audio_watermark.MIN_SECONDS \
                    and rate >= audio_watermark.RATE:
                wm_id = watermark_id if watermark_id is not None else secrets.randbits(32)
                audio = audio_watermark.embed(audio, rate, wm_id, audio_key)
                data = write_wav(audio, rate)
                filters.append("watermark:audio:stdm")
            if mime != WAV:
                data = encode(audio, rate, AUDIO[mime])
    signed = False
    if provenance is not None and claim is not None:
        manifest = provenance.manifest(claim.title, claim.model, claim.version, dict(claim.extra))
        if wm_id is not None:
            marks = [m for m, f in (("invisible (dwtDctSvd)", "watermark:image:dwtDctSvd"),
                                    ("inaudible (stdm)", "watermark:audio:stdm")) if f in filters]
            for a in manifest.get("assertions", []):
                if a.get("label") == "org.aigc.generation":
                    a["data"]["watermark"] = ", ".join(marks)
        data = provenance.sign(data, mime, manifest)
        signed = True
        filters.append("c2pa")
    return Delivered(data, mime, wm_id, signed, filters)


def first_frame(data: bytes) -> Image.Image:
    """The first decoded frame of an MP4 as a PIL image (a video's frames carry the image watermark)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        for frame in c.decode(video=0):
            return frame.to_image()
    raise UserError("the video has no frames")
