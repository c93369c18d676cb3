"""Request metering: hold the most a request can cost, run it, then charge what it used and append
its usage record (with measured compute seconds and their cost). Database work runs in worker
threads; the settle step is shielded from cancellation so a dropped client still leaves its record.

On PostgreSQL the settles of a server's requests are a group commit (``SettleQueue``): one thread settles
whatever requests are waiting in one transaction (one update of each tenant's row, one audit lock, one
commit), and each request's response waits for that commit. Settled one transaction per request, every
request of a tenant waited on the tenant's row for the one before it to commit, and a fleet of servers
served no more than one did.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import anyio
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from aigc.db import crud
from aigc.db.crud import PaymentRequired, Principal, Units
from aigc.db.models import Price
from aigc.db.session import is_locked, retry_locked
from aigc.serve.errors import ApiError, database_unavailable

log = logging.getLogger(__name__)


@dataclass
class Hold:
    amount: int
    price: Price | None
    server: str | None = None  # the server whose request holds it (None: a job's row carries it)
    hold_id: int | None = None  # its row in server_holds


class Billing:
    def __init__(self, sessions: sessionmaker[Session], cost_per_s: float, price_ttl_s: float = 5.0, quota_status: int = 402,
                 settle_retry_s: float = 60.0, busy_timeout_s: float = 5.0):
        self.sessions, self.cost_per_s, self.price_ttl_s = sessions, cost_per_s, price_ttl_s
        self.settle_retry_s, self.busy_timeout_s = settle_retry_s, busy_timeout_s
        self.quota_status = quota_status  # 402, or 429 as OpenAI answers exhausted credit (clients classify it as a quota error)
        self.engine = sessions.kw["bind"]
        # SQLite in one process: a hold or settle is ~0.1-0.3 ms of local work, cheaper inline than a
        # thread hop, and the event loop serialises the writers. PostgreSQL waits on the network: threads.
        self.inline = self.engine.dialect.name == "sqlite"
        self._prices: dict[tuple[str, str], tuple[Price | None, float]] = {}
        self.server: str | None = None  # this server's id in the fleet (serve.fleet), once registered
        self.queue = SettleQueue(self)  # the group commit (not used inline)

    def forget_prices(self) -> None:
        """Drop cached prices (after the price book changed)."""
        self._prices.clear()

    def price(self, model: str, version: str) -> Price | None:
        hit = self._prices.get((model, version))
        if hit and hit[1] > time.monotonic():
            return hit[0]
        with self.sessions() as s:
            p = crud.find_price(s, model, version)
            if p is not None:
                s.expunge(p)
        self._prices[(model, version)] = (p, time.monotonic() + self.price_ttl_s)
        return p

    def _reserve(self, principal: Principal, model: str, version: str, estimate: Units, wait: bool = True) -> Hold:
        price = self.price(model, version)
        with self.engine.begin() as conn:  # a Core connection: no ORM work on the hot path
            if not wait:
                conn.exec_driver_sql("PRAGMA busy_timeout=0")  # the event loop's fast path never waits for a lock
            hold_id = crud.new_hold_id()
            amount = crud.reserve(conn, principal.org_id, crud.list_price(price, estimate), self.server, hold_id)
            return Hold(amount, price, self.server, hold_id)

    async def reserve(self, principal: Principal, model: str, version: str, estimate: Units) -> Hold:
        try:
            if self.inline:
                try:
                    return self._reserve(principal, model, version, estimate, False)
                except OperationalError as exc:
                    if not is_locked(exc):
                        raise
                # another writer holds the file (a job settling, the CLI): wait for it off the event loop, within the bound
            return await anyio.to_thread.run_sync(retry_locked, lambda: self._reserve(principal, model, version, estimate),
                                                  self.busy_timeout_s)
        except PaymentRequired as exc:
            raise ApiError(self.quota_status, str(exc), code="insufficient_quota", type="insufficient_quota") from None

    def settle_blocking(self, request_id, principal, model, version, endpoint, status, units, hold, compute_s, also=None,
                        tried: bool = False):
        """``settle`` for a caller that may block (a job's worker thread). While the database is unavailable (restarting,
        locked) it tries again for up to ``settle_retry_s``: a request that ran is recorded once it can be, exactly once
        (the usage record's request id is unique: a try whose commit did land is found, not repeated). ``tried``: an
        earlier try (a group commit's) may have landed."""
        deadline, pause, tries = time.monotonic() + self.settle_retry_s, 0.1, 1 if tried else 0
        while True:
            tries += 1
            try:
                return self._settle_once(request_id, principal, model, version, endpoint, status, units, hold, compute_s, also)
            except IntegrityError:
                if tries == 1:
                    raise
                done = self._recorded(request_id)  # an earlier try committed before its connection failed
                if done is None:
                    raise
                return done
            except DBAPIError as exc:
                if not database_unavailable(exc) or time.monotonic() + pause > deadline:
                    raise
                log.warning("the database is unavailable: retrying the settle", extra={"request_id": request_id, "try": tries,
                                                                                     "error": str(exc.orig or exc)[:200]})
                time.sleep(pause)
                pause = min(2.0, pause * 2)

    def _recorded(self, request_id: str) -> tuple[int, int] | None:
        with self.engine.connect() as conn:
            row = conn.execute(text("SELECT charged, cost FROM usage_records WHERE request_id = :r"), {"r": request_id}).first()
        return (int(row[0]), int(row[1])) if row else None

    def _commit(self, batch: list[tuple], wait: bool = True) -> list[tuple[int, int]]:
        """Settle each request of ``batch`` (``settle_blocking``'s arguments) and run its ``also`` (e.g. the generation
        log and its audit entries), in one transaction: one commit for them all."""
        with self.engine.begin() as conn:
            if not wait:
                conn.exec_driver_sql("PRAGMA busy_timeout=0")
            done = crud.settle_many(conn, [_item(*args[:9]) for args in batch], self.cost_per_s)
            for args in batch:
                if args[9] is not None:
                    args[9](conn)
            return [(d.charged, d.cost) for d in done]

    def _settle_once(self, request_id, principal, model, version, endpoint, status, units, hold, compute_s, also=None,
                     wait: bool = True):
        return self._commit([(request_id, principal, model, version, endpoint, status, units, hold, compute_s, also)], wait)[0]

    async def settle(self, request_id: str, principal: Principal, model: str, version: str, endpoint: str, status: str,
                     units: Units, hold: Hold, compute_s: float, also=None) -> tuple[int, int]:
        """Charge and record; ``also(conn)`` runs in the same transaction."""
        if self.inline:
            try:
                return self._settle_once(request_id, principal, model, version, endpoint, status, units, hold, compute_s, also,
                                         wait=False)
            except OperationalError as exc:  # locked (rolled back, nothing written): wait for it off the event loop
                if not is_locked(exc):
                    raise
            with anyio.CancelScope(shield=True):
                return await anyio.to_thread.run_sync(self.settle_blocking, request_id, principal, model, version, endpoint,
                                                      status, units, hold, compute_s, also)
        done = self.queue.submit(Pending((request_id, principal, model, version, endpoint, status, units, hold, compute_s, also)))
        with anyio.CancelScope(shield=True):  # the settle goes on in the queue's thread whatever happens to this request
            return await asyncio.shield(asyncio.wrap_future(done))

    def close(self) -> None:
        """Settle what is queued, then stop the queue's thread."""
        self.queue.close()


def _item(request_id, principal, model, version, endpoint, status, units, hold: Hold, compute_s) -> crud.SettleItem:
    return crud.SettleItem(request_id, principal, model, version, endpoint, status, units, hold.price, hold.amount, compute_s,
                           hold.server, hold.hold_id)


@dataclass
class Pending:
    """A request waiting in the group commit: ``settle_blocking``'s arguments, and the future its response waits on."""

    args: tuple
    done: Future | None = None


class SettleQueue:
    """Group commit of settles: one thread takes every request waiting (up to ``max_batch``) and settles them in one
    transaction (``crud.settle_many``, then each one's ``also``: the generation log and its audit entries), while the
    next ones queue. A batch that fails as a whole (one request's record is refused, the database went away for longer
    than ``Billing.settle_retry_s``) is settled again one request at a time, so that each request gets its own result."""

    def __init__(self, billing: Billing, max_batch: int = 64):
        self.billing, self.max_batch = billing, max_batch
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = self.settled = self.alone = 0  # transactions, requests settled in them, requests settled alone

    def submit(self, p: Pending) -> Future:
        p.done = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aigc-settle", daemon=True)
                self._thread.start()
            self._queue.put(p)
        return p.done

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            self._settle(batch)

    def _settle(self, batch: list[Pending]) -> None:
        b = self.billing
        deadline, pause, tried = time.monotonic() + b.settle_retry_s, 0.1, False
        while True:
            try:
                results = b._commit([p.args for p in batch])
                break
            except DBAPIError as exc:
                down = not isinstance(exc, IntegrityError) and database_unavailable(exc)
                if down and time.monotonic() + pause < deadline:
                    log.warning("the database is unavailable: retrying the settles", extra={
                        "requests": len(batch), "error": str(exc.orig or exc)[:200]})
                    tried = True  # its commit may have landed before the connection failed
                    time.sleep(pause)
                    pause = min(2.0, pause * 2)
                    continue
                if down:  # past the bound: every request of the batch fails with it
                    for p in batch:
                        p.done.set_exception(exc)
                    return
                results = None
            except Exception:  # noqa: BLE001 - whatever it was, each request is tried alone and gets its own error
                results = None
            break
        if results is None:  # one at a time: each request's own outcome
            self.alone += len(batch)
            for p in batch:
                try:
                    p.done.set_result(b.settle_blocking(*p.args, tried=tried))
                except BaseException as exc:  # noqa: BLE001 - handed to the request that waits for it
                    p.done.set_exception(exc)
            return
        self.batches += 1
        self.settled += len(batch)
        for p, r in zip(batch, results):
            p.done.set_result(r)
