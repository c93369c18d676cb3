"""POST /v1/chat/completions. Messages become a prompt through the tokenizer's chat template when it
has one (SmolLM2, other instruct models and SFT runs, which save theirs): its ids are built turn by turn
exactly as training built them. Models pretrained here have none, so they get a plain "role: content"
transcript that ends with "assistant:" and stops at the next "\\nuser:"."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from aigc.run import TEXT
from aigc.serve.deps import Generator, ServiceDep, model_for
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import engine_for
from aigc.serve.registry import ECHO
from aigc.serve.routes.completions import SamplingFields
from aigc.serve.schemas import ChatCompletion
from aigc.serve.text import Shape, run_text

router = APIRouter(tags=["text"])


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema's fields, read once it is supported
    type: Literal["text", "json_object", "json_schema"]


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    logprobs: bool | None = Field(None, description="Each answer token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many most likely alternatives per token.")
    response_format: ResponseFormat | None = Field(None, description="json_object: the answer is one JSON object, by "
                                                                     "grammar-constrained decoding (it always parses).")
    # accepted so that a client sending them hears a clear answer: empty or null is fine, anything else is refused
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None


def _grammar(fmt: ResponseFormat | None):
    """(the format's name, the grammar that constrains the answer, or None for text)."""
    from aigc.generate import grammar

    if fmt is None or fmt.type == "text":
        return "text", None
    if fmt.type == "json_object":
        return "json_object", grammar.JSON_OBJECT
    spec = (fmt.model_extra or {}).get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ApiError(400, "response_format json_schema needs json_schema: {name, schema, strict}", code="invalid_value",
                       param="response_format.json_schema")
    try:
        return "json_schema", grammar.Schema(spec.get("schema") or {})
    except grammar.SchemaError as exc:
        raise ApiError(400, f"response_format json_schema: {exc}", code="invalid_value", param="response_format.json_schema") from None


def render(tokenizer, messages: list[Message]) -> tuple[str, list[str], list[dict] | None]:
    """(prompt text, default stop strings, the turns when the model's chat template encodes them)."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), [], turns
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:", ["\nuser:"], None


def _full(id_, created, model, results, usage):
    return {"id": id_, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": f}
                        for i, (t, f, lp) in enumerate(results)], "usage": usage}


def _entry(piece: str, lp: float) -> dict:
    return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}


def _logprobs(entries, offset):
    """Chat's shape: one entry per answer token, each with its most likely alternatives."""
    return {"content": [{**_entry(p, lp), "top_logprobs": [_entry(t, v) for t, v in top]} for p, lp, top in entries], "refusal": None}


def _chunk(id_, created, model, index, text, finish, first):
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _usage_chunk(id_, created, model, usage):
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage}


SHAPE = Shape("chatcmpl-", _full, _chunk, _usage_chunk, _logprobs)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                 "description": "JSON, or with stream=true server-sent events ending in data: [DONE]"}})
async def chat_completions(body: ChatRequest, request: Request, service: ServiceDep, p: Generator):
    """Answer a conversation ``n`` times, through the tokenizer's chat template when the model has one."""
    entry = model_for(service, p, body.model, (TEXT, ECHO))
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree: send one", code="invalid_value", param="max_tokens")
    engine = await engine_for(service, entry)
    prompt, default_stop, turns = render(getattr(engine, "tokenizer", None), body.messages)
    stop = body.stops() if body.stop is not None else default_stop
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise ApiError(400, f"{name} (function calling) are not supported by this server yet", code="unsupported_parameter",
                           param=name)
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none", "auto"):
            raise ApiError(400, f"{name}: function calling is not supported by this server yet", code="unsupported_parameter",
                           param=name)
    fmt, grammar = _grammar(body.response_format)
    if grammar is not None and (body.ignore_eos or body.min_tokens):
        raise ApiError(400, f"response_format {fmt} ends the answer when its JSON closes: leave out ignore_eos and min_tokens",
                       code="invalid_value", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", code="invalid_value", param="top_logprobs")
    job = body.job(prompt, None, stop, body.max_completion_tokens or body.max_tokens, messages=turns,  # omitted: up to the context
                   logprobs=(body.top_logprobs or 0) if body.logprobs else None, grammar=grammar, response_format=fmt)
    return await run_text(service, request, p, entry, job, "chat.completions", SHAPE)
