"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
         413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_exceeded",
         500: "server_error", 503: "service_unavailable", 504: "timeout_error", 507: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.type = type or TYPES.get(status, "invalid_request_error")


def body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status, headers=exc.headers)


async def api_error_handler(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def validation_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        msg, code = "the request body is not valid JSON", "invalid_json"
    elif not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        msg, code = "the request body must be a JSON object", "invalid_json"
    elif first.get("type") == "extra_forbidden":
        msg, code = f"unrecognized request argument supplied: {param}", "unknown_parameter"
    elif first.get("type") == "missing":
        msg, code = f"missing required parameter: {param}", "missing_required_parameter"
    else:
        msg, code = f"invalid value for {param or 'the request'}: {first.get('msg', 'invalid')}", "invalid_value"
    return JSONResponse(body(msg, "invalid_request_error", code, param), status_code=400)


# OpenAI endpoints this server does not implement (yet): a client that calls one hears so, by name
OPENAI_ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/speech",
                    "/v1/uploads", "/v1/batches", "/v1/assistants", "/v1/threads",
                    "/v1/vector_stores", "/v1/responses", "/v1/realtime", "/v1/images/edits", "/v1/images/variations",
                    "/v1/evals", "/v1/containers", "/v1/conversations")


async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "body_too_large"}.get(exc.status_code)
    message = str(exc.detail)
    if exc.status_code == 404 and exc.detail == "Not Found":  # no route: say what was asked and whether OpenAI has it
        path = request.url.path
        known = next((e for e in OPENAI_ENDPOINTS if path == e or path.startswith(e + "/")), None)
        if known:
            message, code = (f"{request.method} {path}: {known} is an OpenAI endpoint this server does not support; "
                             "see GET /openapi.json for what it serves"), "unsupported_endpoint"
        else:
            message, code = f"unknown request URL: {request.method} {path} (see GET /openapi.json)", "unknown_url"
    return JSONResponse(body(message, TYPES.get(exc.status_code, "invalid_request_error"), code),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


RETRY_AFTER_S = 2


def database_unavailable(exc: BaseException) -> bool:
    """Whether an error means the database cannot be reached or is held by another writer (a PostgreSQL restart, a
    SQLite lock past its wait, no free connection): a client should try again shortly."""
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.OperationalError, sa.TimeoutError, sa.InterfaceError)):
        return True
    return isinstance(exc, sa.DBAPIError) and bool(exc.connection_invalidated)


def unavailable() -> ApiError:
    return ApiError(503, "the database is unavailable for the moment (restarting, or held by another writer); "
                    f"try again in {RETRY_AFTER_S} s", code="database_unavailable", headers={"retry-after": str(RETRY_AFTER_S)})


async def database_handler(request: Request, exc: Exception) -> JSONResponse:
    """Database errors, answered here (not as an unhandled error, which would also close the client's connection):
    503 with Retry-After when the database is unavailable, else a plain 500 (logged)."""
    if database_unavailable(exc):
        return error_response(unavailable())
    logging.getLogger("aigc.serve").error("database error", exc_info=exc)
    return JSONResponse(body("internal server error", "server_error", "internal_error"), status_code=500)


async def unhandled_handler(_: Request, exc: Exception) -> JSONResponse:
    if database_unavailable(exc):
        return error_response(unavailable())
    return JSONResponse(body("internal server error", "server_error", "internal_error"), status_code=500)
