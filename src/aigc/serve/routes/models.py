"""GET /v1/models: the models this key may use."""
from __future__ import annotations

from fastapi import APIRouter

from aigc.serve.deps import PrincipalDep, ServiceDep
from aigc.serve.errors import ApiError
from aigc.serve.schemas import ListOf, ModelCard

router = APIRouter(tags=["models"])


def _card(e) -> dict:
    return {"id": e.id, "object": "model", "created": e.created, "owned_by": e.owned_by, "kind": e.kind, "version": e.version}


def _may_see(e, p) -> bool:
    return e.visible_to(None if p.operator else p.org_id) and (p.allowed_models is None or e.id in p.allowed_models)


@router.get("/v1/models", response_model=ListOf[ModelCard])
async def list_models(service: ServiceDep, p: PrincipalDep) -> dict:
    """The models this key may use."""
    entries = [e for e in service.registry.entries.values() if _may_see(e, p)]
    return {"object": "list", "data": [_card(e) for e in entries]}


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, service: ServiceDep, p: PrincipalDep) -> dict:
    """One model, if this key may use it."""
    e = service.registry.entries.get(model_id)
    if e is None or not _may_see(e, p):
        raise ApiError(404, f"the model {model_id!r} does not exist", code="model_not_found")
    return _card(e)
