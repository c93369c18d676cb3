"""Per-key request and token rate limits (RPM, TPM), with OpenAI's x-ratelimit-* headers, shared by every server.

One rule, three stores. A limit of N per minute admits at most N in **any** 60 seconds: each key's window is 61
one-second slots (this second and the 60 before it), and a request is admitted only if the window's requests + 1
and tokens + its tokens stay within the limits (so a client that waits ``retry-after`` is admitted, and a burst
of N is allowed at once). The stores:

- ``MemoryLimiter``: in the process (SQLite, one server process: the embedded default);
- ``SqlLimiter``: PostgreSQL, shared by every worker and host (``rate_slots``: the key's slots read and the current
  slot upserted under a transaction-scoped advisory lock on the key, so two servers never both take the last place,
  in one call of a database function);
- ``RedisLimiter``: Redis (``AIGC_REDIS_URL``), a hash per key updated in an optimistic WATCH/MULTI transaction.

``make_limiter`` picks the store from the settings. Slots are wall-clock seconds, so the hosts of a fleet need their
clocks in step (NTP), as for TLS.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import anyio

log = logging.getLogger(__name__)

WINDOW = 60  # seconds a limit counts over
SLOTS = WINDOW + 1  # one-second slots in a key's window: any 60 s fall within 61 consecutive slots


def duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "20ms"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    m, s = divmod(int(math.ceil(seconds)), 60)
    return f"{m}m{s}s" if m else f"{s}s"


def key_name(key) -> str:
    """A limit key as a string (an API key id, ("user", id) for a console user, or a name such as complaints:ADDR)."""
    if isinstance(key, tuple):
        return ":".join(str(k) for k in key)
    return f"key:{key}" if isinstance(key, int) else str(key)


@dataclass
class Decision:
    allowed: bool
    retry_after: float
    headers: dict
    reason: str = ""
    slot: int = 0  # the second the request was counted in (to give back unused tokens)


def decide(rows: list[tuple[int, int, int]], now: float, rpm: int, tpm: int, tokens: int) -> Decision:
    """The decision on one request given the key's slots in the window (slot, requests, tokens)."""
    rows = sorted(rows)
    used_r, used_t = sum(r[1] for r in rows), sum(r[2] for r in rows)

    def wait_until(free: int, column: int) -> float:  # seconds until the oldest slots holding ``free`` leave the window
        got = 0
        for row in rows:
            got += row[column]
            if got >= free:
                return max(0.0, row[0] + SLOTS - now)
        return float(WINDOW)

    reason, wait = "", 0.0
    if used_r + 1 > rpm:
        reason, wait = f"rate limit reached: {rpm} requests per minute", wait_until(used_r + 1 - rpm, 1)
    elif tokens > tpm:
        reason, wait = f"this request needs up to {tokens} tokens, more than the limit of {tpm} tokens per minute", float(WINDOW)
    elif used_t + tokens > tpm:
        reason, wait = f"rate limit reached: {tpm} tokens per minute", wait_until(used_t + tokens - tpm, 2)
    admitted = not reason
    r_after, t_after = used_r + admitted, used_t + (tokens if admitted else 0)
    oldest_r = next((row[0] for row in rows if row[1]), None)
    oldest_t = next((row[0] for row in rows if row[2]), None)
    reset_r = (oldest_r + SLOTS - now) if oldest_r is not None else (WINDOW if admitted else 0.0)
    reset_t = (oldest_t + SLOTS - now) if oldest_t is not None else (WINDOW if admitted and tokens else 0.0)
    headers = {
        "x-ratelimit-limit-requests": str(rpm), "x-ratelimit-limit-tokens": str(tpm),
        "x-ratelimit-remaining-requests": str(max(0, rpm - r_after)), "x-ratelimit-remaining-tokens": str(max(0, tpm - t_after)),
        "x-ratelimit-reset-requests": duration(max(0.0, reset_r)), "x-ratelimit-reset-tokens": duration(max(0.0, reset_t)),
    }
    if reason:
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(int(wait * 1000))
    return Decision(admitted, wait, headers, reason, int(now))


class Limiter:
    """The interface: ``take`` one request and up to ``tokens`` (or refuse, spending nothing), ``refund`` unused tokens.

    ``inline``: whether ``take`` is cheap local work (no network), so the event loop may call it directly."""

    inline = True
    name = "memory"

    def take(self, key, rpm: int, tpm: int, tokens: int) -> Decision:
        raise NotImplementedError

    def refund(self, key, tokens: int, slot: int) -> None:
        raise NotImplementedError

    def purge(self) -> None:
        """Drop slots that left every window (called by the fleet's sweep)."""

    async def atake(self, key, rpm: int, tpm: int, tokens: int) -> Decision:
        if self.inline:
            return self.take(key, rpm, tpm, tokens)
        return await anyio.to_thread.run_sync(self.take, key, rpm, tpm, tokens)

    def safe_refund(self, key, tokens: int, slot: int) -> None:
        """``refund``, never raising: giving tokens back must not stop a request from settling."""
        if tokens <= 0:
            return
        try:
            self.refund(key, tokens, slot)
        except Exception:
            log.warning("could not give unused tokens back to the rate limit", exc_info=True)

    async def arefund(self, key, tokens: int, slot: int) -> None:
        if tokens <= 0:
            return
        if self.inline:
            return self.safe_refund(key, tokens, slot)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.safe_refund, key, tokens, slot)


class MemoryLimiter(Limiter):
    def __init__(self):
        self.windows: dict[str, dict[int, list[int]]] = {}
        self.lock = threading.Lock()

    def take(self, key, rpm: int, tpm: int, tokens: int) -> Decision:
        now = time.time()
        slot = int(now)
        with self.lock:
            w = self.windows.setdefault(key_name(key), {})
            for s in [s for s in w if s <= slot - SLOTS]:
                del w[s]
            d = decide([(s, r, t) for s, (r, t) in w.items()], now, rpm, tpm, tokens)
            if d.allowed:
                cell = w.setdefault(slot, [0, 0])
                cell[0] += 1
                cell[1] += tokens
        return d

    def refund(self, key, tokens: int, slot: int) -> None:
        with self.lock:
            cell = self.windows.get(key_name(key), {}).get(slot)
            if cell is not None:
                cell[1] = max(0, cell[1] - tokens)

    def purge(self) -> None:
        floor = int(time.time()) - SLOTS
        with self.lock:
            for name in list(self.windows):
                w = self.windows[name]
                for s in [s for s in w if s <= floor]:
                    del w[s]
                if not w:
                    del self.windows[name]


class SqlLimiter(Limiter):
    """PostgreSQL: shared by every worker and host on the database. A take is one call of ``aigc_rate_take`` (migration
    0008: the key's window read and the current slot upserted under a transaction-scoped advisory lock on the key, so
    two servers never both take the last place), in a transaction of its own: one round trip."""

    inline = False
    name = "postgres"

    def __init__(self, engine):
        from sqlalchemy import text

        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")  # each statement its own transaction
        self._take = text("SELECT w_slot, w_requests, w_tokens FROM aigc_rate_take(:k, :floor, :slot, :rpm, :tpm, :t)")
        self._refund = text("UPDATE rate_slots SET tokens = GREATEST(tokens - :t, 0) WHERE key = :k AND slot = :slot")
        self._purge = text("DELETE FROM rate_slots WHERE slot <= :floor")

    def take(self, key, rpm: int, tpm: int, tokens: int) -> Decision:
        now = time.time()
        with self.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(self._take, {"k": key_name(key), "floor": int(now) - SLOTS,
                                                                "slot": int(now), "rpm": rpm, "tpm": tpm, "t": tokens})]
        return decide(rows, now, rpm, tpm, tokens)  # the same rule on the same window: admitted iff the call added it

    def refund(self, key, tokens: int, slot: int) -> None:
        with self.engine.connect() as conn:
            conn.execute(self._refund, {"k": key_name(key), "slot": slot, "t": tokens})

    def purge(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(self._purge, {"floor": int(time.time()) - SLOTS})


class RedisLimiter(Limiter):
    """Redis: a hash per key (fields r:SLOT and t:SLOT), expiring with its window."""

    inline = False
    name = "redis"

    def __init__(self, url: str):
        try:
            import redis
        except ImportError:
            from aigc.errors import UserError
            raise UserError("AIGC_REDIS_URL is set but the redis package is not installed: pip install 'aigc[fleet]'") from None
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.WatchError = redis.WatchError

    def _rows(self, h: dict, floor: int) -> tuple[list[tuple[int, int, int]], list[bytes]]:
        cells: dict[int, list[int]] = {}
        old = []
        for field, value in h.items():
            kind, _, s = field.decode().partition(":")
            slot = int(s)
            if slot <= floor:
                old.append(field)
                continue
            cells.setdefault(slot, [0, 0])[0 if kind == "r" else 1] = int(value)
        return [(s, r, t) for s, (r, t) in cells.items()], old

    def take(self, key, rpm: int, tpm: int, tokens: int) -> Decision:
        name = "aigc:rl:" + key_name(key)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(name)
                    now = time.time()
                    rows, old = self._rows(pipe.hgetall(name), int(now) - SLOTS)
                    d = decide(rows, now, rpm, tpm, tokens)
                    pipe.multi()
                    if old:
                        pipe.hdel(name, *old)
                    if d.allowed:
                        pipe.hincrby(name, f"r:{d.slot}", 1)
                        pipe.hincrby(name, f"t:{d.slot}", tokens)
                        pipe.expire(name, SLOTS + 5)
                    pipe.execute()
                    return d
                except self.WatchError:  # another server changed this key meanwhile: read it again
                    continue

    def refund(self, key, tokens: int, slot: int) -> None:
        name, field = "aigc:rl:" + key_name(key), f"t:{slot}"
        if self.redis.hincrby(name, field, -tokens) < 0:
            self.redis.hset(name, field, 0)


def make_limiter(settings, engine) -> Limiter:
    """The store the settings ask for: ``rate_limit_backend`` auto (Redis when AIGC_REDIS_URL is set, PostgreSQL when the
    database is, else in the process), memory, postgres or redis."""
    from aigc.errors import UserError

    want = settings.rate_limit_backend
    postgres = engine.dialect.name == "postgresql"
    if want == "auto":
        want = "redis" if settings.redis_url else "postgres" if postgres else "memory"
    if want == "redis":
        if not settings.redis_url:
            raise UserError("AIGC_RATE_LIMIT_BACKEND=redis needs AIGC_REDIS_URL (redis://HOST:6379/0)")
        return RedisLimiter(settings.redis_url)
    if want == "postgres":
        if not postgres:
            raise UserError("AIGC_RATE_LIMIT_BACKEND=postgres needs a PostgreSQL database (AIGC_DATABASE_URL=postgresql+psycopg://...)")
        return SqlLimiter(engine)
    return MemoryLimiter()
