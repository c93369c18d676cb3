"""OpenAI's ``/v1/files`` for fine-tuning data: upload, list, retrieve, delete, content.

An upload (``purpose="fine-tune"``, JSONL: OpenAI's chat ``messages`` records, or ``prompt`` / ``chosen`` /
``rejected`` preference pairs, or any format ``aigc data prepare --kind chat`` reads) is checked and prepared at
once with the data preparation's rules (data/chat.py: normalisation, turn order, tool calls, PII scrubbing, exact
and near duplicates, a held-out split). The answer carries the preparation's report (records read and kept, drop
reasons with examples); a file nothing survives is refused and nothing of it is kept. The bytes live under
``HOME/files/<id>/`` (``raw.jsonl``, what ``/content`` returns, and ``prepared/``, what a job trains on).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile
from fastapi.responses import Response

from aigc.db import crud
from aigc.db.models import File as FileRow
from aigc.errors import UserError
from aigc.serve.deps import GENERATE, READ_USAGE, ServiceDep, role
from aigc.serve.errors import ApiError
from aigc.serve.schemas import FileDeleted, FileOut, Page

router = APIRouter(tags=["files"])

Uploader = role(GENERATE, "upload or delete files")
Reader = role(READ_USAGE, "list files")
PURPOSES = ("fine-tune",)
CHUNK = 1 << 20


def file_json(f: FileRow) -> dict:
    report = f.report or {}
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at.timestamp()), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None,
            "kind": f.kind, "preparation": {k: report.get(k) for k in ("records", "dropped", "examples", "pii", "tool_use")}}


def folder(service, file_id: str) -> Path:
    return service.settings.home / "files" / file_id


def _kind_of(first_line: bytes) -> str:
    """chat or preference, from the first record (a line that is not a JSON object is refused by name)."""
    from aigc.data.chat import detect

    try:
        record = json.loads(first_line)
    except ValueError:
        raise UserError("line 1 is not JSON: a fine-tune file is JSONL, one JSON object per line") from None
    if not isinstance(record, dict):
        raise UserError("line 1 is not a JSON object: a fine-tune file is JSONL, one JSON object per line")
    return "preference" if detect(record) == "preference" else "chat"


def _prepare(raw: Path, out: Path) -> tuple[str, dict]:
    """(kind, manifest) of the prepared file; UserError when it is not usable training data."""
    from aigc.data.chat import ChatPrepareOptions, prepare

    with raw.open("rb") as fh:
        first = next((line for line in fh if line.strip()), b"")
    if not first:
        raise UserError("the file is empty")
    kind = _kind_of(first)
    manifest = prepare([raw], out, ChatPrepareOptions(kind=kind))
    return kind, manifest


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}


@router.post("/v1/files", openapi_extra=UPLOAD_SCHEMA, response_model=FileOut)
async def upload_file(request: Request, service: ServiceDep, p: Uploader):
    """Upload a JSONL file of training examples (``purpose="fine-tune"``); checked and prepared before it is kept."""
    limit = service.settings.file_max_mb * 2**20
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + CHUNK:  # refused before a byte of the body is read
        raise ApiError(413, f"the file is larger than the {service.settings.file_max_mb} MB limit", code="file_too_large", param="file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "upload the file as multipart/form-data with the fields file and purpose", code="invalid_request_error")
    async with request.form(max_files=1, max_fields=4) as form:
        file, purpose = form.get("file"), form.get("purpose")
        if not isinstance(purpose, str):
            raise ApiError(400, "missing required parameter: purpose", code="missing_required_parameter", param="purpose")
        if not isinstance(file, UploadFile):
            raise ApiError(400, "missing required parameter: file (a file part)", code="missing_required_parameter", param="file")
        return await _upload(service, p, file, purpose, limit)


async def _upload(service, p, file: UploadFile, purpose: str, limit: int) -> dict:
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose {purpose!r} is not supported here: files are for fine-tuning (purpose 'fine-tune')",
                       code="invalid_value", param="purpose")
    name = Path(file.filename or "upload.jsonl").name[:255]
    if not name.lower().endswith(".jsonl"):
        raise ApiError(400, f"{name!r}: a fine-tune file is JSONL (a .jsonl file, one JSON object per line)",
                       code="invalid_file_format", param="file")
    file_id = "file-" + secrets.token_hex(12)
    where = folder(service, file_id)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=_ensure(service.settings.home / "files")))
    raw = staging / "raw.jsonl"
    try:
        digest, size = hashlib.sha256(), 0
        with raw.open("wb") as out:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the file is larger than the {service.settings.file_max_mb} MB limit",
                                   code="file_too_large", param="file")
                digest.update(chunk)
                out.write(chunk)
        try:
            kind, manifest = await anyio.to_thread.run_sync(_prepare, raw, staging / "prepared")
        except UserError as exc:
            raise ApiError(400, f"{name}: {exc}", code="invalid_file", param="file") from None
        staging.rename(where)

        def add(s):
            return file_json(crud.add_file(s, id=file_id, org_id=p.org_id, purpose=purpose, filename=name, bytes=size,
                                           sha256=digest.hexdigest(), kind=kind, report=_report(manifest)))
        try:
            return await service.db(add)
        except BaseException:
            shutil.rmtree(where, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _report(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in ("kind", "records", "dropped", "examples", "pii", "turns", "characters", "tool_use")}


@router.get("/v1/files", response_model=Page[FileOut])
async def list_files(service: ServiceDep, p: Reader, purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                     order: Literal["asc", "desc"] = "desc", after: str | None = None):
    """The tenant's files, newest first (``order=asc``: oldest first); ``after``: the page after that file."""
    rows = await service.db(lambda s: [file_json(f) for f in crud.list_files(s, p.org_id, purpose, limit + 1, after, order == "asc")],
                            write=False)
    page = rows[:limit]
    return {"object": "list", "data": page, "has_more": len(rows) > limit, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


@router.get("/v1/files/{file_id}", response_model=FileOut)
async def retrieve_file(file_id: str, service: ServiceDep, p: Reader):
    """One file: its size, name and preparation report."""
    return await service.db(lambda s: file_json(crud.get_file(s, file_id, p.org_id)), write=False)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, service: ServiceDep, p: Uploader):
    """Delete a file and its bytes (refused while an unfinished fine-tuning job trains on it)."""
    await service.db(lambda s: crud.delete_file(s, file_id, p.org_id))
    shutil.rmtree(folder(service, file_id), ignore_errors=True)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/jsonl": {"schema": {"type": "string", "format": "binary"}}}}})
async def file_content(file_id: str, service: ServiceDep, p: Uploader):
    """The bytes as uploaded."""
    await service.db(lambda s: crud.get_file(s, file_id, p.org_id), write=False)
    path = folder(service, file_id) / "raw.jsonl"
    if not path.is_file():
        raise ApiError(404, f"the content of {file_id!r} is gone", code="not_found")
    return Response(await anyio.to_thread.run_sync(path.read_bytes), media_type="application/jsonl")
