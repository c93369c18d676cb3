"""Asynchronous generation jobs (music and video): a row per job, a small pool of worker threads.

``POST`` creates the job (after the key, role, model, moderation, rate-limit and quota checks, and a
hold on the most it can cost) and returns at once; a worker renders it, signs the files, writes them
under ``HOME/media/<job id>/`` and settles it: the charge per second of output, the generation log
and its audit entry and the job's final status commit in one transaction. Jobs left queued or running
by a server that stopped or died are failed and their holds released by any live server, on any host, once
that server's lease has expired (``serve.fleet``); jobs of live servers are left alone.
"""
from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from aigc.db import crud
from aigc.db.crud import Units
from aigc.errors import UserError

log = logging.getLogger(__name__)


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

    @property
    def owner(self) -> str:
        """The id of this server in the fleet: the job's lease is this server's heartbeat (``serve.fleet``)."""
        return self.service.fleet.id

    def fail_orphans(self, live: set[str]) -> int:
        """Fail the jobs whose server is no longer alive (stopped, killed, or its host gone) and release their holds.

        Any live server may do it, on any host; each job is claimed once (``crud.claim_unfinished_job``)."""
        s = self.service
        with s.sessions() as db:
            rows = [(j.id, j.org_id, j.key_id, j.model, j.model_version, j.kind, j.held) for j in crud.unfinished_jobs(db)
                    if j.owner not in live]
        failed = 0
        for job_id, org_id, key_id, model, version, kind, held in rows:
            with s.billing.engine.begin() as conn:
                if not crud.claim_unfinished_job(conn, job_id, "the server running the job stopped before it finished"):
                    continue
                crud.settle(conn, job_id, _Payer(org_id, key_id), model, version, f"{kind}.generations", "error", Units(), None,
                            held, 0.0, s.billing.cost_per_s)
                failed += 1
        if failed:
            log.warning("failed the jobs of stopped servers", extra={"jobs": failed})
        return failed

    def submit(self, job_id: str, generation, work: Callable[[], Outcome]) -> None:
        """Run ``work`` on a worker; ``generation`` (a ``lifecycle.Generation`` past its hold) settles it."""
        self.pool.submit(self._run, job_id, generation, work)

    def _run(self, job_id: str, generation, work: Callable[[], Outcome]) -> None:
        s = self.service
        with s.billing.engine.begin() as conn:
            crud.start_job(conn, job_id)
        t0 = time.perf_counter()
        status, units, records, result, error, compute = "failed", Units(), [], None, None, 0.0
        try:
            outcome = work()
            status, units, records, result, compute = "succeeded", outcome.units, outcome.records, outcome.result, outcome.compute_s
        except Exception as exc:  # a job's failure is reported through the job, never lost
            error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, OSError) and exc.strerror:
                error = f"the server could not store the job's files ({exc.strerror}); nothing was charged"
            compute = time.perf_counter() - t0
            shutil.rmtree(s.settings.home / "media" / job_id, ignore_errors=True)  # no partial set of files is left
            if not isinstance(exc, UserError):
                log.exception("job failed", extra={"job": job_id})
        try:
            generation.settle_now(job_id, "ok" if status == "succeeded" else "error", units, compute, records,
                                  also=lambda conn: crud.finish_job(conn, job_id, status, result, error))
        except Exception:
            log.exception("job settle failed", extra={"job": job_id})
            with s.billing.engine.begin() as conn:
                crud.finish_job(conn, job_id, "failed", None, "internal error while recording the job")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)


@dataclass
class _Payer:
    """The two fields of a Principal that settling needs, for jobs recovered after a restart."""

    org_id: int
    key_id: int | None
