"""Continuous (iteration-level) batching for text models.

One engine per loaded text model owns a KV cache of ``max_batch`` slots and a worker thread. Each
iteration it admits waiting requests into free slots (a prefill per request), then advances every
active sequence by one token in a single batched decode step: rows sit at different positions, so
RoPE angles, cache writes and the attention mask are gathered per row. A sequence leaves the batch
the moment it finishes, is cancelled (client gone) or times out, and its slot is reused at once; so
aggregate tokens/s grows with the number of concurrent streams while a lone stream pays nothing extra.

Events go back to the caller through ``sink(delta, done)`` from the worker thread; the server wraps
that in ``loop.call_soon_threadsafe``.
"""
from __future__ import annotations

import logging
import heapq
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from aigc import threads
from aigc.data.chat_tokens import encode_chat
from aigc.generate.text import LlamaDecoder, SamplingParams, TextGenerator, _Stream
from aigc.govern import text_watermark
from aigc.govern.text_watermark import Watermark

log = logging.getLogger(__name__)


@dataclass
class Finish:
    reason: str  # stop | length | cancelled | timeout | error
    prompt_tokens: int
    completion_tokens: int
    compute_s: float
    text: str
    error: str = ""


@dataclass
class Sequence:
    """One sampled completion in flight. ``cancel()`` may be called from any thread."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    sink: Callable[[str, Finish | None], None]
    deadline: float = float("inf")
    cancelled: bool = False
    compute_s: float = 0.0
    slot: int = -1
    stream: _Stream | None = None
    generator: torch.Generator | None = None
    produced: int = 0
    last: int = 0  # the token fed to the next decode step
    text: str = ""  # the prompt as text (engines that work on text, not ids)
    watermark: Watermark | None = None  # green-list key of the tenant; None: no watermark
    # OpenAI's and vLLM's extra sampling controls; a row that uses none of them costs nothing more (see _adjust)
    frequency_penalty: float = 0.0  # minus this times how often a token appeared in the output so far
    presence_penalty: float = 0.0  # minus this once a token has appeared in the output
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100 bans, +100 forces)
    min_tokens: int = 0  # the end-of-text token cannot be drawn before this many tokens
    ignore_eos: bool = False  # the end-of-text token is never drawn: the sequence runs to max_tokens or a stop string
    json_state: tuple | None = None  # response_format: the grammar's state (generate/grammar.py)
    grammar: object = None  # grammar.Json (json_object) or grammar.Schema (json_schema)
    logprobs: int = -1  # -1: off; k >= 0: each drawn token's log-probability and the k most likely alternatives
    token_logprobs: list = field(default_factory=list)  # (token, logprob, [(token, logprob)] * k) per emitted token
    _pending: tuple | None = None  # the drawn token's entry, appended when it is emitted (not for the end of text)
    _bias: tuple | None = None  # logit_bias as (ids, values) tensors, made once
    _counts: torch.Tensor | None = None  # with penalties: how often each token of the vocabulary is in the output so far

    def adjusts(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias or self.ignore_eos
                    or self.produced < self.min_tokens or self.json_state is not None)

    def cancel(self) -> None:
        self.cancelled = True


class TextEngine:
    """Batched decoding of many independent sequences over one Llama-architecture model."""

    sampling_extras = True  # penalties, logit_bias, min_tokens (see Sequence)

    def __init__(self, generator: TextGenerator, max_batch: int = 32, context: int = 1024, name: str = "model"):
        if not generator.fast:
            raise ValueError("continuous batching needs a Llama-architecture model")
        self.name = name
        self.tokenizer = generator.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.vocab = generator.model.config.vocab_size
        dec: LlamaDecoder = generator.decoder
        self.dec = dec
        self._json_mask = None
        self.S, self.L = max_batch, min(context, dec.window)
        dec.start(1, self.L)  # computes the RoPE tables for L positions (its own 1-row cache is unused)
        self.cos, self.sin = dec.cos, dec.sin  # (L, heads, hd)
        nkv, hd = dec.n_kv, dec.head_dim
        # A static cache, allocated once on the model's device: S rows of L positions. Sampling runs on the CPU
        # on each step's last logits (see TextGenerator).
        self.device = dev = dec.device
        self.kv = [torch.zeros(self.S, 2 * nkv, self.L, hd, dtype=dec.dtype, device=dev) for _ in dec.layers]
        self.bias = torch.full((self.S, 1, 1, self.L), float("-inf"), dtype=dec.dtype, device=dev)
        self.bias[:, 0, 0, 0] = 0.0  # idle rows attend to slot 0 so they never produce NaN
        self.pos = torch.zeros(self.S, dtype=torch.long, device=dev)
        self.slots: list[Sequence | None] = [None] * self.S
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self.running = True
        self.tokens_out = 0
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ API

    @property
    def context(self) -> int:
        return self.L

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids or [self.eos]

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A conversation's prompt ids through the model's chat template, exactly as SFT training encoded it."""
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True, tools=tools).input_ids

    def submit(self, seq: Sequence) -> Sequence:
        if len(seq.prompt_ids) + seq.max_tokens > self.L:
            raise ValueError(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.max_tokens}) exceeds the context of {self.L}")
        self.waiting.put(seq)
        return seq

    def queue_depth(self) -> int:
        return self.waiting.qsize()

    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def close(self) -> None:
        self.running = False
        self.waiting.put(None)  # type: ignore[arg-type]
        self.thread.join(timeout=10)

    # ------------------------------------------------------------ worker

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while self.running:
            try:
                self._admit(block=self.active() == 0)
                if self.active():
                    try:
                        self._step()
                    except Exception as exc:
                        self._isolate(exc)
            except Exception as exc:  # a bug must not leave clients hanging: fail everything in flight
                log.exception("text engine %s failed", self.name)
                for r, seq in enumerate(self.slots):
                    if seq is not None:
                        self._finish(r, "error", error=str(exc))

    def _isolate(self, exc: Exception) -> None:
        """A batch step failed (the model raised, or ran out of memory for the whole batch): each sequence takes that
        step on its own. Those that fail alone end with an error; the others go on in the next batch.

        Safe to repeat: a step writes each row's keys and values at its current position and advances the position
        only when it succeeds; the rows set aside meanwhile are written again at their next step."""
        log.warning("text engine %s: a batch step failed (%s: %s); stepping each sequence alone", self.name,
                    type(exc).__name__, exc)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for r in [r for r, seq in enumerate(self.slots) if seq is not None]:
            if self.slots[r] is None:
                continue
            batch = self.slots
            self.slots = [seq if i == r else None for i, seq in enumerate(batch)]
            error = None
            try:
                self._step()
            except Exception as e:
                error = e
            alone, self.slots = self.slots[r], batch
            self.slots[r] = alone  # None if it finished in its step
            if error is not None:
                log.exception("text engine %s: a sequence failed", self.name, exc_info=error)
                self._finish(r, "error", error=f"{type(error).__name__}: {error}")

    def _admit(self, block: bool) -> None:
        while None in self.slots:
            try:
                seq = self.waiting.get(timeout=0.5) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            if seq is None:  # close()
                return
            block = False
            if seq.cancelled:
                seq.sink("", Finish("cancelled", len(seq.prompt_ids), 0, 0.0, ""))
                continue
            r = self.slots.index(None)
            try:
                self._prefill(r, seq)
            except Exception as exc:  # this prompt alone fails; the batch goes on
                log.exception("text engine %s: a prefill failed", self.name)
                if self.slots[r] is seq:
                    self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")
                else:
                    seq.sink("", Finish("error", len(seq.prompt_ids), 0, 0.0, "", f"{type(exc).__name__}: {exc}"))

    @torch.inference_mode()
    def _prefill(self, r: int, seq: Sequence) -> None:
        t0 = time.perf_counter()
        dec = self.dec
        nh, nkv, hd = dec.n_head, dec.n_kv, dec.head_dim
        heads = nh + 2 * nkv
        ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)[None]  # (1, T)
        T = ids.shape[1]
        cos, sin = self.cos[:T], self.sin[:T]
        x = dec.embed[ids]  # (1, T, C)
        for i, (w_qkv, w_o, w_gu, w_down) in enumerate(dec.layers):
            qkv = (dec._norm(x) @ w_qkv).view(1, T, heads, hd)
            qkv = (qkv * cos + (qkv @ dec.rot) * sin).transpose(1, 2)  # (1, heads, T, hd)
            kv = self.kv[i][r : r + 1, :, :T]
            kv.copy_(qkv[:, nh:])
            att = torch.nn.functional.scaled_dot_product_attention(
                qkv[:, :nh], kv[:, :nkv], kv[:, nkv:], is_causal=True, enable_gqa=nh != nkv, scale=1.0)  # (1, nh, T, hd)
            x = x + att.transpose(1, 2).reshape(1, T, nh * hd) @ w_o
            gate, up = (dec._norm(x) @ w_gu).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ w_down
        logits = (dec._norm(x[:, -1]) @ dec.head).float().cpu()  # (1, V)
        self.bias[r] = float("-inf")
        self.bias[r, 0, 0, :T] = 0.0
        self.pos[r] = T
        seq.slot = r
        seq.stream = _Stream(self.tokenizer, seq.stop)
        seed = seq.seed if seq.seed is not None else secrets.randbelow(2**31)
        seq.generator = torch.Generator().manual_seed(seed)
        self.slots[r] = seq
        seq.compute_s += time.perf_counter() - t0
        self._emit(torch.tensor([r]), self._sample(logits, [seq]))

    @torch.inference_mode()
    def _step(self) -> None:
        threads.adapt()
        t0 = time.perf_counter()
        rows = [r for r, s in enumerate(self.slots) if s is not None]
        R = rows[-1] + 1  # rows 0..R-1: slots are filled lowest first, so this is a view, never a copy
        dec = self.dec
        nh, nkv, hd = dec.n_head, dec.n_kv, dec.head_dim
        heads, group = nh + 2 * nkv, nh // nkv
        pos = self.pos[:R]
        span = int(pos.max()) + 1  # attend over the used prefix of the cache only
        last = [0] * R
        for r in rows:
            last[r] = self.slots[r].last  # type: ignore[union-attr]
        toks = torch.tensor(last, dtype=torch.long, device=self.device)
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (R, heads, 1, hd)
        ar = torch.arange(R, device=self.device)
        self.bias[ar, 0, 0, pos] = 0.0
        bias = self.bias[:R, :, :, :span]
        x = dec.embed[toks]  # (R, C)
        for i, (w_qkv, w_o, w_gu, w_down) in enumerate(dec.layers):
            qkv = (dec._norm(x) @ w_qkv).view(R, heads, 1, hd)
            qkv = qkv * cos + (qkv @ dec.rot) * sin
            kv = self.kv[i]
            kv[ar, :, pos] = qkv[:, nh:, 0]  # each row writes its own position
            k, v = kv[:R, :nkv, :span], kv[:R, nkv:, :span]
            q = qkv[:, :nh].view(R, nkv, group, hd)
            # the group's queries as SDPA's query length (the bias masks empty and other rows' slots)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (R, nkv, group, hd)
            x = torch.addmm(x, att.view(R, nh * hd), w_o)
            gate, up = (dec._norm(x) @ w_gu).chunk(2, dim=-1)
            x = torch.addmm(x, torch.nn.functional.silu(gate) * up, w_down)
        logits = (dec._norm(x) @ dec.head).float().cpu()  # (R, V)
        idx = torch.tensor(rows)
        seqs = [self.slots[r] for r in rows]
        tokens = self._sample(logits[idx], seqs)  # type: ignore[arg-type]
        self.pos[idx.to(self.device)] += 1  # only once the step has succeeded (``_isolate`` may take it again)
        share = (time.perf_counter() - t0) / len(rows)
        for s in seqs:
            s.compute_s += share  # type: ignore[union-attr]
        self._emit(idx, tokens)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next token per row: greedy at temperature 0, else top-p sampling with each row's own seeded generator.
        Rows that ask for logprobs get those of the model's distribution (with their penalties and logit_bias, before
        the watermark, temperature and top-p)."""
        logits = logits[:, : self.vocab].float()
        if any(s.adjusts() for s in seqs):
            logits = self._adjust(logits, seqs)
        wanted = [r for r, s in enumerate(seqs) if s.logprobs >= 0]
        logp = logits[wanted].log_softmax(-1) if wanted else None
        tokens = self._draw(logits, seqs)
        if wanted:  # one gather and one topk for all these rows (each keeps its own k)
            drawn = tokens[wanted]
            chosen = logp.gather(1, drawn[:, None]).squeeze(1).tolist()
            k = min(max(seqs[r].logprobs for r in wanted), logp.shape[1])
            top = logp.topk(k) if k else None
            top_i, top_v = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
            for j, (r, tok) in enumerate(zip(wanted, drawn.tolist())):
                n = seqs[r].logprobs
                seqs[r]._pending = (tok, chosen[j], list(zip(top_i[j][:n], top_v[j][:n])) if n else [])
        return tokens

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        marks = [s.watermark for s in seqs]
        if any(marks):
            logits = text_watermark.bias(logits, marks, [s.prompt_ids[-8:] + s.stream.ids[-8:] for s in seqs])  # type: ignore[union-attr]
        temp = torch.tensor([s.temperature for s in seqs])
        greedy = logits.argmax(-1)
        if bool((temp == 0).all()):
            return greedy
        logits = logits / temp.clamp_min(1e-6)[:, None]
        top_p = torch.tensor([s.top_p for s in seqs])
        if bool((top_p < 1).any()):
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            p = sorted_logits.softmax(-1)
            drop = p.cumsum(-1) - p >= top_p[:, None]  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        cdf = logits.softmax(-1).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=s.generator) for s in seqs])  # type: ignore[arg-type]
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp_max(cdf.shape[1] - 1)
        return torch.where(temp == 0, greedy, drawn)

    def _adjust(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties, logit bias and the end-of-text rules, row by row, for the rows that ask for them."""
        logits = logits.clone()
        pen = [r for r, s in enumerate(seqs) if s._counts is not None]
        if pen:  # the penalties of all these rows in one operation, from counts kept as tokens are emitted
            counts = torch.stack([seqs[r]._counts for r in pen])  # type: ignore[misc]  # (P, V)
            freq = torch.tensor([seqs[r].frequency_penalty for r in pen])[:, None]
            pres = torch.tensor([seqs[r].presence_penalty for r in pen])[:, None]
            logits[pen] -= freq * counts + pres * (counts > 0)
        for r, s in enumerate(seqs):
            if not s.adjusts():
                continue
            if s.logit_bias:
                if s._bias is None:
                    s._bias = (torch.tensor(list(s.logit_bias), dtype=torch.long), torch.tensor(list(s.logit_bias.values())))
                logits[r, s._bias[0]] += s._bias[1]
            if self.eos is not None and (s.ignore_eos or s.produced < s.min_tokens) and 0 <= self.eos < logits.shape[1]:
                logits[r, self.eos] = float("-inf")
        constrained = [r for r, s in enumerate(seqs) if s.json_state is not None]
        if constrained:  # only tokens that keep the text valid (the end of text once it is whole), all rows at once
            allowed = torch.stack([self.json_mask().allowed(seqs[r].json_state, seqs[r].grammar)[: logits.shape[1]]
                                   for r in constrained])  # (C, V)
            rows = logits[constrained].masked_fill(~allowed, float("-inf"))
            dead = torch.isinf(rows).all(-1)  # a logit_bias of -100 banned every valid token: the grammar wins
            rows = torch.where(dead[:, None], torch.zeros_like(rows).masked_fill(~allowed, float("-inf")), rows)
            logits[constrained] = rows
        return logits

    def json_mask(self):
        """The JSON token mask of this model's vocabulary (built on first use, about half a second for 49k tokens)."""
        if self._json_mask is None:
            from aigc.generate.grammar import TokenMask

            self._json_mask = TokenMask.for_tokenizer(self.tokenizer)
        return self._json_mask

    def _emit(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        now = time.monotonic()
        for r, tok in zip(rows.tolist(), tokens.tolist()):
            seq = self.slots[r]
            assert seq is not None and seq.stream is not None
            seq.last = tok
            if seq.cancelled:
                self._finish(r, "cancelled")
                continue
            if now > seq.deadline:
                self._finish(r, "timeout")
                continue
            if tok == self.eos:
                self._finish(r, "stop", seq.stream.finish("stop"))
                continue
            if seq._pending is not None:
                seq.token_logprobs.append(seq._pending)
                seq._pending = None
            if seq.json_state is not None:
                from aigc.generate import grammar

                # (None cannot happen for a token the mask allowed; if it did, only the end of text may follow)
                seq.json_state = grammar.walk_with(seq.grammar, seq.json_state, self.json_mask().pieces[tok]) or seq.grammar.end
                if seq.grammar.free(seq.json_state):
                    seq.json_state = None  # tools, auto: the model answered in text; nothing to constrain from here on
            if seq.frequency_penalty or seq.presence_penalty:
                if seq._counts is None:
                    seq._counts = torch.zeros(self.vocab)
                seq._counts[tok] += 1
            seq.produced += 1
            self.tokens_out += 1
            delta = seq.stream.push(tok)
            if seq.stream.done:
                self._finish(r, "stop", delta)
            elif seq.produced >= seq.max_tokens:
                self._finish(r, "length", delta + seq.stream.finish("length"))
            elif delta:
                seq.sink(delta, None)

    def _finish(self, r: int, reason: str, delta: str = "", error: str = "") -> None:
        seq = self.slots[r]
        assert seq is not None
        self.slots[r] = None
        self.bias[r] = float("-inf")
        self.bias[r, 0, 0, 0] = 0.0
        self.pos[r] = 0
        text = seq.stream.text if seq.stream else ""
        seq.sink(delta, Finish(reason, len(seq.prompt_ids), seq.produced, seq.compute_s, text, error))


class SerialTextEngine:
    """Any other causal LM (no lean decoder): one sequence at a time through ``TextGenerator.stream``."""

    sampling_extras = False  # only ignore_eos of the extra sampling controls

    def __init__(self, generator: TextGenerator, name: str = "model"):
        self.gen, self.name = generator, name
        self.tokenizer = generator.tokenizer
        self.context = generator.context
        self.waiting: queue.Queue[Sequence | None] = queue.Queue()
        self.busy = 0
        self.tokens_out = 0
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.thread.start()

    def encode(self, text: str) -> list[int]:
        return self.gen.encode(text)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.gen.encode_chat(messages, tools)

    def submit(self, seq: Sequence) -> Sequence:
        if len(seq.prompt_ids) + seq.max_tokens > self.context:
            raise ValueError(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.max_tokens}) exceeds the context of {self.context}")
        self.waiting.put(seq)
        return seq

    def queue_depth(self) -> int:
        return self.waiting.qsize()

    def active(self) -> int:
        return self.busy

    def close(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while (seq := self.waiting.get()) is not None:
            self.busy = 1
            t0, produced, text, reason = time.perf_counter(), 0, "", "error"
            try:
                params = SamplingParams(max_new_tokens=seq.max_tokens, temperature=seq.temperature, top_p=seq.top_p,
                                        stop=seq.stop, seed=seq.seed, watermark=seq.watermark, ignore_eos=seq.ignore_eos)
                for _, delta, done in self.gen.stream([seq.text], params):
                    if seq.cancelled or time.monotonic() > seq.deadline:
                        reason = "cancelled" if seq.cancelled else "timeout"
                        break
                    produced += 1  # at least one token per delta; exact once the sequence is done
                    if delta:
                        seq.sink(delta, None)
                    if done is not None:
                        produced, text, reason = done.completion_tokens, done.text, done.finish_reason
                self.tokens_out += produced
                seq.sink("", Finish(reason, len(seq.prompt_ids), produced, time.perf_counter() - t0, text))
            except Exception as exc:
                log.exception("text engine %s failed", self.name)
                seq.sink("", Finish("error", len(seq.prompt_ids), produced, time.perf_counter() - t0, text, str(exc)))
            self.busy = 0


class EchoEngine:
    """A stub text model that answers with the prompt's words: measures the gateway alone. With ``token_ms`` it writes
    a word every ``token_ms`` milliseconds (one scheduler thread for all its sequences), so streams last."""

    context = 1_000_000
    sampling_extras = True  # accepted, and meaningless for an echo

    def __init__(self, token_ms: float = 0.0):
        self.tokens_out = 0
        self.delay = token_ms / 1000.0
        self._due: list = []  # (when, n, seq, words, next index)
        self._n = 0
        self._cv = threading.Condition()
        self._open = True
        if self.delay:
            threading.Thread(target=self._loop, name="engine-echo", daemon=True).start()

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()] or [0]

    def submit(self, seq: Sequence) -> Sequence:
        words = seq.text.split() or ["echo"]
        out = [words[i % len(words)] for i in range(seq.max_tokens)]
        self.tokens_out += len(out)
        if not self.delay or not out:
            seq.sink(" ".join(out), Finish("length", len(seq.prompt_ids), len(out), 0.0, " ".join(out)))
            return seq
        with self._cv:
            self._n += 1
            heapq.heappush(self._due, (time.monotonic() + self.delay, self._n, seq, out, 0))
            self._cv.notify()
        return seq

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._open and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cv.wait(max(0.0, self._due[0][0] - time.monotonic()) if self._due else None)
                if not self._open:
                    return
                when, n, seq, out, i = heapq.heappop(self._due)
            if seq.cancelled:
                seq.sink("", Finish("cancelled", len(seq.prompt_ids), i, 0.0, " ".join(out[:i])))
                continue
            piece = (" " if i else "") + out[i]
            if i + 1 == len(out):
                seq.sink(piece, Finish("length", len(seq.prompt_ids), len(out), 0.0, " ".join(out)))
                continue
            seq.sink(piece, None)
            with self._cv:
                heapq.heappush(self._due, (when + self.delay, n, seq, out, i + 1))

    def queue_depth(self) -> int:
        return 0

    def active(self) -> int:
        return len(self._due)

    def close(self) -> None:
        with self._cv:
            self._open = False
            self._cv.notify()
