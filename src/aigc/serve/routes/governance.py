"""Governance endpoints.

- ``POST /v1/provenance/verify``: C2PA state, image watermark (resolved for its owner) or text watermark z-score.
- ``POST /v1/moderations``: the tenant's content policy on some text (OpenAI's moderation shape).
- ``POST /v1/complaints`` (no key needed), ``GET /v1/complaints`` and ``POST /v1/complaints/{id}/decision``
  (reviewer or admin of the tenant concerned, or the operator).
- ``GET /v1/generations/{id}/explanation``: the generation path of one output.
- ``GET|PUT /v1/organization/policy``: the tenant's governance policy and moderation rules (admin).
"""
from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from aigc.db import crud
from aigc.db.crud import Principal
from aigc.db.models import Organization
from aigc.errors import UserError
from aigc.govern import records
from aigc.govern.records import DEFAULT_POLICY, set_policy
from aigc.run import model_folder
from aigc.run import TEXT
from aigc.serve.deps import ANY_ROLE, PrincipalDep, ServiceDep, bearer, get_principal, role, role_or_operator
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import actor
from aigc.serve.schemas import (Decided, Explanation, ListOf, ModerationResponse, NewComplaint, ComplaintOut, PolicyOut,
                                VerifyReport)

router = APIRouter(tags=["governance"])
REVIEW = ("admin", "reviewer")
Moderator = role(ANY_ROLE, "moderate")
PolicyReader = role(ANY_ROLE, "read the policy")
PolicyAdmin = role(("admin",), "change the policy")


async def maybe_principal(request: Request, service: ServiceDep,
                          cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal | None:
    if cred is None or not cred.credentials:
        return None
    return await get_principal(request, service, cred)


OptionalPrincipal = Annotated[Principal | None, Depends(maybe_principal)]


# ---------------------------------------------------------------- verification


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=200_000, description="Text to test for this tenant's text watermark.")
    file: str | None = Field(None, max_length=48 * 2**20, description="A file (PNG, JPEG, WAV, MP4), base64-encoded.")
    model: str | None = Field(None, max_length=200, description="Text model whose tokenizer scores the text (default: every text model).")


def _tokenizer(service, model_id: str):
    cache = service.governance.tokenizers
    if model_id not in cache:
        from transformers import AutoTokenizer

        entry = service.registry.get(model_id)
        cache[model_id] = AutoTokenizer.from_pretrained(str(model_folder(entry.path)))
    return cache[model_id]


@router.post("/v1/provenance/verify", response_model=VerifyReport)
async def verify(body: VerifyRequest, service: ServiceDep, p: OptionalPrincipal):
    """Verify a file (C2PA state, image watermark resolved for its owner) or text (this tenant's text watermark z-score)."""
    if (body.text is None) == (body.file is None):
        raise ApiError(400, "send exactly one of 'text' or 'file' (base64)", code="invalid_value")
    operator = bool(p and p.operator)
    org_id = p.org_id if p and not p.operator else None
    if body.file is not None:
        try:
            data = records.decode_b64(body.file)
        except UserError as exc:
            raise ApiError(400, str(exc), code="invalid_file", param="file") from None
        anchors = service.governance.provenance.trust_anchors

        key = service.governance.audio_secret
        if p is None:
            return await anyio.to_thread.run_sync(lambda: records.verify_file(data, anchors, audio_key=key))
        return await service.db(lambda s: records.verify_file(data, anchors, s, org_id, operator, audio_key=key), write=False)
    if p is None or p.operator:
        raise ApiError(401, "text watermarks are keyed per tenant: verify text with your tenant's API key",
                       code="missing_api_key")
    if body.model is not None:
        try:
            entry = service.registry.get(body.model)
        except KeyError:
            raise ApiError(404, f"the model {body.model!r} does not exist", code="model_not_found", param="model") from None
        ids = [entry.id] if entry.kind == TEXT else []
    else:
        ids = [e.id for e in service.registry.entries.values() if e.kind == TEXT]
    key = service.governance.tenant(p.org_id).text_key

    def score():
        return records.verify_text(body.text, [(m, _tokenizer(service, m), key) for m in ids])
    try:
        return {"text_watermark": await anyio.to_thread.run_sync(score)}
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_value", param="text") from None


# ---------------------------------------------------------------- moderation


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] = Field(..., description="Text or a list of texts (at most 32).")
    model: str | None = Field(None, max_length=200)
    stage: Literal["input", "output"] = "input"


@router.post("/v1/moderations", response_model=ModerationResponse)
async def moderations(body: ModerationRequest, service: ServiceDep, p: Moderator):
    """The tenant's content policy on some texts, in OpenAI's moderation shape (plus the action and the rules hit)."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > 32 or any(len(t) > 100_000 for t in texts):
        raise ApiError(400, "input takes 1 to 32 texts of at most 100,000 characters", code="invalid_value", param="input")
    tenant = service.governance.tenant(p.org_id)
    cats = sorted({r.category for r in tenant.moderation.rules if r.category})
    results = []
    for t in texts:
        d = service.governance.moderate(tenant, t, body.stage)
        hit = set(d.to_dict()["categories"])
        results.append({"flagged": d.action != "allow", "action": d.action, "rules": d.to_dict()["rules"],
                        "categories": {c: c in hit for c in cats},
                        "category_scores": {c: float(c in hit) for c in cats},
                        **({"classifier_score": round(d.score, 4)} if d.score is not None else {})})
    return {"id": "modr-" + hashlib.sha256(repr(texts).encode()).hexdigest()[:24], "model": body.model or "aigc-policy",
            "results": results}


# ---------------------------------------------------------------- complaints


class ComplaintRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(..., min_length=1, max_length=4000)
    contact: str = Field("", max_length=320)
    generation_id: str | None = Field(None, max_length=80)
    content: str | None = Field(None, max_length=200_000, description="The text complained about.")
    file: str | None = Field(None, max_length=48 * 2**20, description="The file complained about, base64-encoded.")
    sha256: str | None = Field(None, max_length=64, description="SHA-256 (hex) of the content complained about.")


@router.post("/v1/complaints", status_code=201, response_model=NewComplaint)
async def complain(body: ComplaintRequest, request: Request, service: ServiceDep):
    """File a complaint about an output (no key needed): by generation id, content, file or hash; it is matched to its generation."""
    # Anonymous: a limit per address (the peer's, or the client's as a trusted proxy reports it: serve/http.py) and one
    # for all addresses together, so that neither one address nor a crowd of them can bury the reviewers.
    client = request.client.host if request.client else "unknown"
    settings = service.settings
    for key, limit in ((f"complaints:{client}", settings.complaints_per_minute),  # the address's first: one address
                       ("complaints:*", settings.complaints_per_minute_total)):   # past its own limit spends no one's
        decision = await service.limiter.atake(key, limit, 10**9, 0)
        if not decision.allowed:
            message = decision.reason if key != "complaints:*" else "too many complaints are arriving: try again in a minute"
            raise ApiError(429, message, code="rate_limit_exceeded", headers=decision.headers)
    try:
        data = records.decode_b64(body.file) if body.file is not None else None
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_file", param="file") from None
    c = await service.db(lambda s: records.complaint_out(records.create_complaint(
        s, body.reason, body.contact, body.generation_id, body.content, data, body.sha256,
        audio_key=service.governance.audio_secret)))
    return {**c, "matched_generation": c["generation_id"] is not None}


Reviewer = role_or_operator(REVIEW, "review complaints")


def _scope(p: Principal) -> int | None:
    """The tenant whose complaints ``p`` reviews; None: the operator's, every tenant's."""
    return None if p.operator else p.org_id


@router.get("/v1/complaints", response_model=ListOf[ComplaintOut])
async def complaint_queue(service: ServiceDep, p: Reviewer,
                          status: Literal["open", "dismissed", "taken_down", "key_revoked"] | None = Query("open")):
    """The review queue: the complaints about this tenant's outputs (the operator sees all)."""
    org = _scope(p)
    return {"object": "list", "data": await service.db(lambda s: [records.complaint_out(c)
                                                                    for c in records.list_complaints(s, org, status)])}


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["dismiss", "takedown", "revoke_key"]
    note: str = Field("", max_length=4000)


@router.post("/v1/complaints/{complaint_id}/decision", response_model=Decided)
async def decide(body: DecisionRequest, service: ServiceDep, p: Reviewer,
                 complaint_id: Annotated[int, Path(ge=1, le=2**31 - 1)]):
    """Dismiss, take down (the output is refused from then on and its stored files deleted) or revoke the key that made it."""
    org = _scope(p)
    who = actor(p)
    out = await service.db(lambda s: records.decide(s, complaint_id, body.action, who, org, body.note,
                                                     service.settings.home / "images"))
    if out.revoked_key is not None:
        service.forget("keys")  # the revocation takes effect on the next request
    service.forget("blocked")
    return {**records.complaint_out(out.complaint), "revoked_key": out.revoked_key, "deleted_files": out.deleted_files}


# ---------------------------------------------------------------- explanations


@router.get("/v1/generations/{generation_id}/explanation", response_model=Explanation)
async def explanation(service: ServiceDep, p: PrincipalDep, generation_id: Annotated[str, Path(max_length=80)],
                      include_content: bool = False):
    """The generation path of one output: model version, training data, parameters, filters, audit entry."""
    org = None if p.operator else p.org_id
    if include_content and not p.operator and p.role != "admin":
        raise ApiError(403, "only a tenant admin may read stored prompts and outputs", code="insufficient_role")
    paths = {e.id: e.path for e in service.registry.entries.values() if e.path is not None}
    return await service.db(lambda s: records.explain(s, generation_id, org, paths, service.governance.keyring, include_content))


# ---------------------------------------------------------------- tenant policy


class PolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: dict | None = Field(None, description=f"Settings to change: {', '.join(DEFAULT_POLICY)}.")
    moderation: str | None = Field(None, max_length=200_000, description="Moderation rules (YAML); empty string: the default rules.")


def _policy_out(org: Organization) -> dict:
    return {"policy": {**DEFAULT_POLICY, **(org.policy or {})}, "moderation": org.moderation, "defaults": DEFAULT_POLICY}


@router.get("/v1/organization/policy", response_model=PolicyOut)
async def get_policy(service: ServiceDep, p: PolicyReader):
    """The tenant's governance policy (with the defaults) and its moderation rules."""
    return await service.db(lambda s: _policy_out(crud.get_org(s, p.org_id)))


@router.put("/v1/organization/policy", response_model=PolicyOut)
async def put_policy(body: PolicyRequest, service: ServiceDep, p: PolicyAdmin):
    """Change policy settings and the moderation rules (YAML; empty string: the default rules); audited."""
    out = await service.db(lambda s: _policy_out(set_policy(s, p.org_id, body.policy or {}, body.moderation)))
    service.forget("policy", p.org_id)
    return out
