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

from aigc.data.chat_tokens import ToolCallParser, parse_tool_calls
from aigc.db.crud import Principal, Units
from aigc.serve.batching import Finish, Sequence
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import Generation, engine_for
from aigc.serve.registry import ModelEntry
from aigc.serve.service import Service


@dataclass
class Part:
    """One prompt of a request (completions takes a list; OpenAI answers n choices per prompt, in order)."""

    text: str  # as moderated (redacted where a redact rule matched)
    ids: list[int]
    max_tokens: int
    decision: object = None  # the input policy's decision on it


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
    messages: list[dict] | None = None  # chat through the model's template: encoded turn by turn, as in training
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # as sent: token id (a string) -> bias
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: each token's log-probability and its k most likely alternatives
    echo: bool = False  # completions: the prompt in front of the text
    grammar: object = None  # generate/grammar.py's Json (json_object), Schema (json_schema) or Tools (tool calls)
    response_format: str = "text"
    tools: list[dict] | None = None  # chat: the functions offered (rendered in the prompt; calls parsed from the answer)
    tool_choice: str = "none"  # none | auto | required | named
    prompts: list[str] | None = None  # completions: several prompts (``prompt`` is the first)

    def params(self, model: str, max_tokens: int) -> dict:
        out = {"model": model, "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p, "n": self.n,
               "stop": self.stop, "seed": self.seed, "stream": self.stream}
        for key, off in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("logit_bias", None), ("min_tokens", 0),
                         ("ignore_eos", False), ("logprobs", None), ("echo", False), ("response_format", "text"),
                         ("tool_choice", "none")):
            if getattr(self, key) not in (off, {}):
                out[key] = getattr(self, key)
        if self.tools:
            out["tools"] = [t["function"]["name"] for t in self.tools]
        return out

    def extras(self) -> list[str]:
        """The extra sampling controls this job uses (those an engine without them must refuse)."""
        used = [k for k in ("frequency_penalty", "presence_penalty", "logit_bias", "min_tokens") if getattr(self, k)]
        constrained = ["tools" if self.tools else "response_format"] if self.grammar is not None else []
        return used + (["logprobs"] if self.logprobs is not None else []) + constrained


@dataclass
class Shape:
    """How an endpoint renders results: a whole response, and stream chunks."""

    prefix: str
    # (id, created, model, [(text, finish, logprobs, tool calls or None)], usage)
    full: Callable[[str, int, str, list[tuple[str, str, dict | None, list | None]], dict], dict]
    # (id, created, model, index, text, finish, first); chat's also takes calls=[tool-call deltas]
    chunk: Callable[..., dict]
    usage_chunk: Callable[[str, int, str, dict], dict]
    # a choice's logprobs object from [(token text, logprob, [(text, logprob)])] and the text's offset (completions' echo)
    logprobs: Callable[[list[tuple[str, float, list]], int], dict]


def _token_bias(bias: dict[str, float] | None, vocab: int | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as strings, values -100..100) as ids -> bias; a bad id is a 400 naming it."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias keys are token ids, got {key!r}", code="invalid_value", param="logit_bias") from None
        if token < 0 or (vocab is not None and token >= vocab):
            raise ApiError(400, f"logit_bias: token {token} is not in this model's vocabulary (0 to {(vocab or 1) - 1})",
                           code="invalid_value", param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias values are between -100 and 100, got {value}", code="invalid_value", param="logit_bias")
        out[token] = float(value)
    return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


async def run_text(service: Service, request: Request, p: Principal, entry: ModelEntry, job: TextJob, endpoint: str, shape: Shape):
    """A completion or chat request through the lifecycle: JSON, or SSE when the job streams."""
    text = await TextGeneration.start(service, request, p, entry, job, endpoint, shape)
    return await text.respond() if not job.stream else text.stream_response()


class TextGeneration:
    """One text request's n choices, from the batching engine to the client, stage by stage."""

    def __init__(self, gen: Generation, request: Request, job: TextJob, shape: Shape, engine, parts: list[Part]):
        self.gen, self.request, self.job, self.shape = gen, request, job, shape
        self.engine, self.parts = engine, parts
        self.count = job.n * len(parts)  # choices: n per prompt, prompt by prompt
        self.prompt_tokens = sum(len(p.ids) for p in parts)
        self.max_tokens = max(p.max_tokens for p in parts)
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()  # (choice, delta, Finish | None) from the engine's thread
        self.seqs: list[Sequence] = []
        self.finished: dict[int, Finish] = {}
        self.sent: dict[int, list[str]] = {i: [] for i in range(self.count)}  # what each choice delivered
        self.filtered: dict[int, dict] = {}  # choices stopped or changed by the output policy: their decision
        self.bias: dict[int, float] | None = None  # logit_bias, checked against the model's vocabulary

    # ------------------------------------------------------------ admit, moderate, limit, hold, render

    @classmethod
    async def start(cls, service: Service, request: Request, p: Principal, entry: ModelEntry, job: TextJob, endpoint: str,
                    shape: Shape) -> TextGeneration:
        limit = service.settings.max_prompt_chars
        texts = job.prompts or [job.prompt]
        for k, t in enumerate(texts):
            if len(t) > limit:
                raise ApiError(400, f"the prompt{f' {k}' if len(texts) > 1 else ''} has {len(t)} characters; the limit is {limit}",
                               code="prompt_too_long", param="prompt")
        gen = Generation.admit(service, request, p, entry, endpoint, "text")
        moderated = []  # (prompt as the input policy lets it through, redacted where a rule matched; the decision)
        for t in texts:
            moderated.append((await gen.moderate(t), gen.input))
        engine = await engine_for(service, entry)
        where = "messages" if job.messages is not None or endpoint.startswith("chat") else "prompt"
        parts = []
        for t, (prompt, decision) in zip(texts, moderated):
            # The conversation's ids are training's (turn by turn); a prompt the input policy redacted is encoded as text.
            ids = engine.encode_chat(job.messages, job.tools) if job.messages is not None and prompt == t else engine.encode(prompt)
            room = engine.context - len(ids)
            if room < 1:  # the prompt alone fills the context: the prompt is what to change
                raise ApiError(400, f"this model's context is {engine.context} tokens and the {where} take {len(ids)}: shorten "
                               f"the {where}", code="context_length_exceeded", param=where)
            max_tokens = job.max_tokens if job.max_tokens is not None else min(job.default_max_tokens or room, room)
            if len(ids) + max_tokens > engine.context:
                raise ApiError(400, f"this model's context is {engine.context} tokens; the {where} take {len(ids)} and "
                               f"max_tokens asks for {max_tokens}: shorten the {where} or lower max_tokens (or leave it out: up "
                               "to the context)", code="context_length_exceeded", param="max_tokens")
            if job.min_tokens > max_tokens:
                raise ApiError(400, f"min_tokens ({job.min_tokens}) is more than max_tokens ({max_tokens})", code="invalid_value",
                               param="min_tokens")
            parts.append(Part(prompt, ids, max_tokens, decision))
        if job.extras() and not getattr(engine, "sampling_extras", False):
            raise ApiError(400, f"{', '.join(job.extras())}: this model's engine (not a Llama-architecture model) does not "
                           "support them", code="unsupported_parameter", param=job.extras()[0])
        bias = _token_bias(job.logit_bias, getattr(engine, "vocab", None))
        tokens_in, tokens_out = sum(len(q.ids) for q in parts), job.n * sum(q.max_tokens for q in parts)
        await gen.limit(tokens_in + tokens_out)
        await gen.hold(Units(tokens_in, tokens_out))
        text = cls(gen, request, job, shape, engine, parts)
        text.bias = bias
        text.render()
        return text

    def render(self) -> None:
        """Submit the n sequences (each watermarked with the tenant's key) to the model's batching engine."""
        job, gen = self.job, self.gen
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + gen.service.settings.request_timeout_s
        for i in range(self.count):
            def sink(delta: str, done: Finish | None, i=i) -> None:
                loop.call_soon_threadsafe(self.events.put_nowait, (i, delta, done))
            seed = None if job.seed is None else job.seed + i % job.n
            part = self.part(i)
            self.seqs.append(Sequence(part.ids, part.max_tokens, job.temperature, job.top_p, job.stop, seed, sink,
                                      deadline=deadline, text=part.text, watermark=gen.tenant.mark(),
                                      frequency_penalty=job.frequency_penalty, presence_penalty=job.presence_penalty,
                                      logit_bias=self.bias, min_tokens=job.min_tokens, ignore_eos=job.ignore_eos,
                                      logprobs=-1 if job.logprobs is None else job.logprobs,
                                      json_state=job.grammar.start() if job.grammar is not None else None,
                                      grammar=job.grammar))
        for s in self.seqs:
            self.engine.submit(s)

    def part(self, i: int) -> Part:
        """The prompt of choice i."""
        return self.parts[i // self.job.n]

    # ------------------------------------------------------------ deliver

    def deliver(self, i: int, full: str) -> str:
        """The whole output of choice i as the output policy and the takedown list let it out ("" when blocked)."""
        text, decided = self.gen.check_output(full)
        if decided is not None:
            self.filtered[i] = decided
            grammar = self.job.grammar
            if grammar is not None and text and text != full:
                from aigc.generate.grammar import walk_with

                state = walk_with(grammar, grammar.start(), text)
                if state is None or not grammar.complete(state):  # (a number redacted as [REDACTED] is not JSON)
                    self.filtered[i] = {**decided, "action": "block", "reason": "the output policy's redaction broke the JSON"}
                    return ""
        return text

    def failure(self) -> ApiError | None:
        bad = [f for f in self.finished.values() if f.reason in ("timeout", "error")]
        if not bad:
            return None
        if bad[0].reason == "timeout":
            return ApiError(504, f"generation took longer than the {self.gen.service.settings.request_timeout_s:g} s limit",
                            code="timeout")
        return ApiError(500, "the model failed while generating", code="model_error")

    def _blocked(self, i: int) -> bool:
        return self.filtered.get(i, {}).get("action") == "block"

    def _headers(self) -> dict:
        rid = self.gen.request_id
        return {**self.gen.headers, "x-generation-ids": ",".join(f"{rid}-{i}" for i in range(self.count))}

    def _usage(self) -> dict:
        return _usage(self.prompt_tokens, sum(f.completion_tokens for f in self.finished.values()))

    async def respond(self) -> JSONResponse:
        """Wait for every choice, check each whole, answer JSON."""
        job, shape, gen = self.job, self.shape, self.gen
        texts: dict[int, list[str]] = {i: [] for i in range(self.count)}
        try:
            while len(self.finished) < self.count:
                try:
                    i, delta, done = await asyncio.wait_for(self.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await self.request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                texts[i].append(delta)
                if done is not None:
                    self.finished[i] = done
            if self.failure() is None:
                for i in range(self.count):
                    self.sent[i] = [self.deliver(i, "".join(texts[i]))]
        finally:
            await self.settle()
        err = self.failure()
        if err:
            raise err
        results = []
        for i in range(self.count):
            head = self.part(i).text if job.echo else ""
            text, calls = head + "".join(self.sent[i]), None
            finish = "content_filter" if self._blocked(i) else self.finished[i].reason
            if job.tools:
                text, found = parse_tool_calls(text)
                calls = self._calls(i, found) or None
                finish = "tool_calls" if calls and finish == "stop" else finish
            results.append((text, finish, self._logprobs(i, len(head)), calls))
        return JSONResponse(shape.full(shape.prefix + gen.request_id, self.created, gen.entry.id, results, self._usage()),
                            headers=self._headers())

    def _call_id(self, i: int, k: int) -> str:
        return "call_" + hashlib.sha256(f"{self.gen.request_id}-{i}-{k}".encode()).hexdigest()[:24]

    def _calls(self, i: int, found: list[list[str]]) -> list[dict]:
        """Choice i's parsed calls in OpenAI's shape."""
        return [{"id": self._call_id(i, k), "type": "function", "function": {"name": name, "arguments": args}}
                for k, (name, args) in enumerate(found)]

    def _tool_event(self, i: int, event: tuple, first: bool) -> str:
        """A stream chunk for one of ToolCallParser's events: text, a call's head, or a piece of its arguments."""
        if event[0] == "content":
            return self._event(i, event[1], None, first)
        if event[0] == "call":
            delta = {"index": event[1], "id": self._call_id(i, event[1]), "type": "function",
                     "function": {"name": event[2], "arguments": ""}}
        else:
            delta = {"index": event[1], "function": {"arguments": event[2]}}
        chunk = self.shape.chunk(self.shape.prefix + self.gen.request_id, self.created, self.gen.entry.id, i, "", None, first,
                                 calls=[delta])
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"

    def _logprobs(self, i: int, offset: int) -> dict | None:
        """Choice i's logprobs in the endpoint's shape, for the tokens of the text that left: None when logprobs were not
        asked for, or the output policy changed the text (the tokens no longer spell it)."""
        if self.job.logprobs is None or i in self.filtered:
            return None
        entries, _, _ = self._entries(i, 0, 0, len("".join(self.sent[i])))
        return self.shape.logprobs(entries, offset)

    def _entries(self, i: int, cursor: int, spelled: int, upto: int) -> tuple[list, int, int]:
        """Choice i's (token text, logprob, alternatives) from token ``cursor`` on, while their text (``spelled``
        characters so far) stays within ``upto`` characters; and the new cursor and count."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:  # the echo stub has no tokens
            return [], cursor, spelled
        decode, entries, tokens = tokenizer.decode, [], self.seqs[i].token_logprobs
        while cursor < len(tokens):
            tok, lp, top = tokens[cursor]
            piece = decode([tok], skip_special_tokens=True)  # as the stream spells it (an <unk> adds no text)
            if spelled + len(piece) > upto:  # the rest of the text comes in a later chunk (or is past a stop string)
                break
            spelled, cursor = spelled + len(piece), cursor + 1
            entries.append((piece, lp, [(decode([t]), v) for t, v in top]))
        return entries, cursor, spelled

    def stream_response(self) -> MeteredStream:
        return MeteredStream(self.stream(), self.settle, media_type="text/event-stream",
                             headers={**self._headers(), "cache-control": "no-cache"})

    def _event(self, i: int, text: str, finish: str | None, first: bool, logprobs: dict | None = None) -> str:
        extra = {"logprobs": logprobs} if logprobs is not None else {}
        chunk = self.shape.chunk(self.shape.prefix + self.gen.request_id, self.created, self.gen.entry.id, i, text, finish, first,
                                 **extra)
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"

    async def stream(self):
        """Server-sent events: text goes out only once checked against the output policy, a word at a time."""
        job, gen = self.job, self.gen
        cut: set[int] = set()  # choices closed by the output policy
        guards = [StreamGuard(gen.check_chunk, gen.pending) for _ in range(self.count)]  # per choice: what may leave
        first = [True] * self.count
        # streamed logprobs, per choice: tokens given out, the characters they spell, the characters sent
        cursor, spelled, sent_len = [0] * self.count, [0] * self.count, [0] * self.count
        if job.tools:
            parsers = [ToolCallParser() for _ in range(self.count)]
        try:
            while len(self.finished) < self.count:
                i, delta, done = await self.events.get()
                if i in cut:
                    continue
                if done is not None:
                    self.finished[i] = done
                    if done.reason in ("timeout", "error"):
                        err = self.failure()
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'code': err.code}})}\n\n"
                        return
                out, d = guards[i].feed(delta, final=done is not None)
                if d is not None and d.blocked:
                    cut.add(i)
                    self.filtered[i] = d.to_dict()
                    self.seqs[i].cancel()
                    self.finished[i] = Finish("content_filter", len(self.part(i).ids), self.seqs[i].produced,
                                              done.compute_s if done else 0.0, "")
                    yield self._event(i, "", "content_filter", first[i])
                    continue
                if d is not None and d.action != "allow":
                    self.filtered[i] = d.to_dict()
                if out:
                    self.sent[i].append(out)
                elif done is None:
                    continue
                if job.tools:  # the text as content and tool-call deltas, then the finish on its own chunk
                    events = parsers[i].feed(out) + (parsers[i].finish() if done is not None else [])
                    for event in events:
                        yield self._tool_event(i, event, first[i])
                        first[i] = False
                    if done is not None:
                        reason = done.reason if done.reason in ("stop", "length") else None
                        yield self._event(i, "", "tool_calls" if reason == "stop" and parsers[i].calls else reason, first[i])
                        first[i] = False
                    continue
                if out or done is not None:
                    reason = done.reason if done is not None and done.reason in ("stop", "length") else None
                    lp = None
                    if job.logprobs is not None and i not in self.filtered:  # the tokens this chunk's text spells
                        head = len(self.part(i).text) if job.echo else 0
                        sent_len[i] += len(out)
                        entries, cursor[i], at = self._entries(i, cursor[i], spelled[i], sent_len[i])
                        lp, spelled[i] = self.shape.logprobs(entries, head + spelled[i]), at
                    yield self._event(i, (self.part(i).text if job.echo and first[i] else "") + out, reason, first[i], lp)
                    first[i] = False
            if job.include_usage:
                chunk = self.shape.usage_chunk(self.shape.prefix + gen.request_id, self.created, gen.entry.id, self._usage())
                yield "data: " + json.dumps(chunk) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await self.settle()

    # ------------------------------------------------------------ record, settle

    def records(self) -> list:
        """The generation log's record of each choice: what it delivered, and why it ended."""
        gen, tenant = self.gen, self.gen.tenant
        params = self.job.params(gen.entry.id, self.max_tokens)
        mark = tenant.mark()
        wm = {"scheme": "green-list", "gamma": mark.gamma, "delta": mark.delta} if mark else None
        filters = gen.filters(f"pii-at-rest:{tenant.policy['pii']}", *(["watermark:text"] if mark else []))
        recs = []
        for i in range(self.count):
            out = "".join(self.sent[i])
            f = self.finished.get(i)
            status = "blocked" if self._blocked(i) else \
                ("delivered" if f is not None and f.reason in ("stop", "length") else (f.reason if f else "cancelled"))
            recs.append(gen.record(f"{gen.request_id}-{i}", params=params, output_sha256=hashlib.sha256(out.encode()).hexdigest(),
                                   output=out, watermark=wm, output_decision=self.filtered.get(i), filters=filters, status=status,
                                   prompt=self.part(i).text, input_decision=self.part(i).decision))
        return recs

    async def settle(self) -> None:
        """Free the engine's slots and charge the tokens produced, once (also when the client left or the model failed)."""
        if self.gen.settled is not None:
            return
        for s in self.seqs:
            s.cancel()  # no-op for finished ones; frees the slots of the rest
        fin = self.finished
        produced = sum(f.completion_tokens for f in fin.values()) + sum(s.produced for i, s in enumerate(self.seqs) if i not in fin)
        reasons = {f.reason for f in fin.values()}
        status = "ok" if len(fin) == self.count and reasons <= {"stop", "length", "content_filter"} else \
            next((r for r in ("error", "timeout") if r in reasons), "cancelled")
        await self.gen.settle(status, Units(self.prompt_tokens, produced), sum(f.compute_s for f in fin.values()), self.records())


_BREAK = re.compile(r"[\s，。！？；：、]")


class StreamGuard:
    """The output policy on one streamed choice: text leaves a word at a time, only once checked, and fails closed.

    Text is checked and sent when a space or CJK punctuation arrives, after 32 characters without one, and at the
    end. Held back (until more text settles it) are: a number that may go on across spaces (a phone or card
    number, so it is redacted whole), and whatever a block or redact rule may still match once more text comes
    (``pending``: a rule of several words whose first words have arrived). A redaction that would change text
    already sent (a match the hold could not foresee) closes the stream instead, as a block does.
    """

    WINDOW = 256  # characters of sent text checked again with the new text, for matches across the boundary

    def __init__(self, check, pending):
        self.check, self.pending = check, pending  # text -> moderation Decision; text -> index where a match may begin
        self.sent, self.held = "", ""

    def feed(self, delta: str, final: bool = False):
        """(text that may leave now, the policy's decision on it or None when nothing was checked)."""
        self.held += delta
        if not final and len(self.held) < 32 and not _BREAK.search(delta):
            return "", None
        out, rest = (self.held, "") if final else _ready(self.held)
        tail = self.sent[-self.WINDOW:]
        if not final and out:
            at = self.pending(tail + out)  # a match may begin there: hold from it on
            keep = max(0, at - len(tail))
            out, rest = out[:keep], out[keep:] + rest
        self.held = rest
        if not out:
            return "", None
        d = self.check(tail + out)
        if d.action == "redact":
            if not d.text.startswith(tail):  # the match reaches into text already sent: fail closed
                d.action = "block"
                return "", d
            out = d.text[len(tail):]
        if d.blocked:
            return "", d
        self.sent += out
        return out, d
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
