"""The FastAPI application: an OpenAI-compatible API over the model registry, with keys, plans,
metering, rate limits, Prometheus metrics and JSON logs. ``create_app`` builds it; ``aigc serve``
runs it under uvicorn (which, on SIGTERM, stops accepting and lets in-flight requests finish)."""
from __future__ import annotations

import gc
import json
import logging
import secrets
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc import __version__
from aigc.serve import errors
from aigc.serve.http import add_edge
from aigc.serve.registry import Registry
from aigc.serve.service import Service
from aigc.settings import Settings

log = logging.getLogger("aigc.serve")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields are kept."""

    SKIP = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
               "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self.SKIP})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(json_logs: bool = True, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("aigc")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class RequestContext:
    """Pure ASGI middleware: a request id on every response, latency metrics and one JSON log line per request.

    (Starlette's BaseHTTPMiddleware would add latency and interfere with streaming disconnects.)
    """

    def __init__(self, app, service_getter):
        self.app, self.service = app, service_getter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:64]
        rid = rid or "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - t0
            svc: Service = self.service()
            svc.metrics.requests.labels(route, str(status[0])).inc()
            svc.metrics.latency.labels(route).observe(elapsed)
            st = scope.get("state", {})
            log.info("request", extra={"request_id": rid, "method": scope["method"], "path": scope["path"], "status": status[0],
                                       "ms": round(elapsed * 1000, 2), "key": st.get("key_prefix"), "org": st.get("org_id")})


def build_registry(settings: Settings, runs: list[str], models_dir: str | None, echo: list[str] | None,
                   placements: dict[str, str]) -> Registry:
    """The models ``aigc serve`` serves, from its arguments and the settings."""
    return Registry.from_paths(list(runs), models_dir or settings.models_dir, echo,
                               memory_budget_mb=settings.memory_budget_mb, max_batch=settings.max_batch,
                               context=settings.context_tokens, device=settings.device, model_devices=placements,
                               gpu_memory_budget_mb=settings.gpu_memory_budget_mb, embeddings=settings.embeddings,
                               echo_token_ms=settings.echo_token_ms, speech=settings.speech, voices_dir=settings.voices_dir)


def worker_app() -> FastAPI:
    """The app of one worker process of ``aigc serve --workers N`` (uvicorn's factory, in each process it starts):
    the settings come from the environment, what to serve from ``AIGC_SERVE_SPEC``, set by the parent."""
    from aigc import threads

    settings = Settings()
    spec = json.loads(settings.serve_spec or "{}")
    setup_logging(settings.log_json)
    threads.configure()
    return create_app(settings, build_registry(settings, spec.get("runs", []), spec.get("models_dir"), spec.get("echo"),
                                               spec.get("placements", {})))


def create_app(settings: Settings, registry: Registry) -> FastAPI:
    from aigc.serve import console
    from aigc.serve.routes import (admin, chat, completions, embeddings, files, fine_tuning, governance, health, images, media, models,
                                   speech, usage)

    service = Service.build(settings, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        bind = service.sessions.kw["bind"]
        log.info("server starting", extra={"models": list(registry.entries), "database": bind.url.render_as_string(hide_password=True)})
        service.fleet.start()  # register; fail what dead servers left (holds, jobs); serve every fine-tuned model
        # The models and libraries loaded at start are millions of objects that live as long as the process: kept out of
        # the collector's view, a full collection no longer walks them (a ~200 ms pause of every request in flight).
        gc.collect()
        gc.freeze()
        yield
        # uvicorn has already waited for in-flight requests (their usage is recorded) before we get here.
        service.close()
        log.info("server stopped")

    app = FastAPI(title="AIGC", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for models trained with aigc, with keys, plans, metering and rate limits.")
    app.state.service = service
    app.add_exception_handler(errors.ApiError, errors.api_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_handler)
    app.add_exception_handler(SQLAlchemyError, errors.database_handler)  # the database restarting or locked: 503
    app.add_exception_handler(Exception, errors.unhandled_handler)
    for module in (models, completions, chat, embeddings, images, media, speech, files, fine_tuning, usage, admin, governance, health):
        app.include_router(module.router)
    console.mount(app)
    add_edge(app, settings)  # body, header and time limits; trusted proxies; CORS
    app.add_middleware(RequestContext, service_getter=lambda: service)
    return app
