"""POST /v1/chat/completions. Messages become a prompt through the tokenizer's chat template when it
has one (SmolLM2, other instruct models and SFT runs, which save theirs): its ids are built turn by turn
exactly as training built them. Models pretrained here have none, so they get a plain "role: content"
transcript that ends with "assistant:" and stops at the next "\\nuser:".

Tools are rendered as training renders them (``data/chat_tokens.py``: the model's own template when it knows
tools, else the Hermes format in the system turn); the answer's calls are parsed into OpenAI's ``tool_calls``,
and ``generate/grammar.py``'s Tools grammar keeps every call the model makes an instance of its function's
parameter schema (``required`` and a named function force a call; ``auto`` lets the model choose)."""
from __future__ import annotations

import json
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


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1_000_000)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=128)
    refusal: str | None = None  # echoed back by clients that replay an answer

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=100_000)
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: Function


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
    tools: list[Tool] | None = Field(None, max_length=128, description="Functions the model may call (their calls come "
                                                                       "back as tool_calls, arguments valid for each schema).")
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    # the deprecated function-calling fields: refused with a pointer to tools
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


def turns_of(messages: list[Message]) -> list[dict]:
    """The conversation in the form training stores (``data/chat.py``): calls as {name, arguments object}."""
    turns = []
    for k, m in enumerate(messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"messages[{k}] ({m.role}) has no content", code="invalid_value", param=f"messages[{k}].content")
        if m.tool_calls and m.role != "assistant":
            raise ApiError(400, f"messages[{k}]: only assistant messages carry tool_calls", code="invalid_value",
                           param=f"messages[{k}].tool_calls")
        t = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            t["tool_calls"] = []
            for j, c in enumerate(m.tool_calls):
                try:
                    args = json.loads(c.function.arguments) if c.function.arguments.strip() else {}
                except json.JSONDecodeError as e:
                    args = None
                    why = e.msg
                if not isinstance(args, dict):
                    raise ApiError(400, f"messages[{k}].tool_calls[{j}].function.arguments is not a JSON object"
                                   + (f" ({why})" if args is None else ""), code="invalid_value",
                                   param=f"messages[{k}].tool_calls[{j}].function.arguments")
                t["tool_calls"].append({"name": c.function.name, "arguments": args})
        turns.append(t)
    return turns


def render(tokenizer, turns: list[dict], tools: list[dict] | None = None) -> tuple[str, list[str], list[dict] | None]:
    """(prompt text, default stop strings, the turns when the model's chat template encodes them)."""
    from aigc.data.chat_tokens import plain_turns, render_chat

    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, turns, True, tools), [], turns
    lines = plain_turns(turns, tools)
    return "".join(f"{t['role']}: {t['content']}\n" for t in lines) + "assistant:", ["\nuser:"], None


def _tools(body: ChatRequest):
    """(the tools as the prompt lists them, the grammar their calls follow, the tool_choice's name), or Nones."""
    from aigc.generate import grammar

    for name in ("functions", "function_call"):
        if getattr(body, name) not in (None, [], "none", "auto"):
            raise ApiError(400, f"{name} is OpenAI's deprecated function calling: send tools and tool_choice instead",
                           code="unsupported_parameter", param=name)
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools", code="invalid_value", param="tool_choice")
        return None, None, "none"
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "two tools have the same name", code="invalid_value", param="tools")
    forced = None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        forced = fn.get("name") if isinstance(fn, dict) else None
        if forced not in names:
            raise ApiError(400, "tool_choice names a function: {\"type\": \"function\", \"function\": {\"name\": ...}} with one of "
                           f"the tools ({', '.join(names)})", code="invalid_value", param="tool_choice")
    mode = "auto" if choice is None else ("named" if forced else choice)
    if mode == "none":
        return None, None, "none"
    schemas = {}
    for k, t in enumerate(body.tools):
        if forced and t.function.name != forced:
            continue
        params = t.function.parameters or {"type": "object", "properties": {}}
        if params.get("type", "object") != "object":
            raise ApiError(400, f"tools[{k}].function.parameters must be an object schema", code="invalid_value",
                           param=f"tools[{k}].function.parameters")
        try:
            schemas[t.function.name] = grammar.Schema({"type": "object", **params})
        except grammar.SchemaError as exc:
            raise ApiError(400, f"tools[{k}].function.parameters: {exc}", code="invalid_value",
                           param=f"tools[{k}].function.parameters") from None
    listed = [t.model_dump(exclude_none=True) for t in body.tools]
    parallel = body.parallel_tool_calls is not False and not forced
    return listed, grammar.Tools(schemas, "auto" if mode == "auto" else "required", parallel), mode


def _message(text: str, calls: list[dict] | None) -> dict:
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _full(id_, created, model, results, usage):
    return {"id": id_, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": _message(t, calls), "logprobs": lp, "finish_reason": f}
                        for i, (t, f, lp, calls) in enumerate(results)], "usage": usage}


def _entry(piece: str, lp: float) -> dict:
    return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}


def _logprobs(entries, offset):
    """Chat's shape: one entry per answer token, each with its most likely alternatives."""
    return {"content": [{**_entry(p, lp), "top_logprobs": [_entry(t, v) for t, v in top]} for p, lp, top in entries], "refusal": None}


def _chunk(id_, created, model, index, text, finish, first, calls=None, logprobs=None):
    """A stream chunk: text, or (``calls``) tool-call deltas as OpenAI sends them (a call's id, type and name once,
    then pieces of its arguments)."""
    if calls is not None:
        delta = {"role": "assistant", "content": None, "tool_calls": calls} if first else {"tool_calls": calls}
    else:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


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
    tools, tool_grammar, tool_choice = _tools(body)
    prompt, default_stop, turns = render(getattr(engine, "tokenizer", None), turns_of(body.messages), tools)
    stop = body.stops() if body.stop is not None else default_stop
    fmt, grammar = _grammar(body.response_format)
    if tool_grammar is not None:
        if grammar is not None:
            raise ApiError(400, f"response_format {fmt} and tools: send one (tool_choice none lets response_format apply)",
                           code="invalid_value", param="response_format")
        grammar = tool_grammar
    if grammar is not None and (body.ignore_eos or body.min_tokens):
        what, param = ("tools", "tools") if tool_grammar is not None else (f"response_format {fmt}", "response_format")
        raise ApiError(400, f"{what} end the answer when its JSON closes: leave out ignore_eos and min_tokens",
                       code="invalid_value", param=param)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", code="invalid_value", param="top_logprobs")
    job = body.job(prompt, None, stop, body.max_completion_tokens or body.max_tokens, messages=turns,  # omitted: up to the context
                   logprobs=(body.top_logprobs or 0) if body.logprobs else None, grammar=grammar, response_format=fmt,
                   tools=tools, tool_choice=tool_choice)
    return await run_text(service, request, p, entry, job, "chat.completions", SHAPE)
