"""Liveness, readiness and Prometheus metrics (no key needed; keep /metrics off the public edge)."""
from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from aigc.db.crud import ping
from aigc.serve.deps import ServiceDep
from aigc.serve.schemas import Health, Ready

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "database down or shutting down"}})
async def readyz(service: ServiceDep):
    """Readiness: the database answers and the server is not shutting down."""
    try:
        await anyio.to_thread.run_sync(ping, service.sessions)
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "database": str(exc)[:200]}, status_code=503)
    if not service.ready:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return {"status": "ready", "models": len(service.registry.entries), "loaded": list(service.registry.loaded)}


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics in the text exposition format (summed over the workers of ``aigc serve --workers N``)."""
    return Response(await anyio.to_thread.run_sync(service.metrics.exposition), media_type=CONTENT_TYPE_LATEST)
