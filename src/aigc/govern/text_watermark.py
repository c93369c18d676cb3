"""Green-list text watermark (Kirchenbauer et al., "A Watermark for Large Language Models", 2023).

At each step the previous token and a secret key seed a pseudo-random split of the vocabulary: a
fraction ``gamma`` of it is "green" and gets ``delta`` added to its logits before sampling. Text
written without the key contains green tokens at rate ``gamma``; watermarked text far more often. A
one-proportion z-test on the green count detects it:

    z = (green - gamma * T) / sqrt(T * gamma * (1 - gamma))

The split is a keyed integer hash of (key, the previous ``k`` tokens, candidate token), so it is
computed for a whole batch and vocabulary at once, needs no stored permutation, and any holder of the
key (the server, per tenant) recomputes it for detection. Repeated (context, token) tuples are scored
once, as the paper's detector recommends, so repetitive text does not inflate z.

The context width ``k`` follows the vocabulary: 1 token for subword vocabularies (the paper's
LeftHash), 4 for character-level ones (below 1,000 symbols), where a single previous character would
give only a few thousand distinct contexts that repeat constantly in any text and leave too few
scorable tokens (measured: 111 of 200 characters scorable with k=1).
"""
from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import asdict, dataclass

import torch

M32 = 0xFFFFFFFF
GAMMA = 0.25
DELTA = 2.0
Z_THRESHOLD = 4.0
MIN_TOKENS = 16  # below this the normal approximation overstates z (8 of 8 green gives z = 4.9): never "detected"


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values (products wrap; only the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def tenant_key(secret: bytes, tenant: str | int) -> int:
    """The 32-bit watermark key of one tenant, derived from the server's secret (never sent to clients)."""
    return int.from_bytes(hmac.new(secret, f"text-watermark:{tenant}".encode(), hashlib.sha256).digest()[:4], "big")


def context_width(vocab: int) -> int:
    return 1 if vocab >= 1000 else 4


def _seed(keys: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """keys (R,), ctx (R, k) with the nearest token last -> (R,) 32-bit seeds."""
    seed = keys.long() & M32
    for j in range(ctx.shape[1]):
        seed = _mix(seed ^ _mix((ctx[:, -1 - j].long() + j * 0x632BE5AB) & M32))
    return seed


def _is_green(seed: torch.Tensor, tokens: torch.Tensor, gamma: float) -> torch.Tensor:
    """The split itself: shared by generation (all candidates) and detection (the tokens written)."""
    return _mix((seed + ((tokens * 0x9E3779B1) & M32)) & M32) < int(gamma * 2**32)


def green_mask(keys: torch.Tensor, ctx: torch.Tensor, vocab: int, gamma: float = GAMMA) -> torch.Tensor:
    """(R, vocab) bool: the green tokens for each row, given its key (R,) and context tokens (R, k)."""
    return _is_green(_seed(keys, ctx)[:, None], torch.arange(vocab, dtype=torch.long)[None, :], gamma)


@dataclass
class Watermark:
    """What a generator needs to watermark one sequence."""

    key: int
    gamma: float = GAMMA
    delta: float = DELTA


def bias(logits: torch.Tensor, marks: list[Watermark | None], contexts: list[list[int]]) -> torch.Tensor:
    """Add each row's ``delta`` to its green tokens; rows whose mark is None are left unchanged.

    contexts: each row's tokens so far (prompt and output; only the last ``k`` are used)."""
    rows = [i for i, w in enumerate(marks) if w is not None]
    if not rows:
        return logits
    logits = logits.float().clone()
    V = logits.shape[1]
    k = context_width(V)
    ctx = torch.tensor([_pad(contexts[i], k) for i in rows])
    idx = torch.tensor(rows)
    keys = torch.tensor([marks[i].key for i in rows])  # type: ignore[union-attr]
    gammas = {marks[i].gamma for i in rows}  # type: ignore[union-attr]
    deltas = torch.tensor([marks[i].delta for i in rows])[:, None]  # type: ignore[union-attr]
    if len(gammas) == 1:
        mask = green_mask(keys, ctx, V, gammas.pop())
    else:
        mask = torch.cat([green_mask(keys[j : j + 1], ctx[j : j + 1], V, marks[r].gamma)  # type: ignore[union-attr]
                          for j, r in enumerate(rows)])
    logits[idx] = logits[idx] + mask * deltas
    return logits


def _pad(tokens: list[int], k: int) -> list[int]:
    tail = list(tokens[-k:])
    return [0] * (k - len(tail)) + tail


@dataclass
class Detection:
    z: float
    p_value: float
    green: int
    scored: int
    gamma: float
    threshold: float
    detected: bool

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def detect(ids: list[int], key: int, vocab: int, gamma: float = GAMMA, threshold: float = Z_THRESHOLD,
           ignore_repeated: bool = True) -> Detection:
    """Score token ids; the first ``k`` have no full context and are not scored."""
    k = context_width(vocab)
    tuples = [(tuple(ids[i - k : i]), ids[i]) for i in range(k, len(ids))]
    if ignore_repeated:
        tuples = list(dict.fromkeys(tuples))
    T = len(tuples)
    if T == 0:
        return Detection(0.0, 1.0, 0, 0, gamma, threshold, False)
    ctx = torch.tensor([list(c) for c, _ in tuples])
    tok = torch.tensor([t for _, t in tuples])
    seed = _seed(torch.full((T,), key, dtype=torch.long), ctx)
    green = int(_is_green(seed, tok, gamma).sum())
    z = (green - gamma * T) / math.sqrt(T * gamma * (1 - gamma))
    p = _binomial_tail(green, T, gamma)
    return Detection(z, p, green, T, gamma, threshold, z >= threshold and T >= MIN_TOKENS)


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the exact p-value (the z-score is its normal approximation)."""
    if k <= 0:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
                 for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def detect_text(text: str, tokenizer, key: int, **kw) -> Detection:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return detect(list(ids), key, len(tokenizer), **kw)
