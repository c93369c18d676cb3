"""Plain functions over the tables. Balance changes are single conditional UPDATEs, so concurrent
requests can never spend more than a tenant has, on SQLite and on PostgreSQL alike."""
from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session

from aigc.db.models import (MICRO, PLAN_KINDS, ROLES, ApiKey, AuditEntry, ConsoleSession, File, FineTuneEvent, FineTuneJob, Generation, Job, Organization, Plan, Price,
                            Server, ServerHold, UsageRollup, User, utcnow)
from aigc.errors import Conflict, NotFound, UserError

KEY_PREFIX = "sk-aigc-"
DEFAULT_RPM, DEFAULT_TPM = 600, 200_000  # a plan's limits, and a key's where its organisation has no plan
# Who performs admin changes, for the audit log: the CLI by default; the API sets "operator" or "key:<prefix>".
ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("aigc_actor", default="cli")


def _audit(s: Session, action: str, org_id: int | None, subject: str, data: dict) -> None:
    from aigc.db import audit

    audit.append_session(s, f"admin.{action}", ACTOR.get(), org_id, subject, data)


CHANNEL = "aigc_changes"
CHANGES = ("keys", "prices", "policy", "blocked")


def announce(s, kind: str, org_id: int | None = None) -> None:
    """Tell every server process that cached ``kind`` (keys, prices, policy, blocked outputs) changed: on PostgreSQL a
    NOTIFY, delivered when this transaction commits (so also from the CLI); SQLite has no other process to tell, and
    its servers re-read within their cache time."""
    assert kind in CHANGES, kind
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": json.dumps({"kind": kind, "org": org_id})})


class PaymentRequired(Exception):
    """Quota or credit exhausted (HTTP 402)."""


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def micro(usd: float) -> int:
    return int(round(usd * MICRO))


# ---------------------------------------------------------------- plans and prices

def create_plan(s: Session, name: str, kind: str, monthly_fee: float = 0, included: float = 0, overage_rate: float | None = None,
                price_multiplier: float = 1.0, spend_limit: float | None = None, rpm: int = DEFAULT_RPM,
                tpm: int = DEFAULT_TPM) -> Plan:
    if kind not in PLAN_KINDS:
        raise UserError(f"unknown plan kind {kind!r} (allowed: {', '.join(PLAN_KINDS)})")
    if min(monthly_fee, included, price_multiplier) < 0 or (overage_rate is not None and overage_rate < 0) \
            or (spend_limit is not None and spend_limit < 0):
        raise UserError("plan prices, quotas and limits must be >= 0")
    if rpm < 1 or tpm < 1:
        raise UserError("rpm and tpm must be >= 1")
    if s.scalar(select(Plan).where(Plan.name == name)):
        raise Conflict(f"plan {name!r} already exists")
    plan = Plan(name=name, kind=kind, monthly_fee=micro(monthly_fee), included=micro(included), overage_rate=overage_rate,
                price_multiplier=price_multiplier, spend_limit=None if spend_limit is None else micro(spend_limit), rpm=rpm, tpm=tpm)
    s.add(plan)
    s.flush()
    _audit(s, "plan.create", None, f"plan:{name}", plan_out(plan))
    return plan


def get_plan(s: Session, name: str) -> Plan:
    plan = s.scalar(select(Plan).where(Plan.name == name))
    if plan is None:
        raise NotFound(f"no plan named {name!r}")
    return plan


def set_price(s: Session, model: str, version: str = "*", input_per_1k: float = 0, output_per_1k: float = 0,
              per_image: float = 0, per_second: float = 0, per_1k_train_tokens: float = 0, per_1k_chars: float = 0) -> Price:
    if min(input_per_1k, output_per_1k, per_image, per_second, per_1k_train_tokens, per_1k_chars) < 0:
        raise UserError("prices must be >= 0")
    price = s.scalar(select(Price).where(Price.model == model, Price.version == version))
    if price is None:
        price = Price(model=model, version=version)
        s.add(price)
    price.input_per_1k, price.output_per_1k = micro(input_per_1k), micro(output_per_1k)
    price.per_image, price.per_second = micro(per_image), micro(per_second)
    price.per_1k_train_tokens, price.per_1k_chars = micro(per_1k_train_tokens), micro(per_1k_chars)
    s.flush()
    _audit(s, "price.set", None, f"price:{model}@{version}", price_out(price))
    announce(s, "prices")
    return price


def find_price(s: Session, model: str, version: str) -> Price | None:
    """The exact version's price, else the model's "*" price, else the global "*" default."""
    rows = s.scalars(select(Price).where(Price.model.in_([model, "*"]))).all()
    ranked = sorted(rows, key=lambda p: (p.model != model, p.version != version, p.version != "*"))
    for p in ranked:
        if p.version in (version, "*"):
            return p
    return None


# ---------------------------------------------------------------- tenants, users, keys

def create_org(s: Session, name: str, plan: str | None = None, credits: float = 0) -> Organization:
    if not name.strip():
        raise UserError("organisation name must not be empty")
    if s.scalar(select(Organization).where(Organization.name == name)):
        raise Conflict(f"organisation {name!r} already exists")
    # The billing month opens at the first request (which also bills a subscription fee), hence the epoch start.
    org = Organization(name=name, plan_id=get_plan(s, plan).id if plan else None, credits=micro(credits),
                       period_start=dt.date(1970, 1, 1))
    s.add(org)
    s.flush()
    _audit(s, "org.create", org.id, f"org:{name}", {"plan": plan, "credits": credits})
    return org


def _is_id(x: str | int) -> bool:
    """A database id: ASCII digits only ("²".isdigit() is True but int() refuses it)."""
    return isinstance(x, int) or (x.isascii() and x.isdigit() and len(x) < 12)


def get_org(s: Session, name_or_id: str | int) -> Organization:
    org = s.get(Organization, int(name_or_id)) if _is_id(name_or_id) else \
        s.scalar(select(Organization).where(Organization.name == str(name_or_id)))
    if org is None:
        raise NotFound(f"no organisation {name_or_id!r}")
    return org


def add_credits(s: Session, org_id: int, usd: float) -> int:
    """Add (or with a negative amount, remove) prepaid credits atomically; returns the new balance."""
    amount = micro(usd)
    new = s.execute(update(Organization).where(Organization.id == org_id, Organization.credits + amount >= 0)
                    .values(credits=Organization.credits + amount).returning(Organization.credits)).scalar()
    if new is None:
        raise UserError("credits cannot go below zero")
    _audit(s, "org.credits", org_id, f"org:{org_id}", {"amount_usd": usd, "balance_micro": new})
    return new


def create_user(s: Session, org_id: int, email: str, role: str) -> User:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r} (allowed: {', '.join(ROLES)})")
    if "@" not in email:
        raise UserError(f"not an e-mail address: {email!r}")
    if s.scalar(select(User).where(User.org_id == org_id, User.email == email)):
        raise Conflict(f"user {email!r} already exists in this organisation")
    user = User(org_id=org_id, email=email, role=role)
    s.add(user)
    s.flush()
    _audit(s, "user.create", org_id, f"user:{user.id}", {"email": email, "role": role})
    return user


def get_user(s: Session, org_id: int, email_or_id: str | int) -> User:
    user = s.get(User, int(email_or_id)) if _is_id(email_or_id) else \
        s.scalar(select(User).where(User.org_id == org_id, User.email == str(email_or_id)))
    if user is None or user.org_id != org_id:
        raise NotFound(f"no user {email_or_id!r} in this organisation")
    return user


def create_key(s: Session, user: User, name: str = "", allowed_models: list[str] | None = None, rpm: int | None = None,
               tpm: int | None = None, expires_at: dt.datetime | None = None) -> tuple[ApiKey, str]:
    """A new key; the secret is returned once and only its hash is stored."""
    if (rpm is not None and rpm < 1) or (tpm is not None and tpm < 1):
        raise UserError("rpm and tpm must be >= 1")
    if expires_at is not None and expires_at <= utcnow():
        raise UserError("expiry must be in the future")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(org_id=user.org_id, user_id=user.id, name=name, prefix=secret[:16], hash=hash_key(secret),
                 allowed_models=allowed_models or None, rpm=rpm, tpm=tpm, expires_at=expires_at)
    s.add(key)
    s.flush()
    _audit(s, "key.create", user.org_id, f"key:{key.id}", {"prefix": key.prefix, "user_id": user.id, "name": name,
                                                          "allowed_models": allowed_models, "rpm": rpm, "tpm": tpm,
                                                          "expires_at": expires_at})
    return key, secret


def revoke_key(s: Session, org_id: int, key_id: int) -> ApiKey:
    key = s.get(ApiKey, key_id)
    if key is None or key.org_id != org_id:  # another tenant's key looks exactly like a missing one
        raise NotFound(f"no key {key_id} in this organisation")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        s.flush()
        _audit(s, "key.revoke", org_id, f"key:{key_id}", {"prefix": key.prefix})
        announce(s, "keys", org_id)
    return key


@dataclass(frozen=True)
class Principal:
    """Who is calling: a snapshot of the key, its user and its tenant's plan, cached for a few seconds."""

    key_id: int
    key_prefix: str
    org_id: int
    org_name: str
    user_id: int
    role: str
    allowed_models: tuple[str, ...] | None
    rpm: int
    tpm: int
    expires_at: dt.datetime | None
    revoked: bool
    plan_kind: str | None
    operator: bool = False

    @property
    def limit_key(self):
        """What the rate limiter counts against: the key, or the signed-in user when there is none."""
        return self.key_id or ("user", self.user_id)


def lookup_key(s: Session, secret: str) -> Principal | None:
    return _key_principal(s, ApiKey.hash == hash_key(secret))


def key_principal(s: Session, key_id: int) -> Principal | None:
    return _key_principal(s, ApiKey.id == key_id)


def _key_principal(s: Session, where) -> Principal | None:
    row = s.execute(select(ApiKey, User, Organization, Plan).join(User, ApiKey.user_id == User.id)
                    .join(Organization, ApiKey.org_id == Organization.id).outerjoin(Plan, Organization.plan_id == Plan.id)
                    .where(where)).first()
    if row is None:
        return None
    key, user, org, plan = row
    return Principal(key.id, key.prefix, org.id, org.name, user.id, user.role,
                     tuple(key.allowed_models) if key.allowed_models else None,
                     key.rpm or (plan.rpm if plan else DEFAULT_RPM), key.tpm or (plan.tpm if plan else DEFAULT_TPM),
                     key.expires_at, key.revoked_at is not None, plan.kind if plan else None)


def set_org_plan(s: Session, org_id: int, plan: str) -> Organization:
    org = get_org(s, org_id)
    org.plan_id = get_plan(s, plan).id
    s.flush()
    _audit(s, "org.plan", org_id, f"org:{org_id}", {"plan": plan})
    announce(s, "keys", org_id)  # a key's limits come from its plan
    return org


def list_all(s: Session, model, org_id: int | None = None) -> list:
    q = select(model)
    if org_id is not None:
        q = q.where(model.org_id == org_id)
    return list(s.scalars(q.order_by(model.id)).all())


def plan_out(p: Plan) -> dict:
    return {"id": p.id, "name": p.name, "kind": p.kind, "monthly_fee": p.monthly_fee / MICRO, "included": p.included / MICRO,
            "overage_rate": p.overage_rate, "price_multiplier": p.price_multiplier,
            "spend_limit": None if p.spend_limit is None else p.spend_limit / MICRO, "rpm": p.rpm, "tpm": p.tpm}


def price_out(p: Price) -> dict:
    return {"model": p.model, "version": p.version, "input_per_1k": p.input_per_1k / MICRO, "output_per_1k": p.output_per_1k / MICRO,
            "per_image": p.per_image / MICRO, "per_second": p.per_second / MICRO,
            "per_1k_train_tokens": (p.per_1k_train_tokens or 0) / MICRO, "per_1k_chars": (p.per_1k_chars or 0) / MICRO}


def org_out(s: Session, o: Organization) -> dict:
    plan = s.get(Plan, o.plan_id) if o.plan_id else None
    return {"id": o.id, "name": o.name, "plan": plan.name if plan else None, "credits": o.credits / MICRO,
            "reserved": o.reserved / MICRO, "period_start": o.period_start.isoformat(), "period_list_price": o.period_list / MICRO,
            "period_charged": o.period_charged / MICRO}


def user_out(u: User) -> dict:
    return {"id": u.id, "org_id": u.org_id, "email": u.email, "role": u.role, "created_at": u.created_at.isoformat()}


def key_out(k: ApiKey) -> dict:
    return {"id": k.id, "org_id": k.org_id, "user_id": k.user_id, "name": k.name, "prefix": k.prefix,
            "allowed_models": k.allowed_models, "rpm": k.rpm, "tpm": k.tpm,
            "expires_at": k.expires_at.isoformat() if k.expires_at else None,
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None, "created_at": k.created_at.isoformat()}


# ---------------------------------------------------------------- metering

@dataclass
class Units:
    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    seconds: float = 0.0
    train_tokens: int = 0  # fine-tuning: tokens trained on (the training data's tokens x epochs)
    characters: int = 0  # speech: characters of input spoken


def list_price(price: Price | None, u: Units) -> int:
    if price is None:
        return 0
    return int(round(u.input_tokens * price.input_per_1k / 1000 + u.output_tokens * price.output_per_1k / 1000
                     + u.images * price.per_image + u.seconds * price.per_second
                     + u.train_tokens * (price.per_1k_train_tokens or 0) / 1000
                     + u.characters * (price.per_1k_chars or 0) / 1000))


# Dates are bound as ISO strings (what SQLAlchemy stores in SQLite; PostgreSQL casts them).
# The metering hot path runs on every request, so it is plain SQL compiled once (the same text on
# SQLite and PostgreSQL): building ORM statements per request cost ~3 ms of CPU, this ~0.3 ms.
_BILLING = text(
    "SELECT o.period_start, p.kind, p.monthly_fee, p.included, p.overage_rate, p.price_multiplier, p.spend_limit "
    "FROM organizations o LEFT JOIN plans p ON p.id = o.plan_id WHERE o.id = :org")
_ROLL = text("UPDATE organizations SET period_start = :month, period_list = 0, period_charged = 0 "
             "WHERE id = :org AND period_start < :month")
_HOLD = {
    "quota": text("UPDATE organizations SET reserved = reserved + :amount WHERE id = :org "
                  "AND period_list + reserved + :amount <= :limit"),
    "credits": text("UPDATE organizations SET reserved = reserved + :amount WHERE id = :org AND credits - reserved >= :amount"),
    "spend": text("UPDATE organizations SET reserved = reserved + :amount WHERE id = :org "
                  "AND period_charged + reserved + :amount <= :limit"),
    "none": text("UPDATE organizations SET reserved = reserved + :amount WHERE id = :org"),
}
_SETTLE_SUB = text("UPDATE organizations SET reserved = reserved - :held, period_list = period_list + :lp WHERE id = :org "
                   "RETURNING period_list")
_CHARGE_SUB = text("UPDATE organizations SET period_charged = period_charged + :charged WHERE id = :org")
_SETTLE = text("UPDATE organizations SET reserved = reserved - :held, period_list = period_list + :lp, "
               "period_charged = period_charged + :charged, credits = credits - :debit WHERE id = :org")
_RECORD = text(
    "INSERT INTO usage_records (request_id, created_at, day, org_id, key_id, model, version, endpoint, status, input_tokens, "
    "output_tokens, images, seconds, train_tokens, characters, list_price, charged, compute_s, cost) VALUES (:request_id, "
    ":created_at, :day, :org_id, :key_id, :model, :version, :endpoint, :status, :input_tokens, :output_tokens, :images, :seconds, "
    ":train_tokens, :characters, :list_price, :charged, :compute_s, :cost)")
ROLLUP_SUMS = ("requests", "input_tokens", "output_tokens", "images", "seconds", "train_tokens", "characters", "list_price", "charged",
               "compute_s", "cost")
_ROLLUP = text(
    "INSERT INTO usage_rollups (day, org_id, key_id, model, " + ", ".join(ROLLUP_SUMS) + ") VALUES (:day, :org_id, :key_id, :model, "
    + ", ".join(":" + c for c in ROLLUP_SUMS) + ") ON CONFLICT (day, org_id, key_id, model) DO UPDATE SET "
    + ", ".join(f"{c} = usage_rollups.{c} + excluded.{c}" for c in ROLLUP_SUMS))


@dataclass
class PlanTerms:
    period_start: dt.date
    kind: str
    monthly_fee: int
    included: int
    overage_rate: float | None
    price_multiplier: float
    spend_limit: int | None


def load_billing(s, org_id: int) -> PlanTerms:
    row = s.execute(_BILLING, {"org": org_id}).first()
    if row is None or row[1] is None:
        raise PaymentRequired("this organisation has no billing plan; ask the operator to assign one")
    start = row[0] if isinstance(row[0], dt.date) else dt.date.fromisoformat(str(row[0])[:10])
    return PlanTerms(start, *row[1:])


def _roll_period(s, org_id: int, b: PlanTerms) -> None:
    """Start a new billing month at most once (the conditional UPDATE picks one winner) and bill its fee."""
    month = utcnow().date().replace(day=1)
    if b.period_start >= month:
        return
    if s.execute(_ROLL, {"month": str(month), "org": org_id}).rowcount and b.kind == "subscription" and b.monthly_fee:
        _append_usage(s, f"fee-{org_id}-{month.isoformat()}", org_id, None, "subscription", "", "subscription", "ok",
                      Units(), 0, b.monthly_fee, 0.0, 0)


_TRACK = text("INSERT INTO server_holds (id, server_id, org_id, amount) VALUES (:id, :server, :org, :amount)")


def new_hold_id() -> int:
    return secrets.randbits(62) + 1


def reserve(s, org_id: int, estimate_list: int, server: str | None = None, hold_id: int | None = None) -> int:
    """Hold the most a request can cost before running it. Returns the amount held (for ``settle``).

    ``server``: the server process whose request it is; the hold is kept in ``server_holds`` as row ``hold_id``
    (``new_hold_id``), so that when the server dies whoever finds it dead releases exactly what it held.
    Raises PaymentRequired when the quota, credit or spend limit cannot cover it.
    """
    b = load_billing(s, org_id)
    _roll_period(s, org_id, b)
    limit = None
    if b.kind == "subscription" and b.overage_rate is None:
        amount, which, limit, what = estimate_list, "quota", b.included, "monthly quota"
    else:
        amount = int(round(estimate_list * (b.overage_rate if b.kind == "subscription" else b.price_multiplier)))
        if b.kind == "prepaid":
            which, what = "credits", "prepaid credits"
        elif b.spend_limit is not None:
            which, limit, what = "spend", b.spend_limit, "monthly spend limit"
        else:
            which, what = "none", ""
    if server is not None and amount:  # a row of its own: no lock another request waits for
        if hold_id is None:
            raise ValueError("a server's hold needs its hold_id (new_hold_id): settle finds the row by it")
        s.execute(_TRACK, {"id": hold_id, "server": server, "org": org_id, "amount": amount})
    if s.execute(_HOLD[which], {"amount": amount, "org": org_id, "limit": limit}).rowcount != 1:
        raise PaymentRequired(f"{what} exhausted: this request could cost up to ${amount / MICRO:.6f}")  # rolls back both
    return amount


def untrack_hold(s, server: str | None, org_id: int, held: int, hold_id: int | None = None) -> int:
    """Delete the request's row ``hold_id`` of ``server``'s holds: what may still be released from the tenant's balance
    (0 when the server was found dead meanwhile and its holds were already released)."""
    if server is None or not held:
        return held
    return held if s.execute(_UNTRACK, {"server": server, "ids": [hold_id]}).first() is not None else 0


_UNTRACK = text("DELETE FROM server_holds WHERE server_id = :server AND id IN :ids RETURNING id").bindparams(
    bindparam("ids", expanding=True))


@dataclass
class Settled:
    charged: int
    cost: int
    list_price: int


@dataclass
class SettleItem:
    """One request to settle: what it used (``units`` at ``price``) and what it held (``held``, tracked as row
    ``hold_id`` of ``server``'s holds when ``server`` is set)."""

    request_id: str
    principal: Principal
    model: str
    version: str
    endpoint: str
    status: str
    units: Units
    price: Price | None
    held: int
    compute_s: float
    server: str | None = None
    hold_id: int | None = None


def settle(s, request_id: str, principal: Principal, model: str, version: str, endpoint: str, status: str,
           units: Units, price: Price | None, held: int, compute_s: float, cost_per_s: float,
           server: str | None = None, hold_id: int | None = None) -> Settled:
    """Release the hold, charge what was used and append the usage record + rollup, in the caller's transaction."""
    return settle_many(s, [SettleItem(request_id, principal, model, version, endpoint, status, units, price, held, compute_s,
                                      server, hold_id)], cost_per_s)[0]


def settle_many(s, items: list[SettleItem], cost_per_s: float) -> list[Settled]:
    """``settle`` for many requests in one transaction (a group commit): each tenant's row is updated once, with the
    sums, and each rollup row once; the charges are exactly those of settling the items one after another in order.
    Rows are locked in a fixed order (tenants, then rollups, by key), so two servers settling at once never deadlock."""
    held = _untrack(s, items)
    orgs = sorted({it.principal.org_id for it in items})
    terms = {org: load_billing(s, org) for org in orgs}
    lps = [list_price(it.price, it.units) for it in items]
    charged = [0] * len(items)
    for org in orgs:
        mine = [i for i, it in enumerate(items) if it.principal.org_id == org]
        b, lp, hold = terms[org], sum(lps[i] for i in mine), sum(held[i] for i in mine)
        if b.kind == "subscription":
            total = s.execute(_SETTLE_SUB, {"held": hold, "lp": lp, "org": org}).scalar()
            before = total - lp  # the period's list price before these items, then item by item as if settled in turn
            for i in mine:
                after = before + lps[i]
                over = max(0, after - b.included) - max(0, before - b.included)
                charged[i], before = int(round(over * (b.overage_rate or 0.0))), after
            if any(charged[i] for i in mine):
                s.execute(_CHARGE_SUB, {"charged": sum(charged[i] for i in mine), "org": org})
        else:
            for i in mine:
                charged[i] = int(round(lps[i] * b.price_multiplier))
            debit = sum(charged[i] for i in mine) if b.kind == "prepaid" else 0
            s.execute(_SETTLE, {"held": hold, "lp": lp, "charged": sum(charged[i] for i in mine), "debit": debit, "org": org})
    costs = [int(round(it.compute_s * cost_per_s * MICRO)) for it in items]
    _append_usage_many(s, [(it.request_id, it.principal.org_id, it.principal.key_id or None, it.model, it.version, it.endpoint,
                            it.status, it.units, lps[i], charged[i], it.compute_s, costs[i]) for i, it in enumerate(items)])
    return [Settled(charged[i], costs[i], lps[i]) for i in range(len(items))]


def _untrack(s, items: list[SettleItem]) -> list[int]:
    """Delete the items' rows of their servers' holds: what each may still release from its tenant's balance (0 for a
    hold whose server was found dead meanwhile: its holds were already released)."""
    held = [it.held for it in items]
    by_server: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        if it.server is not None and it.held:
            by_server.setdefault(it.server, []).append(i)
    for server, idx in by_server.items():
        gone = {r[0] for r in s.execute(_UNTRACK, {"server": server, "ids": [items[i].hold_id for i in idx]})}
        for i in idx:
            if items[i].hold_id not in gone:
                held[i] = 0
    return held


def _append_usage(s, request_id: str, org_id: int, key_id: int | None, model: str, version: str, endpoint: str,
                  status: str, u: Units, lp: int, charged: int, compute_s: float, cost: int) -> None:
    _append_usage_many(s, [(request_id, org_id, key_id, model, version, endpoint, status, u, lp, charged, compute_s, cost)])


def _append_usage_many(s, rows: list[tuple]) -> None:
    """Usage records (one statement for all, sent at once) and their daily rollups, summed per rollup row first."""
    now = utcnow()
    day = str(now.date())
    records, rollups = [], {}
    for request_id, org_id, key_id, model, version, endpoint, status, u, lp, charged, compute_s, cost in rows:
        sums = dict(input_tokens=u.input_tokens, output_tokens=u.output_tokens, images=u.images, seconds=u.seconds,
                    train_tokens=u.train_tokens, characters=u.characters, list_price=lp, charged=charged, compute_s=compute_s,
                    cost=cost)
        records.append(dict(request_id=request_id, created_at=str(now), day=day, org_id=org_id, key_id=key_id, model=model,
                            version=version, endpoint=endpoint, status=status, **sums))
        r = rollups.setdefault((org_id, key_id or 0, model), dict.fromkeys(ROLLUP_SUMS, 0))
        r["requests"] += 1
        for c, v in sums.items():
            r[c] += v
    s.execute(_RECORD, records if len(records) > 1 else records[0])
    params = [dict(day=day, org_id=k[0], key_id=k[1], model=k[2], **v) for k, v in sorted(rollups.items())]
    s.execute(_ROLLUP, params if len(params) > 1 else params[0])


# ---------------------------------------------------------------- reports

GROUPS = {"tenant": UsageRollup.org_id, "key": UsageRollup.key_id, "model": UsageRollup.model, "day": UsageRollup.day}


def usage_report(s: Session, group_by: list[str], start: dt.date | None = None, end: dt.date | None = None,
                 org_id: int | None = None, key_id: int | None = None) -> list[dict]:
    """Totals from the daily rollups (so the cost is per rollup row, not per request), in USD."""
    unknown = [g for g in group_by if g not in GROUPS]
    if unknown:
        raise UserError(f"unknown group_by {unknown[0]!r} (allowed: {', '.join(GROUPS)})")
    if start and end and start > end:
        raise UserError("start must not be after end")
    cols = [GROUPS[g].label(g) for g in group_by]
    sums = [func.sum(getattr(UsageRollup, c)).label(c) for c in ROLLUP_SUMS]
    q = select(*cols, *sums)
    if start:
        q = q.where(UsageRollup.day >= start)
    if end:
        q = q.where(UsageRollup.day <= end)
    if org_id is not None:
        q = q.where(UsageRollup.org_id == org_id)
    if key_id is not None:
        q = q.where(UsageRollup.key_id == key_id)
    if cols:
        q = q.group_by(*cols).order_by(*cols)
    out = []
    for row in s.execute(q).mappings():
        if row["requests"] is None:
            continue
        r = {g: (row[g].isoformat() if g == "day" else row[g]) for g in group_by}
        # PostgreSQL sums integers as NUMERIC (Decimal): everything is made int/float here
        revenue, cost = int(row["charged"] or 0) / MICRO, int(row["cost"] or 0) / MICRO
        r.update(requests=int(row["requests"]), input_tokens=int(row["input_tokens"]), output_tokens=int(row["output_tokens"]),
                 images=int(row["images"]), seconds=round(float(row["seconds"]), 3), train_tokens=int(row["train_tokens"] or 0),
                 characters=int(row["characters"] or 0),
                 list_price=int(row["list_price"]) / MICRO,
                 revenue=revenue, compute_s=round(float(row["compute_s"]), 3), cost=cost, margin=round(revenue - cost, 6))
        out.append(r)
    return out


# ---------------------------------------------------------------- governance on the request path (Core: hot path)

_POLICY = text("SELECT policy, moderation FROM organizations WHERE id = :i")
_BLOCKED = text("SELECT sha256 FROM blocked_outputs")


def ping(sessions) -> None:
    """Raise if the database does not answer."""
    with sessions() as s:
        s.execute(text("SELECT 1"))


def tenant_policy(conn, org_id: int) -> tuple[dict | None, str | None]:
    """(the organisation's policy overrides, its moderation rules as YAML); (None, None) for an unknown id."""
    row = conn.execute(_POLICY, {"i": org_id}).first()
    raw, rules = row if row is not None else (None, None)
    if isinstance(raw, str):
        raw = json.loads(raw)
    return raw, rules


def blocked_digests(conn) -> set[str]:
    """SHA-256 of every output taken down."""
    return {h for (h,) in conn.execute(_BLOCKED)}


def insert_generation(conn, row: dict) -> None:
    """One row of the generation log (``db.models.Generation``'s columns)."""
    conn.execute(Generation.__table__.insert(), row)


# ---------------------------------------------------------------- jobs

def _carry_hold(s: Session, server: str | None, org_id: int, held: int, hold_id: int | None) -> None:
    """A job's row carries its hold from now on: it leaves the server's holds (which a dead server's reaper releases)."""
    if untrack_hold(s, server, org_id, held, hold_id) != held:
        raise Conflict("this server lost its lease while the job was created; its hold was released: send the request again")


def create_job(s: Session, server: str | None = None, hold_id: int | None = None, **fields):
    """A queued job; ``server``, ``hold_id``: the hold the job takes over (``reserve``)."""
    _carry_hold(s, server, fields["org_id"], fields.get("held", 0), hold_id)
    job = Job(status="queued", created_at=utcnow(), **fields)
    s.add(job)
    s.flush()
    return job


def get_job(s: Session, job_id: str, org_id: int | None):
    """The job, if it exists and belongs to ``org_id`` (None: any tenant's)."""
    job = s.get(Job, job_id)
    if job is None or (org_id is not None and job.org_id != org_id):
        raise NotFound(f"no job {job_id!r}")
    return job


def list_jobs(s: Session, org_id: int | None, limit: int) -> list:
    q = select(Job)
    if org_id is not None:
        q = q.where(Job.org_id == org_id)
    return list(s.scalars(q.order_by(Job.created_at.desc()).limit(limit)).all())


def unfinished_jobs(s: Session) -> list:
    return list(s.scalars(select(Job).where(Job.status.in_(("queued", "running")))).all())


def start_job(conn, job_id: str) -> None:
    t = Job.__table__  # Core on typed columns, so the JSON result is encoded for either database
    conn.execute(update(t).where(t.c.id == job_id).values(status="running", started_at=utcnow()))


def finish_job(conn, job_id: str, status: str, result: dict | None, error: str | None) -> None:
    t = Job.__table__
    conn.execute(update(t).where(t.c.id == job_id).values(status=status, result=result, error=error, finished_at=utcnow()))


# ---------------------------------------------------------------- files and fine-tuning jobs

# Unfinished = not settled yet: a cancelled job is still unfinished until its training process has stopped.
_FT_UNFINISHED = FineTuneJob.finished_at.is_(None)


def add_file(s: Session, **fields) -> File:
    f = File(created_at=utcnow(), **fields)
    s.add(f)
    s.flush()
    _audit(s, "file.create", f.org_id, f"file:{f.id}", {"filename": f.filename, "bytes": f.bytes, "sha256": f.sha256,
                                                       "purpose": f.purpose})
    return f


def get_file(s: Session, file_id: str, org_id: int) -> File:
    """The file, if it exists and belongs to ``org_id`` (another tenant's file does not exist for this one)."""
    f = s.get(File, file_id)
    if f is None or f.org_id != org_id:
        raise NotFound(f"no file {file_id!r}")
    return f


def list_files(s: Session, org_id: int, purpose: str | None, limit: int, after: str | None, ascending: bool) -> list[File]:
    q = select(File).where(File.org_id == org_id)
    if purpose:
        q = q.where(File.purpose == purpose)
    order = (File.created_at.asc(), File.id.asc()) if ascending else (File.created_at.desc(), File.id.desc())
    if after:
        ref = get_file(s, after, org_id)
        if ascending:
            q = q.where((File.created_at > ref.created_at) | ((File.created_at == ref.created_at) & (File.id > ref.id)))
        else:
            q = q.where((File.created_at < ref.created_at) | ((File.created_at == ref.created_at) & (File.id < ref.id)))
    return list(s.scalars(q.order_by(*order).limit(limit)).all())


def delete_file(s: Session, file_id: str, org_id: int) -> File:
    """Delete the file's row (the caller removes its bytes after the commit); refused while an unfinished job uses it."""
    f = get_file(s, file_id, org_id)
    busy = s.scalar(select(FineTuneJob.id).where(_FT_UNFINISHED,
                                                 (FineTuneJob.training_file == file_id) | (FineTuneJob.validation_file == file_id)))
    if busy:
        raise Conflict(f"the file {file_id!r} is used by the fine-tuning job {busy} until it finishes")
    s.delete(f)
    _audit(s, "file.delete", org_id, f"file:{file_id}", {"filename": f.filename})
    return f


def active_fine_tunes(s: Session, org_id: int) -> int:
    return int(s.scalar(select(func.count()).select_from(FineTuneJob).where(FineTuneJob.org_id == org_id,
                                                                              _FT_UNFINISHED)) or 0)


def create_fine_tune(s: Session, server: str | None = None, hold_id: int | None = None, **fields) -> FineTuneJob:
    _carry_hold(s, server, fields["org_id"], fields.get("held", 0), hold_id)
    job = FineTuneJob(status="queued", created_at=utcnow(), **fields)
    s.add(job)
    s.flush()
    _audit(s, "fine_tune.create", job.org_id, f"fine_tune:{job.id}", {"model": job.model, "training_file": job.training_file,
                                                                       "validation_file": job.validation_file, "method": job.method,
                                                                       "hyperparameters": job.hyperparameters, "held": job.held})
    return job


def get_fine_tune(s: Session, job_id: str, org_id: int | None) -> FineTuneJob:
    job = s.get(FineTuneJob, job_id)
    if job is None or (org_id is not None and job.org_id != org_id):
        raise NotFound(f"no fine-tuning job {job_id!r}")
    return job


def list_fine_tunes(s: Session, org_id: int, limit: int, after: str | None) -> list[FineTuneJob]:
    q = select(FineTuneJob).where(FineTuneJob.org_id == org_id)
    if after:
        ref = get_fine_tune(s, after, org_id)
        q = q.where((FineTuneJob.created_at < ref.created_at) | ((FineTuneJob.created_at == ref.created_at) & (FineTuneJob.id < ref.id)))
    return list(s.scalars(q.order_by(FineTuneJob.created_at.desc(), FineTuneJob.id.desc()).limit(limit)).all())


def unfinished_fine_tunes(s: Session) -> list[FineTuneJob]:
    return list(s.scalars(select(FineTuneJob).where(_FT_UNFINISHED)).all())


def fine_tuned_models(s: Session) -> list[FineTuneJob]:
    """Succeeded jobs whose model is registered (each tenant's ``ft:`` models)."""
    return list(s.scalars(select(FineTuneJob).where(FineTuneJob.status == "succeeded", FineTuneJob.fine_tuned_model.is_not(None))).all())


def update_fine_tune(conn, job_id: str, **values) -> int:
    """Set columns of a job (Core, usable inside a settle transaction); ``only_if`` limits it to jobs in those states,
    ``unsettled`` to jobs not settled yet (of two servers settling a job at once, one updates it and settles)."""
    t = FineTuneJob.__table__
    only = values.pop("only_if", None)
    q = update(t).where(t.c.id == job_id)
    if only:
        q = q.where(t.c.status.in_(only))
    if values.pop("unsettled", False):
        q = q.where(t.c.finished_at.is_(None))
    return conn.execute(q.values(**values)).rowcount


def add_event(conn, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> None:
    conn.execute(FineTuneEvent.__table__.insert(), {"job_id": job_id, "created_at": utcnow(), "level": level, "type": type,
                                                    "message": message, "data": data})


def events_since(s: Session, job_id: str, since: int, limit: int = 1000) -> list[FineTuneEvent]:
    """Oldest first, the events written after the one numbered ``since`` (what a live view has not shown yet)."""
    q = select(FineTuneEvent).where(FineTuneEvent.job_id == job_id, FineTuneEvent.id > since)
    return list(s.scalars(q.order_by(FineTuneEvent.id).limit(limit)).all())


def list_events(s: Session, job_id: str, limit: int, after: int | None) -> list[FineTuneEvent]:
    """Newest first, as OpenAI lists them; ``after``: events older than that one."""
    q = select(FineTuneEvent).where(FineTuneEvent.job_id == job_id)
    if after is not None:
        q = q.where(FineTuneEvent.id < after)
    return list(s.scalars(q.order_by(FineTuneEvent.id.desc()).limit(limit)).all())


# ---------------------------------------------------------------- console: passwords and browser sessions

# scrypt, memory-hard: n=2**14, r=8 takes 16 MiB and ~50 ms per guess (OWASP's minimum for scrypt)
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
MIN_PASSWORD = 10


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, maxmem=64 * 2**20, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str | None) -> bool:
    if not stored or not stored.startswith("scrypt$"):
        hashlib.scrypt(password.encode(), salt=b"0" * 16, maxmem=64 * 2**20, dklen=32, **SCRYPT)  # the same time either way
        return False
    _, n, r, p, salt, digest = stored.split("$")
    got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), maxmem=64 * 2**20, dklen=32)
    return secrets.compare_digest(got.hex(), digest)


def set_password(s: Session, org_id: int, email_or_id: str | int, password: str) -> User:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password has at least {MIN_PASSWORD} characters")
    user = get_user(s, org_id, email_or_id)
    user.password_hash = hash_password(password)
    s.flush()
    _audit(s, "user.password", org_id, f"user:{user.id}", {"email": user.email})
    return user


def users_by_email(s: Session, email: str) -> list[tuple[User, Organization]]:
    return list(s.execute(select(User, Organization).join(Organization, User.org_id == Organization.id)
                          .where(User.email == email)).all())


def user_principal(s: Session, user: User) -> Principal:
    """A signed-in user without a key: the plan's limits, every model; rate-limited as the user."""
    org = s.get(Organization, user.org_id)
    plan = s.get(Plan, org.plan_id) if org.plan_id else None
    return Principal(0, f"user:{user.id}", org.id, org.name, user.id, user.role, None, plan.rpm if plan else DEFAULT_RPM,
                     plan.tpm if plan else DEFAULT_TPM, None, False, plan.kind if plan else None)


def create_console_session(s: Session, org_id: int | None, user_id: int | None, key_id: int | None, who: str) -> tuple[str, str]:
    """(cookie token, CSRF token) of a new browser session; only the token's hash is stored."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    s.add(ConsoleSession(id=hash_key(token), org_id=org_id, user_id=user_id, key_id=key_id, csrf=csrf))
    s.flush()
    _audit(s, "console.sign_in", org_id, who, {"user_id": user_id, "key_id": key_id})
    return token, csrf


def console_session(s: Session, token: str, idle: dt.timedelta) -> ConsoleSession | None:
    """The live session of a cookie (its idle clock restarted), or None: unknown, or idle longer than ``idle``."""
    row = s.get(ConsoleSession, hash_key(token))
    if row is None:
        return None
    now = utcnow()
    if now - row.last_seen > idle:
        s.delete(row)
        s.flush()
        return None
    if now - row.last_seen > dt.timedelta(seconds=30):  # one write a minute at most, not one per request
        row.last_seen = now
        s.flush()
    return row


def purge_console_sessions(s: Session, idle: dt.timedelta) -> int:
    """Forget the sessions idle longer than ``idle`` (run at each sign-in, so the table stays the size of its users)."""
    return s.query(ConsoleSession).filter(ConsoleSession.last_seen < utcnow() - idle).delete(synchronize_session=False)


def end_console_session(s: Session, token: str) -> None:
    row = s.get(ConsoleSession, hash_key(token))
    if row is not None:
        s.delete(row)
        _audit(s, "console.sign_out", row.org_id, f"session:{row.id[:12]}", {"user_id": row.user_id, "key_id": row.key_id})


def list_audit(s: Session, org_id: int | None = None, actor: str | None = None, kind: str | None = None,
               limit: int = 100) -> list[AuditEntry]:
    """The newest audit entries, filtered by tenant, actor (prefix) and action (prefix)."""
    q = select(AuditEntry)
    if org_id is not None:
        q = q.where(AuditEntry.org_id == org_id)
    if actor:
        q = q.where(AuditEntry.actor.startswith(actor, autoescape=True))
    if kind:
        q = q.where(AuditEntry.kind.startswith(kind, autoescape=True))
    return list(s.scalars(q.order_by(AuditEntry.seq.desc()).limit(limit)).all())


# ---------------------------------------------------------------- the fleet: live servers, their holds and jobs

def register_server(conn, server_id: str, host: str, pid: int) -> None:
    now = utcnow()
    conn.execute(Server.__table__.insert().values(id=server_id, host=host, pid=pid, started_at=now, heartbeat_at=now))


def heartbeat(conn, server_id: str) -> bool:
    """Renew this server's lease; False when its row is gone (another server found it dead)."""
    t = Server.__table__
    return conn.execute(update(t).where(t.c.id == server_id).values(heartbeat_at=utcnow())).rowcount == 1


def servers(conn) -> list[tuple[str, str, int]]:
    return [tuple(r) for r in conn.execute(select(Server.id, Server.host, Server.pid)).all()]


def live_servers(conn) -> set[str]:
    return set(conn.execute(select(Server.id)).scalars())


def expired_servers(conn, lease_s: float) -> list[str]:
    cutoff = utcnow() - dt.timedelta(seconds=lease_s)
    return list(conn.execute(select(Server.id).where(Server.heartbeat_at < cutoff)).scalars())


def reap_server(conn, server_id: str, lease_s: float | None) -> bool:
    """Remove a server whose lease expired (``lease_s``; None: unconditionally, the server itself at a clean stop).
    False when another server reaped it first (the conditional DELETE picks one winner) or it renewed meanwhile."""
    t = Server.__table__
    q = t.delete().where(t.c.id == server_id)
    if lease_s is not None:
        q = q.where(t.c.heartbeat_at < utcnow() - dt.timedelta(seconds=lease_s))
    return conn.execute(q).rowcount == 1


def release_orphan_holds(conn) -> dict[int, int]:
    """Release what servers no longer alive held for their requests in flight: {org id: amount released}."""
    h = ServerHold.__table__
    # the rows are deleted first: of two servers releasing them at once, one deletes and releases, the other finds none
    rows = conn.execute(h.delete().where(h.c.server_id.not_in(select(Server.id))).returning(h.c.org_id, h.c.amount)).all()
    released: dict[int, int] = {}
    for org_id, amount in rows:
        released[org_id] = released.get(org_id, 0) + amount
    for org_id, amount in sorted(released.items()):
        if amount:
            conn.execute(text("UPDATE organizations SET reserved = reserved - :a WHERE id = :o"), {"a": amount, "o": org_id})
    return released


def claim_unfinished_job(conn, job_id: str, error: str) -> bool:
    """Mark an unfinished job failed (once: False when it already finished, or someone else claimed it)."""
    t = Job.__table__
    return conn.execute(update(t).where(t.c.id == job_id, t.c.status.in_(("queued", "running")))
                        .values(status="failed", error=error, finished_at=utcnow())).rowcount == 1
