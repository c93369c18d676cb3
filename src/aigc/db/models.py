"""The service's tables (SQLAlchemy 2 typed ORM). Schema changes go through Alembic (db/migrations).

Money is stored as integer micro-dollars (1e-6 USD) so sums are exact on every database.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Date, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("admin", "developer", "viewer", "reviewer")
PLAN_KINDS = ("subscription", "payg", "prepaid")
MICRO = 1_000_000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Plan(Base):
    """A business model. subscription: monthly fee + included usage (valued at list price) + overage;
    payg: list price per unit, optional monthly spend limit; prepaid: list price drawn from credits."""

    __tablename__ = "plans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    monthly_fee: Mapped[int] = mapped_column(BigInteger, default=0)
    included: Mapped[int] = mapped_column(BigInteger, default=0)  # subscription: usage at list price included per month
    overage_rate: Mapped[float | None] = mapped_column(Float, nullable=True)  # x list price past `included`; None: hard quota
    price_multiplier: Mapped[float] = mapped_column(Float, default=1.0)  # payg/prepaid discount or markup on list price
    spend_limit: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # payg: monthly cap on charges
    rpm: Mapped[int] = mapped_column(Integer, default=600)  # default per-key limits
    tpm: Mapped[int] = mapped_column(Integer, default=200_000)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Organization(Base):
    """A tenant. Its balance fields are changed only by single conditional UPDATEs (see db/crud.py)."""

    __tablename__ = "organizations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id"), nullable=True)
    credits: Mapped[int] = mapped_column(BigInteger, default=0)  # prepaid balance
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)  # held by requests in flight
    period_start: Mapped[dt.date] = mapped_column(Date, default=lambda: utcnow().date().replace(day=1))
    period_list: Mapped[int] = mapped_column(BigInteger, default=0)  # usage at list price this period
    period_charged: Mapped[int] = mapped_column(BigInteger, default=0)  # usage charges this period
    policy: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # governance policy (govern/policy.py); None: defaults
    moderation: Mapped[str | None] = mapped_column(Text, nullable=True)  # the tenant's moderation rules (YAML); None: defaults
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("org_id", "email"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    email: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    # scrypt (a memory-hard KDF), "scrypt$n$r$p$salt$hash"; None: this user signs in with an API key only
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ApiKey(Base):
    """Only the SHA-256 of a key is stored; ``prefix`` is the part shown in listings."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(32))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    allowed_models: Mapped[list | None] = mapped_column(JSON, nullable=True)  # None: every model
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the plan's default
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Price(Base):
    """The price book: list prices per model version ("*" matches any version of the model)."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("model", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64), default="*")
    input_per_1k: Mapped[int] = mapped_column(BigInteger, default=0)
    output_per_1k: Mapped[int] = mapped_column(BigInteger, default=0)
    per_image: Mapped[int] = mapped_column(BigInteger, default=0)
    per_second: Mapped[int] = mapped_column(BigInteger, default=0)  # audio / video output
    per_1k_train_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # fine-tuning this model, per 1K trained tokens
    per_1k_chars: Mapped[int] = mapped_column(BigInteger, default=0)  # speech, per 1K characters of input
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class UsageRecord(Base):
    """One row per request (and one per subscription fee), appended in the same transaction that
    settles its charge and updates the rollup."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_org_day", "org_id", "day"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    day: Mapped[dt.date] = mapped_column(Date)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64), default="")
    endpoint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default="ok")  # ok | error | cancelled | timeout
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    train_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    characters: Mapped[int] = mapped_column(BigInteger, default=0)  # speech input
    list_price: Mapped[int] = mapped_column(BigInteger, default=0)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    compute_s: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageRollup(Base):
    """Daily totals per (org, key, model), upserted with every usage record: reports read these."""

    __tablename__ = "usage_rollups"
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    org_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0: no key (subscription fees)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    images: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    train_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    characters: Mapped[int] = mapped_column(BigInteger, default=0)
    list_price: Mapped[int] = mapped_column(BigInteger, default=0)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    compute_s: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)


class Generation(Base):
    """One delivered output (a completion choice or an image): what produced it and what was applied to it.

    Prompt and output are stored only as the tenant's policy allows, PII-scrubbed and AES-GCM encrypted
    (govern/crypto.py); the retention purge clears them and keeps the hashes and metadata."""

    __tablename__ = "generations"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # text | image | audio | video
    model: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64), default="")
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    params_hash: Mapped[str] = mapped_column(String(64))
    output_sha256: Mapped[str] = mapped_column(String(64), index=True)
    watermark: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # text: {"scheme", "gamma", "delta"}; image: {"id"}
    watermark_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    moderation: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    filters: Mapped[list | None] = mapped_column(JSON, nullable=True)
    prompt_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    output_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="delivered")  # delivered | blocked | taken_down
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEntry(Base):
    """Append-only, hash-chained log. Each row's ``hash`` covers its content and ``prev_hash``; the UNIQUE
    constraint on ``prev_hash`` makes two writers racing for the same head fail (one retries) instead of forking."""

    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ts: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(40), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    org_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    subject: Mapped[str] = mapped_column(String(200), default="", index=True)
    data: Mapped[str] = mapped_column(Text)  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64))


class Complaint(Base):
    __tablename__ = "complaints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(20), default="open", index=True)  # open | dismissed | taken_down | key_revoked
    reason: Mapped[str] = mapped_column(Text)
    contact: Mapped[str] = mapped_column(String(320), default="")
    evidence_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    evidence: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # how the generation was identified
    generation_id: Mapped[str | None] = mapped_column(ForeignKey("generations.id"), nullable=True)
    org_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    decided_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    decision_note: Mapped[str] = mapped_column(Text, default="")


class BlockedOutput(Base):
    """Outputs taken down: their hash is refused if a generation ever produces it again, and files are deleted."""

    __tablename__ = "blocked_outputs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    complaint_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """An asynchronous generation (music, video): created by POST, run by the server's job workers,
    polled by GET. ``held`` is the amount reserved at creation, released when the job settles."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # music | video
    model: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)  # queued | running | succeeded | failed
    owner: Mapped[str] = mapped_column(String(200), default="")  # host:pid of the server process that runs it
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    held: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class File(Base):
    """An uploaded file (OpenAI's ``/v1/files``): the bytes under ``HOME/files/<id>/``, and for ``fine-tune`` files the
    data preparation's report on them (records read and kept, drop reasons with examples)."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(20), default="chat")  # chat | preference: what the records are
    report: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the preparation manifest
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class FineTuneJob(Base):
    """A fine-tuning job (OpenAI's ``/v1/fine_tuning/jobs``): trains in a separate process on the server's host, metered
    per trained token. ``held`` is the worst case reserved at creation, released when the job settles."""

    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(64), default="")
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[dict] = mapped_column(JSON, default=dict)  # {"type": "supervised" | "dpo", "lora": bool, ...}
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)  # resolved: n_epochs, batch_size, learning_rate_multiplier
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)  # queued|running|succeeded|failed|cancelled
    owner: Mapped[str] = mapped_column(String(200), default="")  # host:pid of the server process that runs it
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True, index=True)
    run_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    estimated_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # tokens of one epoch of the training data
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    held: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"code", "message", "param"}
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the training summary
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class FineTuneEvent(Base):
    """What a fine-tuning job reports as it goes (OpenAI's job events): messages and per-step metrics."""

    __tablename__ = "fine_tuning_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(10), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ConsoleSession(Base):
    """A browser's sign-in to the console. Only the SHA-256 of the cookie's token is stored; ``csrf`` is sent back
    with every form and every state-changing call. A session made from an API key ends when the key does."""

    __tablename__ = "console_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's token
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id"), nullable=True, index=True)  # None: operator
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Server(Base):
    """A live server process (``serve.fleet``): it renews ``heartbeat_at`` every few seconds. One whose heartbeat is
    older than the lease is dead: any live server deletes its row, releases its holds and fails its jobs."""

    __tablename__ = "servers"
    id: Mapped[str] = mapped_column(String(120), primary_key=True)  # host:pid:random
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)


class ServerHold(Base):
    """The hold of one request in flight on one server (a part of ``organizations.reserved``): released by whoever
    finds the server dead, so a killed process leaks no hold. A row per request, inserted at the hold and deleted at
    the settle: no two requests write the same row (a row per server and tenant made every request of a tenant on a
    server wait for the one before it to commit)."""

    __tablename__ = "server_holds"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # random, made by the server
    server_id: Mapped[str] = mapped_column(String(120), index=True)
    org_id: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(BigInteger, default=0)


class RateSlot(Base):
    """One second of a rate-limit window (``serve.ratelimit``, the shared SQL backend): requests and tokens admitted."""

    __tablename__ = "rate_slots"
    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    slot: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # epoch second
    requests: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
