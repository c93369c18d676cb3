"""Text's part of the generation lifecycle (``serve/lifecycle.py``), shared by /v1/completions and
/v1/chat/completions: its render stage submits n watermarked sequences to the model's batching
engine, and its deliver stage checks each output against the tenant's output policy before it leaves,
whole (JSON) or a word at a time (SSE). The other stages are the lifecycle's own; settle runs once,
also when the client goes away, the request times out or the model fails."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from aigc.db.crud import Principal, Units
from aigc.serve.batching import Finish, Sequence
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import Generation, engine_for
from aigc.serve.registry import ModelEntry
from aigc.serve.service import Service


@dataclass
class TextJob:
    prompt: str
    n: int
    max_tokens: int | None
    default_max_tokens: int | None  # None: up to the context
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool

    def params(self, model: str, max_tokens: int) -> dict:
        return {"model": model, "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "n": self.n,
                "stop": self.stop, "seed": self.seed, "stream": self.stream}


@dataclass
class Shape:
    """How an endpoint renders results: a whole response, and stream chunks."""

    prefix: str
    full: Callable[[str, int, str, list[tuple[str, str]], dict], dict]  # (id, created, model, [(text, finish)], usage)
    chunk: Callable[[str, int, str, int, str, str | None, bool], dict]  # (id, created, model, index, text, finish, first)
    usage_chunk: Callable[[str, int, str, dict], dict]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


async def run_text(service: Service, request: Request, p: Principal, entry: ModelEntry, job: TextJob, endpoint: str, shape: Shape):
    settings = service.settings
    if len(job.prompt) > settings.max_prompt_chars:
        raise ApiError(400, f"the prompt has {len(job.prompt)} characters; the limit is {settings.max_prompt_chars}",
                       code="prompt_too_long", param="prompt")
    gen = Generation.admit(service, request, p, entry, endpoint, "text")
    rid, tenant = gen.request_id, gen.tenant
    prompt = await gen.moderate(job.prompt)  # redacted when a redact rule matched
    engine = await engine_for(service, entry)
    ids = engine.encode(prompt)
    room = engine.context - len(ids)
    max_tokens = job.max_tokens if job.max_tokens is not None else min(job.default_max_tokens or room, room)
    if max_tokens < 1 or len(ids) + max_tokens > engine.context:
        raise ApiError(400, f"this model's context is {engine.context} tokens; the prompt has {len(ids)} and max_tokens asks for "
                       f"{max_tokens}: shorten the prompt or lower max_tokens", code="context_length_exceeded", param="max_tokens")
    headers = gen.limit(len(ids) + job.n * max_tokens)
    await gen.hold(Units(len(ids), job.n * max_tokens))

    created = int(time.time())
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + settings.request_timeout_s
    seqs = []
    for i in range(job.n):
        def sink(delta: str, done: Finish | None, i=i) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (i, delta, done))
        seed = None if job.seed is None else job.seed + i
        seqs.append(Sequence(ids, max_tokens, job.temperature, job.top_p, job.stop, seed, sink, deadline=deadline, text=prompt,
                             watermark=tenant.mark()))
    for s in seqs:
        engine.submit(s)
    finished: dict[int, Finish] = {}

    async def settle() -> None:
        if gen.settled is not None:
            return
        for s in seqs:
            s.cancel()  # no-op for finished ones; frees the slots of the rest
        produced = sum(f.completion_tokens for f in finished.values()) + sum(s.produced for i, s in enumerate(seqs) if i not in finished)
        reasons = {f.reason for f in finished.values()}
        status = "ok" if len(finished) == job.n and reasons <= {"stop", "length", "content_filter"} else \
            next((r for r in ("error", "timeout") if r in reasons), "cancelled")
        compute = sum(f.compute_s for f in finished.values())
        await gen.settle(status, Units(len(ids), produced), compute, generation_records())

    sent: dict[int, list[str]] = {i: [] for i in range(job.n)}  # what each choice delivered
    filtered: dict[int, dict] = {}  # choices stopped or changed by the output policy: their decision

    def deliver(i: int, full: str) -> str:
        """The output of choice i as the output policy and the takedown list let it out ("" when blocked)."""
        text, decided = gen.check_output(full)
        if decided is not None:
            filtered[i] = decided
        return text

    def generation_records() -> list:
        params = job.params(entry.id, max_tokens)
        mark = tenant.mark()
        wm = {"scheme": "green-list", "gamma": mark.gamma, "delta": mark.delta} if mark else None
        filters = gen.filters(f"pii-at-rest:{tenant.policy['pii']}", *(["watermark:text"] if mark else []))
        recs = []
        for i in range(job.n):
            out = "".join(sent[i])
            f = finished.get(i)
            status = "blocked" if filtered.get(i, {}).get("action") == "block" else \
                ("delivered" if f is not None and f.reason in ("stop", "length") else (f.reason if f else "cancelled"))
            recs.append(gen.record(f"{rid}-{i}", params=params, output_sha256=hashlib.sha256(out.encode()).hexdigest(), output=out,
                                   watermark=wm, output_decision=filtered.get(i), filters=filters, status=status, prompt=prompt))
        return recs

    def failure() -> ApiError | None:
        bad = [f for f in finished.values() if f.reason in ("timeout", "error")]
        if not bad:
            return None
        if bad[0].reason == "timeout":
            return ApiError(504, f"generation took longer than the {settings.request_timeout_s:g} s limit", code="timeout")
        return ApiError(500, "the model failed while generating", code="model_error")

    if not job.stream:
        texts: dict[int, list[str]] = {i: [] for i in range(job.n)}
        try:
            while len(finished) < job.n:
                try:
                    i, delta, done = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                texts[i].append(delta)
                if done is not None:
                    finished[i] = done
            if failure() is None:
                for i in range(job.n):
                    sent[i] = [deliver(i, "".join(texts[i]))]
        finally:
            await settle()
        err = failure()
        if err:
            raise err
        results = [("".join(sent[i]), "content_filter" if filtered.get(i, {}).get("action") == "block" else finished[i].reason)
                   for i in range(job.n)]
        produced = sum(f.completion_tokens for f in finished.values())
        return JSONResponse(shape.full(shape.prefix + rid, created, entry.id, results, _usage(len(ids), produced)),
                            headers={**headers, "x-generation-ids": ",".join(f"{rid}-{i}" for i in range(job.n))})

    cut: set[int] = set()
    held = [""] * job.n  # generated text not yet checked and sent, per choice

    async def sse():
        try:
            first = [True] * job.n
            while len(finished) < job.n:
                i, delta, done = await events.get()
                if i in cut:
                    continue  # already closed by the output policy
                if done is not None:
                    finished[i] = done
                    if done.reason in ("timeout", "error"):
                        err = failure()
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'code': err.code}})}\n\n"
                        return
                held[i] += delta
                # Text goes out only once checked against the output policy, a word at a time: when a space or
                # CJK punctuation arrives, after 32 characters without one, and at the end. A number that may
                # go on across spaces (a phone or card number) stays held until it ends, so it can be redacted whole.
                if done is None and len(held[i]) < 32 and not _BREAK.search(delta):
                    continue
                out, held[i] = (held[i], "") if done is not None else _ready(held[i])
                if out:
                    tail = "".join(sent[i])[-256:]
                    d = gen.check_chunk(tail + out)
                    if d.blocked:
                        cut.add(i)
                        filtered[i] = d.to_dict()
                        seqs[i].cancel()
                        finished[i] = Finish("content_filter", len(ids), seqs[i].produced, done.compute_s if done else 0.0, "")
                        yield "data: " + json.dumps(shape.chunk(shape.prefix + rid, created, entry.id, i, "", "content_filter",
                                                                first[i]), ensure_ascii=False) + "\n\n"
                        continue
                    if d.action != "allow":
                        filtered[i] = d.to_dict()
                    if d.action == "redact" and d.text.startswith(tail):
                        out = d.text[len(tail):]
                    sent[i].append(out)
                if out or done is not None:
                    reason = done.reason if done is not None and done.reason in ("stop", "length") else None
                    yield "data: " + json.dumps(shape.chunk(shape.prefix + rid, created, entry.id, i, out, reason, first[i]),
                                                ensure_ascii=False) + "\n\n"
                    first[i] = False
            if job.include_usage:
                produced = sum(f.completion_tokens for f in finished.values())
                yield "data: " + json.dumps(shape.usage_chunk(shape.prefix + rid, created, entry.id, _usage(len(ids), produced))) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await settle()

    return MeteredStream(sse(), settle, media_type="text/event-stream",
                         headers={**headers, "cache-control": "no-cache", "x-generation-ids": ",".join(f"{rid}-{i}" for i in range(job.n))})


_BREAK = re.compile(r"[\s，。！？；：、]")
_NUMBER_TAIL = re.compile(r"[\d+\-() ]*\d[\d+\-() ]*$")


def _ready(held: str) -> tuple[str, str]:
    """(text that can be checked and sent now, text to keep holding): a trailing number may continue."""
    m = _NUMBER_TAIL.search(held)
    if m and m.start() > 0 and len(held) - m.start() < 32:
        return held[: m.start()], held[m.start():]
    if m and m.start() == 0 and len(held) < 32:
        return "", held
    return held, ""


class MeteredStream(StreamingResponse):
    """A stream whose usage is settled even if the client leaves before the first byte."""

    def __init__(self, content, settle, **kw):
        super().__init__(content, **kw)
        self._settle = settle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle()
