"""POST /v1/images/generations and POST /v1/images/edits (b64_json or a signed, expiring url) and GET of those urls.

For the project's own image models the prompt is the model's condition: a caption for a caption model, a class
name for a class model, empty for an unconditional one, and images are upscaled from the model's native size to
``size``. A Stable Diffusion run (``generate/sd.py``) draws the prompt at ``size``, with ``negative_prompt``,
``scheduler``, ``steps``, ``guidance`` and ``seed``; ``/v1/images/edits`` (OpenAI's multipart form: ``image``, an
optional ``mask`` whose transparent or white pixels are repainted, ``prompt``) is its image-to-image and inpainting.
Every image is watermarked (>= 256x256), described in its metadata and C2PA-signed as the tenant's policy says
(``govern/delivery.py``), as PNG or JPEG; each passes the lifecycle's stages (``serve/lifecycle.py``) and is logged
as a generation with its audit entry before it is returned."""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import re
import time
from typing import Literal

import anyio
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from aigc.db.crud import Units
from aigc.errors import UserError
from aigc.govern import delivery
from aigc.govern.delivery import Delivered
from aigc.run import IMAGE, SD
from aigc.serve.deps import Generator, ServiceDep, model_for
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import Generation, engine_for
from aigc.serve.schemas import ImagesResponse

router = APIRouter(tags=["images"])
MIME = {"png": delivery.PNG, "jpeg": delivery.JPEG}


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=4000)
    model: str = Field(min_length=1, max_length=200)
    n: int = Field(1, ge=1, le=10)
    size: Literal["64x64", "128x128", "256x256", "512x512", "1024x1024"] = "256x256"
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg"] = Field("png", description="PNG, or JPEG (quality 92; the watermark survives it).")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0, le=50)
    negative_prompt: str | None = Field(None, max_length=4000, description="Stable Diffusion models: what to keep out.")
    scheduler: str | None = Field(None, max_length=40, description="Stable Diffusion models: dpm++ 2m karras, euler a, "
                                                                   "ddim, unipc, lcm, ...")
    user: str | None = Field(None, max_length=256)


def sign(secret: bytes, name: str, expires: int) -> str:
    return hmac.new(secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]


def _render(handle, body: ImageRequest, seed: int, gen: Generation) -> tuple[list[tuple[Delivered, bool]], list, float]:
    """Render and deliver (generate, upscale, watermark, describe, sign), in a worker thread: all of it is CPU work."""
    from aigc.generate.image import to_pil, upscale

    t0 = time.perf_counter()
    meta = handle.pipeline.meta
    kw = {}
    prompt = gen.prompt.strip()
    if meta.condition == "class":
        kw["classes"] = [prompt]
    elif meta.condition == "caption":
        kw["captions"] = [prompt.lower()]
    elif prompt:
        raise UserError("this model is unconditional: send an empty prompt")
    images, labels = handle.generate(n=body.n, seed=seed, steps=body.steps, guidance=body.guidance, **kw)
    side = int(body.size.split("x")[0])
    entry, rid, mime = gen.entry, gen.request_id, MIME[body.output_format]
    out = []
    for i, img in enumerate(images):
        params = {"Steps": body.steps, "CFG scale": body.guidance, "Seed": seed, "Size": body.size, "Model": entry.id,
                  "Model hash": entry.version, "Sample": i}
        out.append(gen.deliver_file(to_pil(upscale(img, side)), mime, f"{rid}-{i}{delivery.SUFFIX[mime]}",
                                    {"generation_id": f"{rid}-{i}"}, parameters=delivery.parameters_text(prompt, params)))
    return out, labels, time.perf_counter() - t0


def _render_sd(handle, body, seed: int, gen: Generation, negative: str, init=None, mask=None):
    """A Stable Diffusion run's images at ``body.size``, delivered (watermark, parameters, C2PA), in a worker thread."""
    t0 = time.perf_counter()
    width, height = (int(v) for v in body.size.split("x"))
    sd = handle.pipeline
    params = sd.params(prompt=gen.prompt, negative_prompt=negative, n=body.n, steps=body.steps, guidance=body.guidance,
                       width=width, height=height, seed=seed, scheduler=body.scheduler,
                       strength=getattr(body, "strength", None))
    images = sd.generate(params, init_image=init, mask=mask)  # locks the base pipeline, which other runs may share
    entry, rid, mime = gen.entry, gen.request_id, MIME[body.output_format]
    out = []
    for i, img in enumerate(images):
        described = {"Negative prompt": params.negative_prompt or None, "Steps": params.steps, "Sampler": params.scheduler,
                     "CFG scale": params.guidance, "Seed": seed + i, "Size": body.size,
                     "Denoising strength": params.strength if init is not None else None, "Model": entry.id,
                     "Model hash": entry.version, "Sample": i}
        out.append(gen.deliver_file(img, mime, f"{rid}-{i}{delivery.SUFFIX[mime]}", {"generation_id": f"{rid}-{i}"},
                                    parameters=delivery.parameters_text(params.prompt, described)))
    return out, [None] * len(out), time.perf_counter() - t0


def _store(folder, rid: str, kept: list) -> list[str]:
    """Save the images to be served by URL (each atomically); if one cannot be written, none is left behind."""
    names = []
    try:
        for i, f, _ in kept:
            name = f"{rid}-{i}{delivery.SUFFIX[f.mime]}"
            f.save(folder / name)
            names.append(name)
    except OSError:
        for name in names:
            (folder / name).unlink(missing_ok=True)
        raise
    return names


@router.post("/v1/images/generations", response_model=ImagesResponse)
async def generate_images(body: ImageRequest, request: Request, service: ServiceDep, p: Generator):
    """Draw ``n`` images: the prompt is the condition (a class name or a caption; empty for an unconditional model), or
    for a Stable Diffusion model the prompt it draws."""
    entry = model_for(service, p, body.model, (IMAGE, SD))
    return await _images(service, request, p, entry, body, "images.generations")


class EditForm(ImageRequest):
    """The fields of /v1/images/edits' form, checked like a JSON body: the generation's, and how much to repaint."""

    size: Literal["64x64", "128x128", "256x256", "512x512", "1024x1024"] = "512x512"
    strength: float | None = Field(None, gt=0, le=1)


async def _read_image(upload: UploadFile, param: str, limit: int):
    from PIL import Image, UnidentifiedImageError

    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{param} is larger than {limit // 2**20} MB", code="invalid_value", param=param)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ApiError(400, f"{param} is not a readable image ({exc.__class__.__name__})", code="invalid_image",
                       param=param) from None
    return img


def _mask(img):
    """OpenAI's mask convention (transparent pixels are edited) or a black-and-white one (white is edited): "L", 255 = edit."""
    from PIL import ImageOps

    if img.mode in ("RGBA", "LA") or "transparency" in img.info:
        return ImageOps.invert(img.convert("RGBA").getchannel("A"))
    return img.convert("L")


@router.post("/v1/images/edits", response_model=ImagesResponse)
async def edit_images(request: Request, service: ServiceDep, p: Generator, image: UploadFile = File(...),
                      mask: UploadFile | None = File(None), prompt: str = Form(...), model: str = Form(...),
                      n: int = Form(1), size: str = Form("512x512"), response_format: str = Form("url"),
                      output_format: str = Form("png"), seed: int | None = Form(None), steps: int | None = Form(None),
                      guidance: float | None = Form(None), negative_prompt: str | None = Form(None),
                      scheduler: str | None = Form(None), strength: float | None = Form(None), user: str | None = Form(None)):
    """Repaint an image (image-to-image), or only where ``mask`` says (inpainting), with a Stable Diffusion model."""
    from pydantic import ValidationError

    try:
        body = EditForm(prompt=prompt, model=model, n=n, size=size, response_format=response_format, output_format=output_format,
                        seed=seed, steps=steps, guidance=guidance, negative_prompt=negative_prompt, scheduler=scheduler,
                        strength=strength, user=user)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ApiError(400, f"{first['loc'][0]}: {first['msg']}", code="invalid_value", param=str(first["loc"][0])) from None
    entry = model_for(service, p, body.model, (SD,))
    limit = service.settings.max_body_mb * 2**20
    init = await _read_image(image, "image", limit)
    edit_mask = _mask(await _read_image(mask, "mask", limit)) if mask is not None else None
    if edit_mask is not None and edit_mask.size != init.size:
        raise ApiError(400, f"the mask is {edit_mask.size[0]}x{edit_mask.size[1]}, the image {init.size[0]}x{init.size[1]}: "
                       "they must be the same size", code="invalid_value", param="mask")
    return await _images(service, request, p, entry, body, "images.edits", init, edit_mask)


async def _images(service, request, p, entry, body, endpoint: str, init=None, mask=None):
    """The lifecycle of one images request, for both endpoints."""
    if entry.kind != SD:
        for name in ("negative_prompt", "scheduler"):
            if getattr(body, name, None):
                raise ApiError(400, f"{name} is for Stable Diffusion models; {entry.id!r} is not one", code="invalid_value",
                               param=name)
    gen = Generation.admit(service, request, p, entry, endpoint, "image")
    negative = None
    if body.negative_prompt:  # what the user wrote goes through the input policy too (the prompt's decision is logged)
        negative = await gen.moderate(body.negative_prompt, "negative_prompt")
    await gen.moderate(body.prompt)
    headers = await gen.limit()
    handle = await engine_for(service, entry)
    await gen.hold(Units(images=body.n))
    rid = gen.request_id
    seed = body.seed if body.seed is not None else int.from_bytes(rid.encode()[-4:], "big") % 2**31
    params = {"model": entry.id, "prompt_sha256": hashlib.sha256(body.prompt.encode()).hexdigest(), "n": body.n,
              "size": body.size, "seed": seed, "steps": body.steps, "guidance": body.guidance}
    if body.output_format != "png":
        params["output_format"] = body.output_format
    if entry.kind == SD:
        params.update(scheduler=body.scheduler, negative_prompt=bool(negative), task="inpaint" if mask is not None
                      else "img2img" if init is not None else "txt2img")
    status, compute, files, labels, records, kept = "error", 0.0, [], [], [], []
    folder, names = service.settings.home / "images", []
    try:
        if entry.kind == SD:
            files, labels, compute = await anyio.to_thread.run_sync(_render_sd, handle, body, seed, gen, negative, init, mask)
        else:
            files, labels, compute = await anyio.to_thread.run_sync(_render, handle, body, seed, gen)
        for i, ((f, blocked), lab) in enumerate(zip(files, labels)):
            records.append(gen.record(f"{rid}-{i}", params={**params, "index": i}, output_sha256=f.sha256, watermark_id=f.watermark_id,
                                      filters=gen.filters(*f.filters), status="blocked" if blocked else "delivered"))
            if not blocked:
                kept.append((i, f, lab))
        if body.response_format == "url":  # stored before anything is charged: a full disk fails the request whole
            names = await anyio.to_thread.run_sync(_store, folder, rid, kept)
        status = "ok"
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_prompt", param="prompt") from None
    except OSError as exc:
        files, records = [], []  # nothing was delivered: nothing is charged or logged
        raise ApiError(507, f"the server could not store the images ({exc.strerror or exc}); nothing was charged: try again "
                       "later or ask for response_format b64_json", code="insufficient_storage") from None
    finally:
        await gen.settle(status, Units(images=len(files) if status == "ok" else 0), compute, records)
    data = []
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(f.data).decode(), "revised_prompt": lab} for _, f, lab in kept]
    else:
        base = service.base_url(request)
        expires = int(time.time()) + service.settings.image_url_ttl_s
        for name, (i, f, lab) in zip(names, kept):
            sig = sign(service.url_secret, name, expires)
            data.append({"url": f"{base}/v1/images/files/{name}?expires={expires}&sig={sig}", "revised_prompt": lab})
    return JSONResponse({"created": int(time.time()), "data": data},
                        headers={**headers, "x-generation-ids": ",".join(r.id for r in records)})


@router.get("/v1/images/files/{name}", response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "The image"}})
async def image_file(name: str, service: ServiceDep, expires: int = Query(..., ge=0, le=2**40),
                     sig: str = Query(..., max_length=64)):
    """A generated image behind a signed URL (no key needed, like the URLs OpenAI returns)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+\.(png|jpg)", name) or not hmac.compare_digest(sign(service.url_secret, name, expires), sig):
        raise ApiError(403, "invalid image URL signature", code="invalid_signature")
    if expires < time.time():
        raise ApiError(403, "this image URL has expired", code="url_expired")
    path = service.settings.home / "images" / name
    if not path.is_file():
        raise ApiError(404, "image not found", code="not_found")
    return Response(path.read_bytes(), media_type=delivery.JPEG if name.endswith(".jpg") else delivery.PNG)
