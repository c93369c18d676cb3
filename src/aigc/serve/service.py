"""The Service: everything a request handler needs, built once per app (``Service.build``).

Routes reach it through ``deps.ServiceDep``; it imports nothing of the routes or the app, so the
serving package has no import cycle. Database work from a handler goes through ``Service.db``: the
function runs in a worker thread (PostgreSQL waits on the network; the event loop must not) inside
one transaction, and the project's own errors become API errors.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import anyio

from aigc.db.session import open_db, retry_locked
from aigc.errors import Conflict, NotFound, UserError
from aigc.serve.billing import Billing
from aigc.serve.errors import ApiError
from aigc.serve.governance import Governance
from aigc.serve.finetune import FineTuner
from aigc.serve.jobs import JobRunner
from aigc.serve.metrics import Metrics
from aigc.serve.fleet import Fleet
from aigc.serve.ratelimit import Limiter, make_limiter
from aigc.serve.registry import Registry
from aigc.settings import Settings

T = TypeVar("T")


@dataclass
class Service:
    settings: Settings
    registry: Registry
    sessions: object  # sqlalchemy sessionmaker
    billing: Billing
    limiter: Limiter
    metrics: Metrics
    url_secret: bytes  # the HMAC key of signed file URLs
    governance: Governance
    jobs: object = None  # serve.jobs.JobRunner: music and video jobs
    fine_tunes: object = None  # serve.finetune.FineTuner: fine-tuning jobs
    fleet: object = None  # serve.fleet.Fleet: this server's lease among the others, and the change listener
    key_cache: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ready: bool = True

    @classmethod
    def build(cls, settings: Settings, registry: Registry) -> Service:
        sessions = open_db(settings.resolved_database_url(), busy_timeout_s=settings.db_busy_timeout_s)
        # the operator's compute price follows where the models run (the server's device)
        cost_per_s = settings.gpu_second_cost if registry.device.type != "cpu" else settings.cpu_second_cost
        service = cls(settings, registry, sessions, Billing(sessions, cost_per_s, quota_status=settings.quota_status,
                                                              settle_retry_s=settings.settle_retry_s,
                                                              busy_timeout_s=settings.db_busy_timeout_s),
                      make_limiter(settings, sessions.kw["bind"]), Metrics(registry, settings.prometheus_multiproc_dir), url_secret(settings), Governance(settings, sessions))
        service.jobs = JobRunner(service, settings.job_workers)
        service.fine_tunes = FineTuner(service, settings.fine_tune_workers)
        service.fleet = Fleet(service)
        return service

    def forget(self, kind: str, org_id: int | None = None) -> None:
        """Drop a cache after a change (here, or in another process: ``serve.fleet`` hears it):
        keys (revocations, plans, limits), prices, a tenant's policy, the takedown list."""
        if kind == "keys":
            self.key_cache.clear()
        elif kind == "prices":
            self.billing.forget_prices()
        elif kind == "policy":
            self.governance.forget(org_id)
        elif kind == "blocked":
            self.governance.forget_blocked()

    def forget_all(self) -> None:
        for kind in ("keys", "prices", "policy", "blocked"):
            self.forget(kind)

    def base_url(self, request) -> str:
        """Where clients reach this server: ``public_url`` when set, else the request's own base."""
        return self.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")

    async def db(self, fn: Callable[..., T], *args, write: bool = True) -> T:
        """``fn(session, *args)`` in one transaction (committed when ``write``), off the event loop;
        NotFound, Conflict and UserError become 404, 409 and 400."""
        def work():
            if write:
                with self.sessions.begin() as s:
                    return fn(s, *args)
            with self.sessions() as s:
                return fn(s, *args)
        try:
            return await anyio.to_thread.run_sync(retry_locked, work, self.settings.db_busy_timeout_s)
        except NotFound as exc:
            raise ApiError(404, str(exc), code="not_found") from None
        except Conflict as exc:
            raise ApiError(409, str(exc), code="conflict") from None
        except UserError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None

    def close(self) -> None:
        """After uvicorn has let in-flight requests finish: finish the jobs, unload the models, close the pool."""
        self.ready = False
        self.jobs.close()  # running jobs finish and settle; queued ones too
        self.fine_tunes.close()  # training stops at the next step; the jobs settle as cancelled
        self.billing.close()  # the group commit settles what it still holds
        self.fleet.close()  # everything has settled: leave the fleet
        self.registry.close()
        self.sessions.kw["bind"].dispose()


def url_secret(settings: Settings) -> bytes:
    """The HMAC key for signed file URLs, kept in the data folder so URLs survive a restart."""
    path = settings.home / "url-secret"
    if not path.is_file():
        settings.home.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()
