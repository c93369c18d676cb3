"""POST /v1/embeddings: sentence vectors from the encoder that ships offline (all-MiniLM-L6-v2, 384 dimensions,
L2-normalised), in OpenAI's shape, metered per input token on the tenant's plan like any other model.

The input is a string, a list of strings, or token ids (a list, or a list of lists) in the encoder's own
vocabulary; each input holds at most the encoder's 256 tokens (longer is an error, never a silent cut).
Embeddings produce no content to publish, so they pass the lifecycle's admit, limit, hold and settle stages
but not moderation, watermarking or the generation log."""
from __future__ import annotations

import base64
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aigc.db.crud import Units
from aigc.serve.deps import Generator, ServiceDep, model_for
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import Generation, engine_for
from aigc.serve.registry import EMBEDDING
from aigc.serve.schemas import EmbeddingsResponse

router = APIRouter(tags=["embeddings"])
MAX_INPUTS = 2048  # as OpenAI


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)


def _texts(body: EmbeddingRequest, engine) -> list[str]:
    inp = body.input
    if isinstance(inp, str):
        inp = [inp]
    if not inp:
        raise ApiError(400, "input must not be empty", code="invalid_value", param="input")
    if isinstance(inp[0], int):  # one list of token ids
        inp = [inp]
    if len(inp) > MAX_INPUTS:
        raise ApiError(400, f"at most {MAX_INPUTS} inputs per request, got {len(inp)}", code="invalid_value", param="input")
    texts = []
    for i, item in enumerate(inp):
        if isinstance(item, list):
            if any(t < 0 or t >= len(engine.tokenizer) for t in item):
                raise ApiError(400, f"input[{i}]: token ids must be in the encoder's vocabulary (0 to {len(engine.tokenizer) - 1})",
                               code="invalid_value", param="input")
            item = engine.decode(item)
        if not item:
            raise ApiError(400, f"input[{i}] is empty", code="invalid_value", param="input")
        texts.append(item)
    return texts


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def embeddings(body: EmbeddingRequest, request: Request, service: ServiceDep, p: Generator):
    """Embed each input: vectors as floats, or base64 (little-endian float32, as the OpenAI SDK decodes them)."""
    entry = model_for(service, p, body.model, (EMBEDDING,))
    dims = entry.info.get("dimensions")
    if body.dimensions is not None and body.dimensions != dims:
        raise ApiError(400, f"{entry.id} gives {dims}-dimensional vectors and was not trained to be shortened: leave dimensions "
                       f"out (or send {dims})", code="invalid_value", param="dimensions")
    gen = Generation.admit(service, request, p, entry, "embeddings", "embedding")
    engine = await engine_for(service, entry)
    texts = _texts(body, engine)
    counts = engine.count(texts)
    too_long = [i for i, n in enumerate(counts) if n > engine.max_tokens]
    if too_long:
        i = too_long[0]
        raise ApiError(400, f"input[{i}] has {counts[i]} tokens; {entry.id} reads at most {engine.max_tokens}: split it",
                       code="context_length_exceeded", param="input")
    tokens = sum(counts)
    headers = await gen.limit(tokens)
    await gen.hold(Units(tokens, 0))
    status, compute, vectors = "error", 0.0, None
    try:
        vectors, compute = await anyio.to_thread.run_sync(engine.embed, texts)
        status = "ok"
    finally:
        await gen.settle(status, Units(tokens if status == "ok" else 0, 0), compute)
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    return JSONResponse({"object": "list", "model": entry.id,
                         "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=headers)
