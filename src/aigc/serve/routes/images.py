"""POST /v1/images/generations (b64_json or a signed, expiring url) and GET of those urls.

The prompt is the model's condition: a caption for a caption model, a class name for a class model,
empty for an unconditional one. Images are upscaled from the model's native size to ``size``, then
watermarked (>= 256x256), described in PNG metadata and C2PA-signed as the tenant's policy says
(govern/delivery.py); each image is logged as a generation with its audit entry before it is returned."""
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
from aigc.serve.deps import GENERATE, PrincipalDep, ServiceDep, model_for, require
from aigc.serve.errors import ApiError
from aigc.serve.generation import actor, engine_for, moderate_input
from aigc.serve.governance import GenRecord
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


def _render(handle, body: ImageRequest, seed: int, prompt: str, tenant, provenance, rid: str, entry) -> tuple[list, list[str], float]:
    """Generate, upscale, watermark, describe and sign (in a worker thread: all of it is CPU work)."""
    from aigc.generate.image import to_pil, upscale
    from aigc.govern.delivery import finish_png, parameters_text

    t0 = time.perf_counter()
    meta = handle.pipeline.meta
    kw = {}
    prompt = prompt.strip()
    if meta.condition == "class":
        kw["classes"] = [prompt]
    elif meta.condition == "caption":
        kw["captions"] = [prompt.lower()]
    elif prompt:
        raise UserError("this model is unconditional: send an empty prompt")
    images, labels = handle.generate(n=body.n, seed=seed, steps=body.steps, guidance=body.guidance, **kw)
    side = int(body.size.split("x")[0])
    policy = tenant.policy
    out = []
    for i, img in enumerate(images):
        params = {"Steps": body.steps, "CFG scale": body.guidance, "Seed": seed, "Size": body.size, "Model": entry.id,
                  "Model hash": entry.version, "Sample": i}
        manifest = provenance.manifest(f"{rid}-{i}.png", entry.id, entry.version, {"generation_id": f"{rid}-{i}"}) \
            if policy["c2pa"] else None
        out.append(finish_png(to_pil(upscale(img, side)), watermark=policy["watermark_image"],
                              parameters=parameters_text(prompt, params) if policy["png_parameters"] else None,
                              provenance=provenance if policy["c2pa"] else None, manifest=manifest))
    return out, labels, time.perf_counter() - t0


@router.post("/v1/images/generations")
async def generate_images(body: ImageRequest, request: Request, service: ServiceDep, p: PrincipalDep):
    require(p, GENERATE, "generate")
    entry = model_for(service, p, body.model, (IMAGE,))
    rid = request.state.request_id
    tenant, in_decision = await moderate_input(service, p, rid, "images.generations", entry.id, body.prompt)
    decision = service.limiter.take(p.key_id, p.rpm, p.tpm, 0)
    if not decision.allowed:
        raise ApiError(429, decision.reason, code="rate_limit_exceeded", headers=decision.headers)
    handle = await engine_for(service, entry)
    gov = service.governance
    provenance = gov.provenance if tenant.policy["c2pa"] else None
    hold = await service.billing.reserve(p, entry.id, entry.version, Units(images=body.n))
    seed = body.seed if body.seed is not None else int.from_bytes(rid.encode()[-4:], "big") % 2**31
    params = {"model": entry.id, "prompt_sha256": hashlib.sha256(body.prompt.encode()).hexdigest(), "n": body.n,
              "size": body.size, "seed": seed, "steps": body.steps, "guidance": body.guidance}

    def log(files) -> tuple[list[GenRecord], list]:
        records, kept = [], []
        for i, (f, lab) in enumerate(zip(files, labels)):
            digest = hashlib.sha256(f.data).hexdigest()
            blocked = gov.is_blocked(digest)
            records.append(GenRecord(f"{rid}-{i}", rid, p.org_id, p.key_id or None, "images.generations", "image", entry.id,
                                     entry.version, {**params, "index": i}, digest, in_decision.text, None,
                                     {"scheme": "dwtDctSvd", "id": f.watermark_id} if f.watermark_id is not None else None,
                                     f.watermark_id, {"input": in_decision.to_dict()},
                                     [f"moderation:{tenant.moderation.source or 'default'}", *f.filters],
                                     "blocked" if blocked else "delivered"))
            if not blocked:
                kept.append((i, f.data, lab))
        return records, kept

    status, compute, files, labels, records, kept, also = "error", 0.0, [], [], [], [], None
    try:
        files, labels, compute = await anyio.to_thread.run_sync(_render, handle, body, seed, in_decision.text, tenant,
                                                                provenance, rid, entry)
        status = "ok"
        records, kept = log(files)
        also = gov.writer(records, actor(p))  # logged and audited in the same transaction as the charge
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_prompt", param="prompt") from None
    finally:
        charged, cost = await service.billing.settle(rid, p, entry.id, entry.version, "images.generations", status,
                                                     Units(images=len(files)), hold, compute, also=also)
        service.metrics.images.labels(entry.id).inc(len(files))
        service.metrics.revenue.labels(entry.id).inc(charged / 1e6)
        service.metrics.cost.labels(entry.id).inc(cost / 1e6)
    data = []
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(f).decode(), "revised_prompt": lab} for _, f, lab in kept]
    else:
        folder = service.settings.home / "images"
        folder.mkdir(parents=True, exist_ok=True)
        base = service.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        expires = int(time.time()) + service.settings.image_url_ttl_s
        for i, f, lab in kept:
            name = f"{rid}-{i}.png"
            (folder / name).write_bytes(f)
            sig = sign(service.url_secret, name, expires)
            data.append({"url": f"{base}/v1/images/files/{name}?expires={expires}&sig={sig}", "revised_prompt": lab})
    return JSONResponse({"created": int(time.time()), "data": data},
                        headers={**decision.headers, "x-generation-ids": ",".join(r.id for r in records)})


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
