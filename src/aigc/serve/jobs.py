"""Asynchronous generation jobs (music and video): a row per job, a small pool of worker threads.

``POST`` creates the job (after the key, role, model, moderation, rate-limit and quota checks, and a
hold on the most it can cost) and returns at once; a worker renders it, signs the files, writes them
under ``HOME/media/<job id>/`` and settles it: the charge per second of output, the generation log
and its audit entry and the job's final status commit in one transaction. Jobs left queued or running
by a stopped server are failed at the next start and their holds released.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import text

from aigc.db import crud
from aigc.db.crud import Units
from aigc.db.models import utcnow

log = logging.getLogger(__name__)



def _finish(conn, job_id: str, status: str, result: dict | None, error: str | None) -> None:
    from sqlalchemy import update

    from aigc.db.models import Job

    table = Job.__table__  # typed columns, so the JSON result is encoded for either database
    conn.execute(update(table).where(table.c.id == job_id).values(status=status, result=result, error=error, finished_at=utcnow()))


@dataclass
class Outcome:
    """What a job's work function returns: the units to charge, the generation records, the result."""

    units: Units
    records: list
    result: dict
    compute_s: float


class JobRunner:
    def __init__(self, service, workers: int = 1):
        self.service = service
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="aigc-job")
        self.running: set[str] = set()
        self.lock = threading.Lock()

    def recover(self) -> int:
        """Fail the jobs a previous server left unfinished and release what they held."""
        s = self.service
        with s.sessions() as db:
            from aigc.db.models import Job

            stale = db.query(Job).filter(Job.status.in_(("queued", "running"))).all()
            rows = [(j.id, j.org_id, j.key_id, j.model, j.model_version, j.kind, j.held) for j in stale]
        for job_id, org_id, key_id, model, version, kind, held in rows:
            who = _Payer(org_id, key_id)
            with s.billing.engine.begin() as conn:
                crud.settle(conn, job_id, who, model, version, f"{kind}.generations", "error", Units(), None, held, 0.0,
                            s.billing.cost_per_s)
                _finish(conn, job_id, "failed", None, "the server stopped before the job finished")
        if rows:
            log.warning("failed unfinished jobs", extra={"jobs": len(rows)})
        return len(rows)

    def submit(self, job_id: str, principal, model: str, version: str, endpoint: str, hold, actor: str,
               work: Callable[[], Outcome]) -> None:
        with self.lock:
            self.running.add(job_id)
        self.pool.submit(self._run, job_id, principal, model, version, endpoint, hold, actor, work)

    def _run(self, job_id, principal, model, version, endpoint, hold, actor, work) -> None:
        s = self.service
        with s.billing.engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET status = 'running', started_at = :now WHERE id = :id"), {"now": utcnow(), "id": job_id})
        t0 = time.perf_counter()
        status, units, records, result, error, compute = "failed", Units(), [], None, None, 0.0
        try:
            outcome = work()
            status, units, records, result, compute = "succeeded", outcome.units, outcome.records, outcome.result, outcome.compute_s
        except Exception as exc:  # a job's failure is reported through the job, never lost
            from aigc.errors import UserError

            error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            compute = time.perf_counter() - t0
            if not isinstance(exc, UserError):
                log.exception("job failed", extra={"job": job_id})
        write = s.governance.writer(records, actor) if records else None

        def also(conn):
            if write is not None:
                write(conn)
            _finish(conn, job_id, status, result, error)

        try:
            charged, cost = s.billing._settle(job_id, principal, model, version, endpoint, "ok" if status == "succeeded" else "error",
                                              units, hold, compute, also=also)
            s.metrics.revenue.labels(model).inc(charged / 1e6)
            s.metrics.cost.labels(model).inc(cost / 1e6)
        except Exception:
            log.exception("job settle failed", extra={"job": job_id})
            with s.billing.engine.begin() as conn:
                _finish(conn, job_id, "failed", None, "internal error while recording the job")
        finally:
            with self.lock:
                self.running.discard(job_id)

    def wait(self, timeout: float = 600.0) -> bool:
        """Block until no job is running (for shutdown and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.running:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)


@dataclass
class _Payer:
    """The two fields of a Principal that settling needs, for jobs recovered after a restart."""

    org_id: int
    key_id: int | None
