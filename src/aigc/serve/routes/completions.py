"""POST /v1/completions (OpenAI's legacy completions: one prompt, n samples, SSE streaming)."""
from __future__ import annotations


from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from aigc.serve.deps import GENERATE, PrincipalDep, ServiceDep, model_for, require
from aigc.serve.errors import ApiError
from aigc.serve.generation import Shape, TextJob, run_text
from aigc.serve.registry import ECHO, TEXT

router = APIRouter(tags=["text"])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    user: str | None = Field(None, max_length=256)

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 200 for s in stop):
            raise ApiError(400, "stop takes up to 4 non-empty strings of at most 200 characters", code="invalid_value", param="stop")
        return stop


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


def _full(id_, created, model, results, usage):
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(results)],
            "usage": usage}


def _chunk(id_, created, model, index, text, finish, first):
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}


def _usage_chunk(id_, created, model, usage):
    return {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage}


SHAPE = Shape("cmpl-", _full, _chunk, _usage_chunk)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, service: ServiceDep, p: PrincipalDep):
    require(p, GENERATE, "generate")
    entry = model_for(service, p, body.model, (TEXT, ECHO))
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "send one prompt per request (use n for several samples)", code="invalid_value", param="prompt")
        prompt = prompt[0]
    job = TextJob(prompt, body.n, body.max_tokens, 16, body.temperature, body.top_p, body.stops(), body.seed, body.stream,
                  bool(body.stream_options and body.stream_options.include_usage))
    return await run_text(service, request, p, entry, job, "completions", SHAPE)
