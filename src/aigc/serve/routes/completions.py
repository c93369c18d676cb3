"""POST /v1/completions (OpenAI's legacy completions: one prompt, n samples, SSE streaming)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from aigc.run import TEXT
from aigc.serve.deps import Generator, ServiceDep, model_for
from aigc.serve.errors import ApiError
from aigc.serve.registry import ECHO
from aigc.serve.schemas import Completion
from aigc.serve.text import Shape, TextJob, run_text

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


@router.post("/v1/completions", response_model=Completion, responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                 "description": "JSON, or with stream=true server-sent events ending in data: [DONE]"}})
async def completions(body: CompletionRequest, request: Request, service: ServiceDep, p: Generator):
    """Complete one prompt ``n`` times (OpenAI's legacy completions), watermarked and moderated as the tenant's policy says."""
    entry = model_for(service, p, body.model, (TEXT, ECHO))
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "send one prompt per request (use n for several samples)", code="invalid_value", param="prompt")
        prompt = prompt[0]
    job = TextJob(prompt, body.n, body.max_tokens, 16, body.temperature, body.top_p, body.stops(), body.seed, body.stream,
                  bool(body.stream_options and body.stream_options.include_usage))
    return await run_text(service, request, p, entry, job, "completions", SHAPE)
