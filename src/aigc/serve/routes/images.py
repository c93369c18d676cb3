"""POST /v1/images/generations (b64_json or a signed, expiring url) and GET of those urls.

The prompt is the model's condition: a caption for a caption model, a class name for a class model,
empty for an unconditional one. Images are upscaled from the model's native size to ``size``, then
watermarked (>= 256x256), described in their metadata and C2PA-signed as the tenant's policy says
(``govern/delivery.py``), as PNG or JPEG; each image passes the lifecycle's stages (``serve/lifecycle.py``)
and is logged as a generation with its audit entry before it is returned."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from aigc.db.crud import Units
from aigc.errors import UserError
from aigc.govern import delivery
from aigc.govern.delivery import Delivered
from aigc.run import IMAGE
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
    """Draw ``n`` images: the prompt is the condition (a class name or a caption; empty for an unconditional model)."""
    entry = model_for(service, p, body.model, (IMAGE,))
    gen = Generation.admit(service, request, p, entry, "images.generations", "image")
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
    status, compute, files, labels, records, kept = "error", 0.0, [], [], [], []
    folder, names = service.settings.home / "images", []
    try:
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
