"""The service's tables (SQLAlchemy 2 typed ORM). Schema changes go through Alembic (db/migrations).

Money is stored as integer micro-dollars (1e-6 USD) so sums are exact on every database.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Date, DateTime, Float, ForeignKey, Index, Integer, String, UniqueConstraint
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
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("org_id", "email"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    email: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
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
    list_price: Mapped[int] = mapped_column(BigInteger, default=0)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    compute_s: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)
