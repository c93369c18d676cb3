"""GET /v1/usage: totals, revenue (charged), compute cost and margin from the daily rollups."""
from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Query

from aigc.db import crud
from aigc.serve.deps import READ_USAGE, ServiceDep, role_or_operator
from aigc.serve.errors import ApiError
from aigc.serve.schemas import UsageReport

router = APIRouter(tags=["usage"])
UsageReader = role_or_operator(READ_USAGE, "read usage")


@router.get("/v1/usage", response_model=UsageReport)
async def usage(service: ServiceDep, p: UsageReader,
                group_by: str = Query("model", max_length=100, description="Comma-separated: tenant, key, model, day"),
                start: dt.date | None = None, end: dt.date | None = None) -> dict:
    """A tenant sees its own usage (a developer only its own key's); the operator token sees every tenant."""
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    org_id = key_id = None
    if not p.operator:
        org_id = p.org_id
        key_id = p.key_id if p.role == "developer" else None

    try:
        rows = await service.db(crud.usage_report, groups, start, end, org_id, key_id, write=False)
    except ApiError as exc:
        exc.param = "group_by"
        raise
    return {"object": "list", "group_by": groups, "data": rows}
