"""Text generation: an inference-only pipeline over a trained run (or any local HF causal LM).

``TextGenerator`` batches prompts (left-padded), prefills them, then decodes with a KV cache:

- Llama-architecture models (what ``aigc train text`` writes, SmolLM2, ...) run on a lean decoder
  written here: fused QKV and gate/up matrices, a preallocated ring-buffer KV cache, one SDPA call
  per layer. Per-token Python overhead is what limits small models on a CPU, so this is several times
  faster than calling the HF model per token (numbers in benchmarks/text_lm.py). Its logits are
  checked against the HF model in the tests.
- Any other causal LM runs through its own HF forward with a ``DynamicCache``.

Sampling: temperature, top-k, top-p, repetition penalty, stop strings, EOS, ``n`` samples and a seed
(sample ``i`` of a request uses seed + i, so a seed reproduces its output). Past the model's context
the cache slides: the oldest positions are dropped (RoPE keeps attention relative, so this is the
sliding-window attention of Mistral-style models rather than an extrapolation).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from aigc import threads
from aigc.errors import UserError
from aigc.govern import text_watermark
from aigc.govern.text_watermark import Watermark
from aigc.run import model_folder


@dataclass
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the prompt or output
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    watermark: Watermark | None = None  # green-list watermark (aigc.govern.text_watermark); None: off

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise UserError(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    index: int = 0


# ---------------------------------------------------------------- decoders

class LlamaDecoder:
    """A minimal Llama forward for inference with a preallocated ring-buffer KV cache.

    Per-token cost on a CPU is dominated by operator dispatch, so the layout minimises operators:
    RMSNorm weights (and the sqrt(C) of the RMS) are folded into the following matrices, Q/K/V and
    gate/up are single matmuls, RoPE is applied to Q, K and V at once (V's rotation is the identity),
    and K and V share one cache tensor written by one copy. RMSNorm's epsilon becomes a tiny
    ``hypot``; logits match the HF model to ~1e-6 (tested).

    It runs on the device the model is on: the weights it keeps are the model's own tensors there, and every
    buffer it makes (cache, masks, RoPE tables) is created on that device.
    """

    @staticmethod
    def supports(model) -> bool:
        c = model.config
        return (getattr(c, "model_type", "") == "llama" and not getattr(c, "attention_bias", False)
                and not getattr(c, "mlp_bias", False) and getattr(c, "hidden_act", "silu") == "silu"
                and hasattr(model, "model") and hasattr(model.model, "rotary_emb"))

    def __init__(self, model):
        c = model.config
        self.n_head = c.num_attention_heads
        self.n_kv = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.window = c.max_position_embeddings
        self.dtype = model.dtype
        self.device = model.model.embed_tokens.weight.device
        self.rotary = model.model.rotary_emb
        m = model.model
        C = c.hidden_size
        self.C = C
        # rms(x) * sqrt(C) = sqrt(sum x^2 + C*eps) = hypot(||x||, sqrt(C*eps)): exact, in three operators.
        self.eps_root = torch.tensor((c.rms_norm_eps * C) ** 0.5, dtype=self.dtype, device=self.device)
        root = C**0.5

        def fold(norm_weight, *linears):  # (x / ||x||) @ fold(...) == rmsnorm(x) @ W.T
            w = torch.cat([lin.weight for lin in linears]).detach()  # (out, C)
            return (w * (norm_weight.detach() * root)).t().contiguous()  # (C, out)

        self.embed = m.embed_tokens.weight.detach()
        self.layers = []
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            w_qkv = fold(layer.input_layernorm.weight, a.q_proj, a.k_proj, a.v_proj)  # (C, (nh+2kv)*hd)
            w_qkv[:, : self.n_head * self.head_dim] *= self.head_dim**-0.5  # attention's scale, folded into Q
            self.layers.append((
                w_qkv,
                a.o_proj.weight.detach().t().contiguous(),  # (nh*hd, C)
                fold(layer.post_attention_layernorm.weight, f.gate_proj, f.up_proj),  # (C, 2F)
                f.down_proj.weight.detach().t().contiguous(),  # (F, C)
            ))
        self.head = fold(m.norm.weight, model.lm_head)  # (C, V)
        hd = self.head_dim
        # rotate_half(x) == x @ P: one matmul instead of slice/negate/concatenate.
        P = torch.zeros(hd, hd, dtype=self.dtype, device=self.device)
        half = hd // 2
        P[half:, :half] = -torch.eye(half, device=self.device)
        P[:half, half:] = torch.eye(half, device=self.device)
        self.rot = P

    def start(self, batch: int, length: int) -> None:
        nh, nkv, hd = self.n_head, self.n_kv, self.head_dim
        self.size = min(length, self.window)
        dev = self.device
        self.kv = [torch.zeros(batch, 2 * nkv, self.size, hd, dtype=self.dtype, device=dev) for _ in self.layers]
        self.valid = torch.zeros(batch, self.size, dtype=torch.bool, device=dev)
        self.bias = torch.full((batch, 1, 1, self.size), float("-inf"), dtype=self.dtype, device=dev)  # 0 where a slot is valid
        self.pos = 0
        positions = torch.arange(length, device=dev)
        cos, sin = self.rotary(self.embed[:1], positions[None])  # the model's own RoPE, scaling included
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # (L, hd)
        heads = nh + 2 * nkv
        is_v = torch.zeros(heads, 1, dtype=torch.bool, device=dev)
        is_v[nh + nkv :] = True
        self.cos = torch.where(is_v, 1.0, cos[:, None, :]).to(self.dtype)  # (L, heads, hd): V is not rotated
        self.sin = torch.where(is_v, 0.0, sin[:, None, :]).to(self.dtype)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.eps_root)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) at positions pos..pos+T-1; pad (B, T) marks left padding. Returns last logits (B, V)."""
        B, T = tokens.shape
        if T == 1:
            return self._step(tokens[:, 0])
        nh, nkv, hd = self.n_head, self.n_kv, self.head_dim
        heads = nh + 2 * nkv
        cos, sin = self.cos[self.pos : self.pos + T], self.sin[self.pos : self.pos + T]  # (T, heads, hd)
        # Prefill (no wrap: prompts are cut to the context): causal, plus the diagonal so padded queries stay finite.
        index = slice(self.pos, self.pos + T)
        self.valid[:, index] = True if pad is None else ~pad
        self.bias[:, 0, 0, index] = torch.where(self.valid[:, index], 0.0, float("-inf"))
        dev = self.device
        mask = torch.zeros(B, 1, T, self.size, dtype=torch.bool, device=dev)
        mask[:, 0, :, index] = torch.ones(T, T, dtype=torch.bool, device=dev).tril() & self.valid[:, None, index]
        mask[:, 0, torch.arange(T, device=dev), torch.arange(self.pos, self.pos + T, device=dev)] = True
        x = self.embed[tokens]  # (B, T, C)
        for i, (w_qkv, w_o, w_gu, w_down) in enumerate(self.layers):
            qkv = (self._norm(x) @ w_qkv).view(B, T, heads, hd)
            qkv = (qkv * cos + (qkv @ self.rot) * sin).transpose(1, 2)  # (B, heads, T, hd)
            kv = self.kv[i]
            kv[:, :, index] = qkv[:, nh:]
            att = F.scaled_dot_product_attention(qkv[:, :nh], kv[:, :nkv], kv[:, nkv:], attn_mask=mask,
                                                 enable_gqa=nh != nkv, scale=1.0)  # (B, nh, T, hd)
            x = x + att.transpose(1, 2).reshape(B, T, nh * hd) @ w_o
            gate, up = (self._norm(x) @ w_gu).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w_down
        self.pos += T
        return self._norm(x[:, -1]) @ self.head  # (B, V)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for tokens (B,): 2-D activations, fused residual adds, one attention call per layer."""
        B = tokens.shape[0]
        nh, nkv, hd = self.n_head, self.n_kv, self.head_dim
        heads, group = nh + 2 * nkv, nh // nkv
        cos, sin = self.cos[self.pos, :, None], self.sin[self.pos, :, None]  # (heads, 1, hd)
        slot = self.pos % self.size
        self.bias[..., slot] = 0.0
        x = self.embed[tokens]  # (B, C)
        for i, (w_qkv, w_o, w_gu, w_down) in enumerate(self.layers):
            qkv = (self._norm(x) @ w_qkv).view(B, heads, 1, hd)
            qkv = qkv * cos + (qkv @ self.rot) * sin
            kv = self.kv[i]
            kv[:, :, slot : slot + 1] = qkv[:, nh:]
            q = qkv[:, :nh].view(B, nkv, group, hd)  # query heads grouped by their KV head
            # the group's queries as SDPA's query length: one fused call, no causal mask (the bias masks empty slots)
            att = F.scaled_dot_product_attention(q, kv[:, :nkv], kv[:, nkv:], attn_mask=self.bias, scale=1.0)  # (B, nkv, group, hd)
            x = torch.addmm(x, att.view(B, nh * hd), w_o)
            gate, up = (self._norm(x) @ w_gu).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, w_down)
        self.pos += 1
        return self._norm(x) @ self.head  # (B, V)


def cache_arg(model) -> str:
    """The name of ``model.forward``'s KV-cache argument: ``cache`` in newer transformers (where
    ``past_key_values`` warns on every call), ``past_key_values`` before. The cache is updated in place either way."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFDecoder:
    """Any causal LM through its own forward and a DynamicCache (general, slower per token)."""

    def __init__(self, model):
        self.model = model
        self.window = getattr(model.config, "max_position_embeddings", 2048)
        self.device = model.device

    def start(self, batch: int, length: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.cache_arg = {cache_arg(self.model): self.cache}
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        B, T = tokens.shape
        new = torch.ones(B, T, dtype=torch.long, device=self.device) if pad is None else (~pad).long()
        self.mask = torch.cat([self.mask, new], dim=1)
        pos = (self.positions[:, None] + new.cumsum(1) - 1).clamp_min(0)
        self.positions = pos[:, -1] + 1
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=pos, use_cache=True, **self.cache_arg)
        return out.logits[:, -1].float()


# ---------------------------------------------------------------- sampling

def apply_sampling(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Turn raw logits (B, V) into filtered logits; -inf marks tokens that cannot be drawn."""
    logits = logits.float()
    if seen is not None and p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.temperature == 0:
        return logits
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


class _Stream:
    """Incremental detokenisation for one sequence: whole characters only, stop strings honoured."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        # The Rust tokenizer directly: the Python wrapper's decode costs more than a decoder step here.
        self.backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters already handed out
        self.text = ""
        self.done = False
        self.reason = "length"

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.backend.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            cut = text.find(s, max(0, self.emitted - len(s)))
            if cut != -1:
                self.text, self.done, self.reason = text[:cut], True, "stop"
                return self._flush()
        self.text = text
        # Hold back a partial UTF-8 character and anything that could be the start of a stop string.
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        delta, self.emitted = text[self.emitted : safe], max(self.emitted, safe)
        return delta

    def _flush(self) -> str:
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta

    def finish(self, reason: str) -> str:
        self.done, self.reason = True, reason
        return self._flush()


class TextGenerator:
    """Inference pipeline for one causal LM and its tokenizer, on the device the model is on. The decoder's forward
    runs there; sampling (the filters, the watermark, each sequence's seeded generator) runs on the CPU on the
    last logits, so a seed draws the same text on every device, up to the device's float rounding."""

    def __init__(self, model, tokenizer, fast: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fast = fast and LlamaDecoder.supports(model)
        self.decoder = LlamaDecoder(model) if self.fast else HFDecoder(model)
        self.device = self.decoder.device
        self.context = self.decoder.window

    @classmethod
    def from_path(cls, path: str | Path, fast: bool = True, device: str | torch.device = "cpu") -> "TextGenerator":
        """Load a run directory or model folder onto ``device`` (a name as ``--device`` takes it, or a torch device)."""
        from aigc import devices

        target = devices.as_device(device)
        model, tokenizer = load_model(path)
        return cls(model.to(target), tokenizer, fast=fast)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's ids (a list of ids passes through), cut to the context from the left."""
        ids = prompt if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:  # an empty prompt starts a new document
            ids = [self.tokenizer.eos_token_id]
        return ids[-self.context :]

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt ids of a conversation (and the tools it offers), exactly as training encoded it, up to the
        assistant's header."""
        from aigc.data.chat_tokens import encode_chat, ensure_chat_template

        ensure_chat_template(self.tokenizer)
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True, tools=tools).input_ids

    def chat(self, conversations: list[list[dict]], params: SamplingParams | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[Completion]:
        """Answers to each conversation (its messages before the answer), through the model's chat template."""
        return self.generate([self.encode_chat(c) for c in conversations], params, progress)

    @torch.inference_mode()
    def stream(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> Iterator[tuple[int, str, Completion | None]]:
        """Yield (sequence index, text delta, Completion when that sequence ends) as tokens arrive.

        Sequence ``j`` is sample ``j % n`` of prompt ``j // n``.
        """
        params.validate()
        encoded = [self.encode(p) for p in prompts]
        seqs = [ids for ids in encoded for _ in range(params.n)]
        B, longest = len(seqs), max(len(s) for s in seqs)
        tokens = torch.full((B, longest), self.tokenizer.eos_token_id, dtype=torch.long)
        pad = torch.ones(B, longest, dtype=torch.bool)
        for b, ids in enumerate(seqs):
            tokens[b, longest - len(ids):] = torch.tensor(ids)
            pad[b, longest - len(ids):] = False
        # Without a seed, one fresh seed per request (not torch.seed(), which would reseed the global RNG).
        base_seed = params.seed if params.seed is not None else secrets.randbelow(2**31)
        gens = [torch.Generator().manual_seed(base_seed + b % params.n) for b in range(B)]
        vocab = self.model.config.vocab_size
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, vocab, dtype=torch.bool)
            seen.scatter_(1, tokens, ~pad)
        streams = [_Stream(self.tokenizer, params.stop) for _ in range(B)]
        eos = self.tokenizer.eos_token_id
        self.decoder.start(B, longest + params.max_new_tokens)
        logits = self.decoder.forward(tokens.to(self.device), pad.to(self.device)).float().cpu()  # (B, V): sampled on the CPU
        active = list(range(B))
        history = [list(ids[-8:]) for ids in seqs]  # the watermark's context
        for step in range(params.max_new_tokens):
            threads.adapt()
            if params.watermark is not None:
                logits = text_watermark.bias(logits[:, :vocab], [params.watermark] * B, history)
            filtered = apply_sampling(logits[:, :vocab], params, seen)
            if params.temperature == 0:
                nxt = filtered.argmax(-1)
            else:
                probs = filtered.softmax(-1)
                nxt = torch.cat([torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(B)])
            if params.watermark is not None:
                for b in range(B):
                    history[b] = history[b][-7:] + [int(nxt[b])]
            if seen is not None:
                seen[torch.arange(B), nxt] = True
            for b in list(active):
                tok = int(nxt[b])
                s = streams[b]
                if tok == eos and not params.ignore_eos:
                    delta = s.finish("stop")
                else:
                    delta = s.push(tok)
                    if not s.done and step == params.max_new_tokens - 1:
                        delta += s.finish("length")
                if s.done:
                    active.remove(b)
                    yield b, delta, Completion(s.text, len(seqs[b]), len(s.ids), s.reason, b % params.n)
                elif delta:
                    yield b, delta, None
            if not active:
                return
            # Finished rows keep decoding (cheap at these sizes) so the batch stays rectangular.
            logits = self.decoder.forward(nxt[:, None].to(self.device)).float().cpu()

    def generate(self, prompts: list[str] | list[list[int]] | str, params: SamplingParams | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[Completion]:
        """Completions for every prompt, ``params.n`` each, ordered prompt by prompt; ``progress(done, total)``
        hears each finished sequence."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        total = len(prompts) * params.n
        if progress:
            progress(0, total)
        out: dict[int, Completion] = {}
        for b, _, done in self.stream(prompts, params):
            if done is not None:
                out[b] = done
                if progress:
                    progress(len(out), total)
        return [out[b] for b in sorted(out)]


def load_model(path: str | Path):
    """(model, tokenizer) from a run directory (best weights in model/, LoRA merged) or an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise UserError(f"run directory not found: {p}")
    folder = model_folder(p)
    if (folder / "adapter_config.json").is_file():
        from aigc.models.lm import load_pretrained

        return load_pretrained(str(folder))
    if (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    else:
        raise UserError(f"{p}: no trained model found (expected model/config.json); has training saved a checkpoint yet?")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
