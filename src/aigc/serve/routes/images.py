"""POST /v1/images/generations (b64_json or a signed, expiring url) and GET of those urls.

The prompt is the model's condition: a caption for a caption model, a class name for a class model,
empty for an unconditional one. Images are upscaled from the model's native size to ``size``."""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import re
import time
from typing import Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from aigc.db.crud import Units
from aigc.errors import UserError
from aigc.serve.deps import GENERATE, PrincipalDep, ServiceDep, model_for, require
from aigc.serve.errors import ApiError
from aigc.serve.generation import engine_for
from aigc.serve.registry import IMAGE

router = APIRouter(tags=["images"])


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=4000)
    model: str = Field(min_length=1, max_length=200)
    n: int = Field(1, ge=1, le=10)
    size: Literal["64x64", "128x128", "256x256", "512x512", "1024x1024"] = "256x256"
    response_format: Literal["url", "b64_json"] = "url"
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0, le=50)
    user: str | None = Field(None, max_length=256)


def sign(secret: bytes, name: str, expires: int) -> str:
    return hmac.new(secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]


def _render(handle, body: ImageRequest, seed: int) -> tuple[list[bytes], list[str], float]:
    from aigc.generate.image import to_pil, upscale

    t0 = time.perf_counter()
    meta = handle.pipeline.meta
    kw = {}
    prompt = body.prompt.strip()
    if meta.condition == "class":
        kw["classes"] = [prompt]
    elif meta.condition == "caption":
        kw["captions"] = [prompt.lower()]
    elif prompt:
        raise UserError("this model is unconditional: send an empty prompt")
    images, labels = handle.generate(n=body.n, seed=seed, steps=body.steps, guidance=body.guidance, **kw)
    side = int(body.size.split("x")[0])
    out = []
    for img in images:
        buf = io.BytesIO()
        to_pil(upscale(img, side)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, labels, time.perf_counter() - t0


@router.post("/v1/images/generations")
async def generate_images(body: ImageRequest, request: Request, service: ServiceDep, p: PrincipalDep):
    require(p, GENERATE, "generate")
    entry = model_for(service, p, body.model, (IMAGE,))
    decision = service.limiter.take(p.key_id, p.rpm, p.tpm, 0)
    if not decision.allowed:
        raise ApiError(429, decision.reason, code="rate_limit_exceeded", headers=decision.headers)
    handle = await engine_for(service, entry)
    hold = await service.billing.reserve(p, entry.id, entry.version, Units(images=body.n))
    rid = request.state.request_id
    seed = body.seed if body.seed is not None else int.from_bytes(rid.encode()[-4:], "big") % 2**31
    status, compute, files, labels = "error", 0.0, [], []
    try:
        files, labels, compute = await anyio.to_thread.run_sync(_render, handle, body, seed)
        status = "ok"
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_prompt", param="prompt") from None
    finally:
        charged, cost = await service.billing.settle(rid, p, entry.id, entry.version, "images.generations", status,
                                                     Units(images=len(files)), hold, compute)
        service.metrics.images.labels(entry.id).inc(len(files))
        service.metrics.revenue.labels(entry.id).inc(charged / 1e6)
        service.metrics.cost.labels(entry.id).inc(cost / 1e6)
    data = []
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(f).decode(), "revised_prompt": lab} for f, lab in zip(files, labels)]
    else:
        folder = service.settings.home / "images"
        folder.mkdir(parents=True, exist_ok=True)
        base = service.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        expires = int(time.time()) + service.settings.image_url_ttl_s
        for i, (f, lab) in enumerate(zip(files, labels)):
            name = f"{rid}-{i}.png"
            (folder / name).write_bytes(f)
            sig = sign(service.url_secret, name, expires)
            data.append({"url": f"{base}/v1/images/files/{name}?expires={expires}&sig={sig}", "revised_prompt": lab})
    return JSONResponse({"created": int(time.time()), "data": data}, headers=decision.headers)


@router.get("/v1/images/files/{name}")
async def image_file(name: str, service: ServiceDep, expires: int = Query(..., ge=0, le=2**40),
                     sig: str = Query(..., max_length=64)):
    """A generated image behind a signed URL (no key needed, like the URLs OpenAI returns)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+\.png", name) or not hmac.compare_digest(sign(service.url_secret, name, expires), sig):
        raise ApiError(403, "invalid image URL signature", code="invalid_signature")
    if expires < time.time():
        raise ApiError(403, "this image URL has expired", code="url_expired")
    path = service.settings.home / "images" / name
    if not path.is_file():
        raise ApiError(404, "image not found", code="not_found")
    return Response(path.read_bytes(), media_type="image/png")
