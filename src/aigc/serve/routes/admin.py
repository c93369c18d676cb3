"""Administration. /v1/admin/*: the operator (AIGC_ADMIN_TOKEN) manages plans, prices and tenants.
/v1/organization/*: a tenant's admin manages its own users and keys (viewers may read)."""
from __future__ import annotations

import datetime as dt
from typing import Literal

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from aigc.db import crud
from aigc.db.models import ApiKey, Organization, Plan, Price, User
from aigc.serve.deps import ANY_ROLE, Operator, ServiceDep, role
from aigc.serve.errors import ApiError
from aigc.serve.schemas import KeyOut, ListOf, NewKey, NewOrg, OrgOut, PlanOut, PriceOut, UserOut

router = APIRouter(tags=["admin"])
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
Money = Field(0.0, ge=0, le=1e9)
OrgReader = role(ANY_ROLE, "read the organisation")
UserLister = role(("admin", "viewer"), "list users")
UserAdmin = role(("admin",), "manage users")
KeyLister = role(("admin", "viewer"), "list keys")
KeyAdmin = role(("admin",), "manage keys")


class PlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    kind: Literal["subscription", "payg", "prepaid"]
    monthly_fee: float = Money
    included: float = Money
    overage_rate: float | None = Field(None, ge=0, le=1000)
    price_multiplier: float = Field(1.0, ge=0, le=1000)
    spend_limit: float | None = Field(None, ge=0, le=1e9)
    rpm: int = Field(600, ge=1, le=10**9)
    tpm: int = Field(200_000, ge=1, le=10**12)


class PriceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    version: str = Field("*", min_length=1, max_length=64)
    input_per_1k: float = Money
    output_per_1k: float = Money
    per_image: float = Money
    per_second: float = Money
    per_1k_train_tokens: float = Money
    per_1k_chars: float = Money


class OrgIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    plan: str | None = Field(None, max_length=100)
    credits: float = Money
    admin_email: str | None = Field(None, max_length=200)


class OrgPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: str = Field(min_length=1, max_length=100)


class CreditsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: float = Field(ge=-1e9, le=1e9)


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=3, max_length=200)
    role: Literal["admin", "developer", "viewer", "reviewer"]


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=200, description="e-mail or id of a user of this organisation")
    name: str = Field("", max_length=100)
    allowed_models: list[str] | None = Field(None, max_length=100)
    rpm: int | None = Field(None, ge=1, le=10**9)
    tpm: int | None = Field(None, ge=1, le=10**12)
    expires_in_days: float | None = Field(None, gt=0, le=36500)


# ---------------------------------------------------------------- operator

@router.post("/v1/admin/plans", status_code=201, response_model=PlanOut)
async def create_plan(body: PlanIn, service: ServiceDep, p: Operator) -> dict:
    """A billing plan: subscription (monthly fee, included usage, overage), pay-as-you-go or prepaid credits."""
    return await service.db(lambda s: crud.plan_out(crud.create_plan(s, **body.model_dump())))


@router.get("/v1/admin/plans", response_model=ListOf[PlanOut])
async def list_plans(service: ServiceDep, p: Operator) -> dict:
    """Every billing plan."""
    return {"object": "list", "data": await service.db(lambda s: [crud.plan_out(x) for x in crud.list_all(s, Plan)])}


@router.put("/v1/admin/prices", response_model=PriceOut)
async def set_price(body: PriceIn, service: ServiceDep, p: Operator) -> dict:
    """Set the list price of a model (or of one version of it; ``*`` for every model)."""
    out = await service.db(lambda s: crud.price_out(crud.set_price(s, **body.model_dump())))
    service.forget("prices")  # here at once; other processes hear it (serve.fleet)
    return out


@router.get("/v1/admin/prices", response_model=ListOf[PriceOut])
async def list_prices(service: ServiceDep, p: Operator) -> dict:
    """The price book."""
    return {"object": "list", "data": await service.db(lambda s: [crud.price_out(x) for x in crud.list_all(s, Price)])}


@router.post("/v1/admin/organizations", status_code=201, response_model=NewOrg)
async def create_org(body: OrgIn, service: ServiceDep, p: Operator) -> dict:
    """A tenant; with ``admin_email``, also its first admin user and an API key (shown once)."""

    def work(s):
        org = crud.create_org(s, body.name, body.plan, body.credits)
        out = {"organization": crud.org_out(s, org)}
        if body.admin_email:
            user = crud.create_user(s, org.id, body.admin_email, "admin")
            key, secret = crud.create_key(s, user, name="admin")
            out.update(user=crud.user_out(user), key=crud.key_out(key), api_key=secret)
        return out
    return await service.db(work)


@router.get("/v1/admin/organizations", response_model=ListOf[OrgOut])
async def list_orgs(service: ServiceDep, p: Operator) -> dict:
    """Every tenant, with its balance and this period's usage."""
    return {"object": "list", "data": await service.db(lambda s: [crud.org_out(s, o) for o in crud.list_all(s, Organization)])}


@router.patch("/v1/admin/organizations/{org_id}", response_model=OrgOut)
async def set_org_plan(org_id: Id, body: OrgPatch, service: ServiceDep, p: Operator) -> dict:
    """Move a tenant to another plan."""
    out = await service.db(lambda s: crud.org_out(s, crud.set_org_plan(s, org_id, body.plan)))
    service.forget("keys")
    return out


@router.post("/v1/admin/organizations/{org_id}/credits", response_model=OrgOut)
async def add_credits(org_id: Id, body: CreditsIn, service: ServiceDep, p: Operator) -> dict:
    """Add (or, negative, remove) prepaid credits."""

    def work(s):
        crud.get_org(s, org_id)
        crud.add_credits(s, org_id, body.amount)
        return crud.org_out(s, crud.get_org(s, org_id))
    return await service.db(work)


# ---------------------------------------------------------------- tenant admin

@router.get("/v1/organization", response_model=OrgOut)
async def my_org(service: ServiceDep, p: OrgReader) -> dict:
    """The calling key's organisation."""
    return await service.db(lambda s: crud.org_out(s, crud.get_org(s, p.org_id)))


@router.get("/v1/organization/users", response_model=ListOf[UserOut])
async def list_users(service: ServiceDep, p: UserLister) -> dict:
    """The organisation's users."""
    return {"object": "list", "data": await service.db(lambda s: [crud.user_out(u) for u in crud.list_all(s, User, p.org_id)])}


@router.post("/v1/organization/users", status_code=201, response_model=UserOut)
async def create_user(body: UserIn, service: ServiceDep, p: UserAdmin) -> dict:
    """Add a user with a role: admin, developer, viewer or reviewer."""
    return await service.db(lambda s: crud.user_out(crud.create_user(s, p.org_id, body.email, body.role)))


@router.get("/v1/organization/keys", response_model=ListOf[KeyOut])
async def list_keys(service: ServiceDep, p: KeyLister) -> dict:
    """The organisation's API keys (never their secrets)."""
    return {"object": "list", "data": await service.db(lambda s: [crud.key_out(k) for k in crud.list_all(s, ApiKey, p.org_id)])}


@router.post("/v1/organization/keys", status_code=201, response_model=NewKey)
async def create_key(body: KeyIn, service: ServiceDep, p: KeyAdmin) -> dict:
    """A new key for a user of this organisation; ``api_key`` is shown only in this response."""
    unknown = [m for m in body.allowed_models or [] if m not in service.registry.entries]
    if unknown:
        raise ApiError(400, f"unknown model {unknown[0]!r} in allowed_models", code="model_not_found", param="allowed_models")
    expires = crud.utcnow() + dt.timedelta(days=body.expires_in_days) if body.expires_in_days else None

    def work(s):
        user = crud.get_user(s, p.org_id, body.user)
        key, secret = crud.create_key(s, user, body.name, body.allowed_models, body.rpm, body.tpm, expires)
        return {**crud.key_out(key), "api_key": secret}
    return await service.db(work)


@router.delete("/v1/organization/keys/{key_id}", response_model=KeyOut)
async def revoke_key(key_id: Id, service: ServiceDep, p: KeyAdmin) -> dict:
    """Revoke a key: this server refuses it at once, others within a few seconds."""
    out = await service.db(lambda s: crud.key_out(crud.revoke_key(s, p.org_id, key_id)))
    service.forget("keys")  # this process stops accepting it now; the others as they hear the change (serve.fleet)
    return out
