"""Per-key request and token rate limits (RPM, TPM) as token buckets, with OpenAI's x-ratelimit-* headers.

Buckets live in the process: one server process enforces exactly; N processes behind a balancer
allow up to N times the limit (a shared store would be the next step for a cluster).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


def duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "20ms"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    m, s = divmod(int(math.ceil(seconds)), 60)
    return f"{m}m{s}s" if m else f"{s}s"


class Bucket:
    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, per_minute: int):
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level, self.stamp = float(per_minute), time.monotonic()

    def refill(self, now: float, per_minute: int) -> None:
        if per_minute != self.capacity:  # the limit changed: keep the used part
            self.level = max(0.0, self.level + per_minute - self.capacity)
            self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate)

    def reset_in(self) -> float:
        return (self.capacity - self.level) / self.rate


@dataclass
class Decision:
    allowed: bool
    retry_after: float
    headers: dict
    reason: str = ""


class RateLimiter:
    def __init__(self):
        self.buckets: dict[int, tuple[Bucket, Bucket]] = {}
        self.lock = threading.Lock()

    def take(self, key_id: int, rpm: int, tpm: int, tokens: int) -> Decision:
        """Spend one request and ``tokens`` (the most the request can use) or refuse without spending."""
        now = time.monotonic()
        with self.lock:
            req, tok = self.buckets.get(key_id) or self.buckets.setdefault(key_id, (Bucket(rpm), Bucket(tpm)))
            req.refill(now, rpm)
            tok.refill(now, tpm)
            reason, wait = "", 0.0
            if req.level < 1:
                reason, wait = f"rate limit reached: {rpm} requests per minute", req.wait_for(1)
            elif tokens > tok.capacity:
                reason, wait = f"this request needs up to {tokens} tokens, more than the limit of {tpm} tokens per minute", 60.0
            elif tok.level < tokens:
                reason, wait = f"rate limit reached: {tpm} tokens per minute", tok.wait_for(tokens)
            else:
                req.level -= 1
                tok.level -= tokens
            headers = {
                "x-ratelimit-limit-requests": str(rpm), "x-ratelimit-limit-tokens": str(tpm),
                "x-ratelimit-remaining-requests": str(int(req.level)), "x-ratelimit-remaining-tokens": str(int(tok.level)),
                "x-ratelimit-reset-requests": duration(req.reset_in()), "x-ratelimit-reset-tokens": duration(tok.reset_in()),
            }
        if reason:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
            headers["retry-after-ms"] = str(int(wait * 1000))
        return Decision(not reason, wait, headers, reason)

    def refund(self, key_id: int, tokens: int) -> None:
        """Give back the tokens a request reserved but did not use."""
        if tokens <= 0:
            return
        with self.lock:
            buckets = self.buckets.get(key_id)
            if buckets:
                tok = buckets[1]
                tok.level = min(tok.capacity, tok.level + tokens)
