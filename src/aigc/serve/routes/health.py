"""Liveness, readiness and Prometheus metrics (no key needed; keep /metrics off the public edge)."""
from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from aigc.serve.deps import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep):
    def ping():
        with service.sessions() as s:
            s.execute(text("SELECT 1"))
    try:
        await anyio.to_thread.run_sync(ping)
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "database": str(exc)[:200]}, status_code=503)
    if not service.ready:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return {"status": "ready", "models": len(service.registry.entries), "loaded": list(service.registry.loaded)}


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    service.metrics.refresh()
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
