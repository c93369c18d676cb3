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
    """What completions and chat share. An explicit null is accepted wherever OpenAI accepts one, and means the
    default; ``min_tokens`` and ``ignore_eos`` are vLLM's extras, as its clients send them."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Omitted: up to the model's context.")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default 1.")
    n: int | None = Field(None, ge=1, le=16, description="Default 1.")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Minus this times a token's count in the output so far.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Minus this once a token is in the output.")
    logit_bias: dict[str, float] | None = Field(None, max_length=300, description="Token id -> bias added to its logit (-100 to 100).")
    min_tokens: int | None = Field(None, ge=0, le=32768, description="vLLM: no end-of-text before this many tokens.")
    ignore_eos: bool | None = Field(None, description="vLLM: never end at the end-of-text token (max_tokens or a stop string ends it).")

    def job(self, prompt: str, default_max_tokens: int | None, stop: list[str], max_tokens: int | None, **kw):
        """The TextJob of this request: nulls become the defaults."""
        return TextJob(prompt, self.n or 1, max_tokens, default_max_tokens, 1.0 if self.temperature is None else self.temperature,
                       self.top_p or 1.0, stop, self.seed, bool(self.stream),
                       bool(self.stream and self.stream_options and self.stream_options.include_usage),
                       frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
                       logit_bias=self.logit_bias or None, min_tokens=self.min_tokens or 0, ignore_eos=bool(self.ignore_eos), **kw)

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 200 for s in stop):
            raise ApiError(400, "stop takes up to 4 non-empty strings of at most 200 characters", code="invalid_value", param="stop")
        return stop


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20, description="Each token's log-probability and this many alternatives.")
    echo: bool | None = Field(None, description="The prompt in front of the completion.")


MAX_PROMPTS = 64  # prompts in one request (LangChain's OpenAI LLM sends 20 at a time)


def _full(id_, created, model, results, usage):
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": t, "index": i, "logprobs": lp, "finish_reason": f} for i, (t, f, lp, _) in enumerate(results)],
            "usage": usage}


def _logprobs(entries, offset):
    """The legacy completions shape: parallel lists, alternatives as {token: logprob}, character offsets into the text."""
    offsets, at = [], offset
    for piece, _, _ in entries:
        offsets.append(at)
        at += len(piece)
    return {"tokens": [p for p, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}


def _chunk(id_, created, model, index, text, finish, first, logprobs=None):
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]}


def _usage_chunk(id_, created, model, usage):
    return {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage}


SHAPE = Shape("cmpl-", _full, _chunk, _usage_chunk, _logprobs)


@router.post("/v1/completions", response_model=Completion, responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                 "description": "JSON, or with stream=true server-sent events ending in data: [DONE]"}})
async def completions(body: CompletionRequest, request: Request, service: ServiceDep, p: Generator):
    """Complete a prompt, or each of a list of prompts, ``n`` times (OpenAI's legacy completions: choice ``k * n + j`` is
    prompt k's j-th), watermarked and moderated as the tenant's policy says."""
    entry = model_for(service, p, body.model, (TEXT, ECHO))
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise ApiError(400, f"prompt takes a string or a list of 1 to {MAX_PROMPTS} strings, got {len(prompts)}", code="invalid_value",
                       param="prompt")
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "echo with logprobs (the prompt's own log-probabilities) is not supported: send one of them",
                       code="unsupported_parameter", param="echo")
    job = body.job(prompts[0], None, body.stops(), body.max_tokens, logprobs=body.logprobs, echo=bool(body.echo),
                   prompts=prompts if len(prompts) > 1 else None)  # omitted max_tokens: up to the context
    return await run_text(service, request, p, entry, job, "completions", SHAPE)
