"""OpenAI's ``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, events, checkpoints (serve/finetune.py runs them).

``method.type`` is ``supervised`` (SFT on chat files) or ``dpo`` (preference files); ``finetuning_type`` (this
engine's choice, LLaMA-Factory's name) is ``lora`` (the default: an adapter of a few megabytes on the base) or
``full``. ``hyperparameters`` (at the top, as older clients send them, or under the method, as newer ones do):
``n_epochs``, ``batch_size``, ``learning_rate_multiplier`` and, for DPO, ``beta``; each may be ``"auto"``.
"""
from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Annotated, Literal, Union

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aigc.db import crud
from aigc.db.crud import Units
from aigc.db.models import FineTuneJob, Organization
from aigc.errors import UserError
from aigc.run import TEXT
from aigc.serve import finetune
from aigc.serve.deps import GENERATE, READ_USAGE, ServiceDep, model_for, role
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import Generation
from aigc.serve.routes.files import folder as file_folder
from aigc.serve.schemas import CheckpointOut, FineTuneEventOut, FineTuneJobOut, Page

router = APIRouter(tags=["fine-tuning"])

Trainer = role(GENERATE, "fine-tune models")
Reader = role(READ_USAGE, "read fine-tuning jobs")
Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Union[Auto, Annotated[int, Field(ge=1, le=50)]] = "auto"
    batch_size: Union[Auto, Annotated[int, Field(ge=1, le=256)]] = "auto"
    learning_rate_multiplier: Union[Auto, Annotated[float, Field(gt=0, le=10)]] = "auto"
    beta: Union[Auto, Annotated[float, Field(gt=0, le=10)]] = "auto"


class MethodPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"]
    supervised: MethodPart | None = None
    dpo: MethodPart | None = None


class FineTuneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[dict] | None = None
    finetuning_type: Literal["lora", "full"] = "lora"


def job_json(j: FineTuneJob) -> dict:
    h = j.hyperparameters or {}
    method = j.method or {}
    kind = method.get("type", "supervised")
    hp = {k: h[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta") if k in h}
    return {"id": j.id, "object": "fine_tuning.job", "created_at": int(j.created_at.timestamp()),
            "finished_at": int(j.finished_at.timestamp()) if j.finished_at else None,
            "error": j.error, "fine_tuned_model": j.fine_tuned_model, "hyperparameters": hp, "model": j.model,
            "organization_id": f"org-{j.org_id}", "result_files": [], "seed": j.seed, "status": j.status,
            "trained_tokens": j.trained_tokens, "training_file": j.training_file, "validation_file": j.validation_file,
            "estimated_finish": None, "integrations": [], "metadata": method.get("metadata"), "suffix": j.suffix,
            "method": {"type": kind, kind: {"hyperparameters": hp}}, "finetuning_type": method.get("finetuning_type", "lora"),
            "estimated_tokens": j.estimated_tokens}


def _hyper(body: FineTuneRequest) -> Hyperparameters:
    kind = body.method.type if body.method else "supervised"
    part = getattr(body.method, kind, None) if body.method else None
    if body.hyperparameters is not None and part is not None and part.hyperparameters is not None:
        raise ApiError(400, "give hyperparameters once: at the top or under method", code="invalid_value", param="hyperparameters")
    hp = (part.hyperparameters if part is not None else None) or body.hyperparameters or Hyperparameters()
    if kind != "dpo" and hp.beta != "auto":
        raise ApiError(400, "beta is a DPO hyperparameter (method.type 'dpo')", code="invalid_value", param="hyperparameters.beta")
    return hp


def _count_tokens(base: Path, records_dir: Path, kind: str, splits: tuple[str, ...]) -> tuple[int, int]:
    """(tokens of one epoch, examples) of the prepared training data with the base model's tokenizer and template:
    what the hold is computed from (training truncates to its block, so it never trains on more)."""
    from aigc.data.chat_tokens import encode_chat, ensure_chat_template
    from aigc.models.lm import load_pretrained_tokenizer

    tok = load_pretrained_tokenizer(str(base))
    ensure_chat_template(tok)
    tokens = examples = 0
    for split in splits:
        for line in (records_dir / split).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            examples += 1
            if kind == "preference":
                tokens += sum(len(encode_chat(tok, r["prompt"] + r[side], train_on_prompt=True).input_ids) for side in ("chosen", "rejected"))
            else:
                tokens += len(encode_chat(tok, r["messages"], tools=r.get("tools")).input_ids)
    return tokens, examples


def _context(base: Path) -> int:
    for cfg in (base / "model" / "config.json", base / "config.json"):
        if cfg.is_file():
            return int(json.loads(cfg.read_text()).get("max_position_embeddings", 512))
    return 512


@router.post("/v1/fine_tuning/jobs", response_model=FineTuneJobOut)
async def create_job(body: FineTuneRequest, request: Request, service: ServiceDep, p: Trainer):
    """Start fine-tuning ``model`` on ``training_file``; the job is queued and runs on the server (poll it or its events)."""
    if body.integrations:
        raise ApiError(400, "integrations (Weights and Biases) are not supported: the job's metrics are its events",
                       code="invalid_value", param="integrations")
    entry = model_for(service, p, body.model, (TEXT,))
    method = body.method.type if body.method else "supervised"
    hp = _hyper(body)
    want = finetune.FILE_KIND[method]

    def files(s):
        out = []
        for param, fid in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            if fid is None:
                continue
            try:
                f = crud.get_file(s, fid, p.org_id)
            except Exception:
                raise ApiError(400, f"the file {fid!r} does not exist", code="invalid_file", param=param) from None
            if f.purpose != "fine-tune":
                raise ApiError(400, f"the file {fid!r} was not uploaded for fine-tuning", code="invalid_file", param=param)
            if f.kind != want:
                raise ApiError(400, f"the file {fid!r} holds {f.kind} records; method {method!r} trains on {want} records",
                               code="invalid_file", param=param)
            out.append(f.id)
        org = s.get(Organization, p.org_id)
        return out, org.name
    file_ids, org_name = await service.db(files, write=False)
    if body.validation_file and body.validation_file == body.training_file:
        raise ApiError(400, "the validation file must differ from the training file", code="invalid_file", param="validation_file")
    prepared = [file_folder(service, f) / "prepared" for f in file_ids]
    try:
        # what the job trains on: the file's training split, or all of it when a validation file holds out the rest
        splits = ("train.jsonl", "val.jsonl") if len(prepared) > 1 else ("train.jsonl",)
        tokens, examples = await anyio.to_thread.run_sync(_count_tokens, entry.path, prepared[0], want, splits)
    except UserError as exc:
        raise ApiError(400, f"the model {entry.id!r} cannot be fine-tuned: {exc}", code="invalid_value", param="model") from None
    n_epochs = finetune.epochs_of(hp.n_epochs)
    batch = min(4, examples) if hp.batch_size == "auto" else hp.batch_size
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    resolved = {"n_epochs": n_epochs, "batch_size": batch, "learning_rate_multiplier": multiplier}
    if method == "dpo":
        resolved["beta"] = 0.1 if hp.beta == "auto" else hp.beta
    lr = finetune.base_lr(method, body.finetuning_type) * multiplier
    steps = finetune.steps_estimate(examples, batch, n_epochs)
    interval = max(1, math.ceil(steps / 5))
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    args = [finetune.RECIPES[(method, body.finetuning_type)], f"--task={finetune.TASK[method]}", f"--init.path={entry.path}",
            f"--lora.enabled={'true' if body.finetuning_type == 'lora' else 'false'}", f"--train.epochs={n_epochs}",
            "--train.max_steps=1000000", f"--train.batch_size={batch}", "--train.grad_accum=1", f"--train.lr={lr}",
            f"--train.min_lr={lr / 10}", f"--train.warmup_steps={min(10, steps // 10)}", f"--train.eval_interval={interval}",
            f"--train.checkpoint_interval={interval}", f"--train.max_seconds={service.settings.fine_tune_max_seconds}",
            f"--train.seed={seed}", f"--train.device={service.registry.device.type}", "--train.samples=1",
            "--train.sample_tokens=64", f"--model.block_size={min(1024, _context(entry.path))}"]
    if method == "dpo":
        args.append(f"--dpo.beta={resolved['beta']}")

    gen = Generation.admit(service, request, p, entry, finetune.ENDPOINT, "text")
    headers = await gen.limit()
    job_id = "ftjob-" + secrets.token_hex(12)
    job_folder = service.settings.home / "fine_tuning" / job_id

    def create(s):
        if crud.active_fine_tunes(s, p.org_id) >= service.settings.fine_tune_max_active:
            raise ApiError(429, f"this organisation already has {service.settings.fine_tune_max_active} fine-tuning jobs queued or "
                           "running; wait for one to finish or cancel one", code="too_many_jobs")
        job = crud.create_fine_tune(s, server=hold.server, hold_id=hold.hold_id, id=job_id, org_id=p.org_id, key_id=p.key_id or None, model=entry.id,
                                    model_version=entry.version, training_file=file_ids[0],
                                    validation_file=file_ids[1] if len(file_ids) > 1 else None,
                                    method={"type": method, "finetuning_type": body.finetuning_type, "metadata": body.metadata},
                                    hyperparameters=resolved, suffix=body.suffix or None, seed=seed, owner=service.jobs.owner,
                                    estimated_tokens=tokens, held=hold.amount)
        crud.add_event(s.connection(), job_id, f"Validated the training file {file_ids[0]}: {examples} examples, {tokens} tokens "
                                               f"per epoch; the job is queued")
        return job_json(job)
    hold = await gen.hold(Units(train_tokens=tokens * n_epochs))
    try:
        payload = await service.db(create)
    except BaseException:
        await service.billing.settle(job_id, p, entry.id, entry.version, finetune.ENDPOINT, "error", Units(), hold, 0.0)
        raise
    hold.server = None  # the job's row carries the hold now
    job_folder.mkdir(parents=True, exist_ok=True)
    service.fine_tunes.submit(finetune.Plan(job_id, p.org_id, p.key_id or None, org_name, entry.id, entry.version, job_folder,
                                            prepared, args, tokens, n_epochs, body.suffix or None, hold.amount, kind=want))
    return JSONResponse(payload, headers=headers)


@router.get("/v1/fine_tuning/jobs", response_model=Page[FineTuneJobOut])
async def list_jobs(service: ServiceDep, p: Reader, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None):
    """The tenant's fine-tuning jobs, newest first."""
    rows = await service.db(lambda s: [job_json(j) for j in crud.list_fine_tunes(s, p.org_id, limit + 1, after)], write=False)
    return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuneJobOut)
async def retrieve_job(job_id: str, service: ServiceDep, p: Reader):
    """One job: its status, hyperparameters, trained tokens and resulting model."""
    return await service.db(lambda s: job_json(crud.get_fine_tune(s, job_id, p.org_id)), write=False)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuneJobOut)
async def cancel_job(job_id: str, service: ServiceDep, p: Trainer):
    """Cancel a queued or running job (what it trained so far is charged; no model is made)."""
    await service.db(lambda s: crud.get_fine_tune(s, job_id, p.org_id), write=False)
    if not await anyio.to_thread.run_sync(service.fine_tunes.cancel, job_id):
        status = await service.db(lambda s: crud.get_fine_tune(s, job_id, p.org_id).status, write=False)
        raise ApiError(400, f"the job {job_id} has already {'been ' if status == 'cancelled' else ''}{status}: only a queued "
                       "or running job can be cancelled", code="job_not_cancellable")
    return await service.db(lambda s: job_json(crud.get_fine_tune(s, job_id, p.org_id)), write=False)


def _event_json(e) -> dict:
    return {"id": f"ftevent-{e.id}", "object": "fine_tuning.job.event", "created_at": int(e.created_at.timestamp()),
            "level": e.level, "message": e.message, "data": e.data or {}, "type": e.type}


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=Page[FineTuneEventOut])
async def list_events(job_id: str, service: ServiceDep, p: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                      after: str | None = None):
    """The job's events, newest first; ``after``: the page after (older than) that event."""
    start = None
    if after is not None:
        if not after.removeprefix("ftevent-").isdigit():
            raise ApiError(400, f"after: {after!r} is not an event id", code="invalid_value", param="after")
        start = int(after.removeprefix("ftevent-"))

    def read(s):
        crud.get_fine_tune(s, job_id, p.org_id)
        return [_event_json(e) for e in crud.list_events(s, job_id, limit + 1, start)]
    rows = await service.db(read, write=False)
    return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=Page[CheckpointOut])
async def list_checkpoints(job_id: str, service: ServiceDep, p: Reader, limit: Annotated[int, Query(ge=1, le=100)] = 10,
                           after: str | None = None):
    """The job's saved model: one checkpoint, the best one by validation loss (the run keeps only that one)."""
    job = await service.db(lambda s: crud.get_fine_tune(s, job_id, p.org_id), write=False)
    data = []
    if job.status == "succeeded" and job.fine_tuned_model and job.run_dir:
        best = _best_record(Path(job.run_dir) / "metrics.jsonl")
        if best is not None:
            data.append({"id": f"ftckpt-{job.id.removeprefix('ftjob-')}-{best['step']}", "object": "fine_tuning.job.checkpoint",
                         "created_at": int(job.finished_at.timestamp()), "fine_tuned_model_checkpoint": job.fine_tuned_model,
                         "fine_tuning_job_id": job.id, "step_number": best["step"],
                         "metrics": {"step": best["step"], "train_loss": best.get("loss"), "valid_loss": best.get("val_loss")}})
    return {"object": "list", "data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def _best_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    best = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("best"):
                best = r
    return best
