"""Plans, holds and charges, usage records and rollups: on SQLite and (in CI) on a real PostgreSQL server."""
import datetime as dt
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, inspect, select

from aigc.db import crud
from aigc.db.crud import PaymentRequired, Units
from aigc.db.models import MICRO, Organization, UsageRecord, UsageRollup
from aigc.db.session import open_db
from tests.serve.conftest import seed_billing
from tests.serve.helpers import tenant


def principal(sessions, secret):
    with sessions() as s:
        return crud.lookup_key(s, secret)


def spend(sessions, p, model="m", units=Units(1000, 1000), estimate=None):
    """One metered request: hold, then settle. Returns the charge in micro-USD, or None if refused."""
    with sessions.begin() as s:
        price = crud.find_price(s, model, "v1")
        try:
            held = crud.reserve(s, p.org_id, crud.list_price(price, estimate or units))
        except PaymentRequired:
            return None
    with sessions.begin() as s:
        return crud.settle(s, "r-" + uuid.uuid4().hex, p, model, "v1", "completions", "ok", units, price, held, 0.5, 0.001).charged


def test_migrations_create_schema(database_url):
    sessions = open_db(database_url)
    names = set(inspect(sessions.kw["bind"]).get_table_names())
    assert {"plans", "organizations", "users", "api_keys", "prices", "usage_records", "usage_rollups", "alembic_version"} <= names
    assert {"generations", "audit_log", "complaints", "blocked_outputs"} <= names
    open_db(database_url)  # upgrading an up-to-date schema is a no-op
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from aigc.db.models import Base

    with sessions.kw["bind"].connect() as conn:  # the migrations build exactly what the models declare
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_concurrent_requests_never_overspend_credits(database_url):
    sessions = open_db(database_url)
    seed_billing(sessions)
    # one request = 1K in + 1K out = $0.03; $0.30 of credit covers exactly 10 of 60 concurrent requests
    org, key = tenant(sessions, "acme", "prepaid", credits=0.30)
    p = principal(sessions, key)
    barrier = threading.Barrier(60)

    def one(_):
        barrier.wait()
        return spend(sessions, p)

    with ThreadPoolExecutor(60) as pool:
        results = list(pool.map(one, range(60)))
    ok = [r for r in results if r is not None]
    assert len(ok) == 10 and all(r == 30_000 for r in ok)
    with sessions() as s:
        o = s.get(Organization, org)
        assert o.credits == 0 and o.reserved == 0
        assert s.scalar(select(func.count()).select_from(UsageRecord)) == 10
        roll = s.scalars(select(UsageRollup)).all()
        assert [(r.requests, r.charged, r.input_tokens) for r in roll] == [(10, 300_000, 10_000)]


def test_subscription_quota_and_overage(database_url):
    sessions = open_db(database_url)
    seed_billing(sessions)
    # starter: $20/month with $0.01 included and no overage -> hard quota
    _, key = tenant(sessions, "hard", "starter")
    p = principal(sessions, key)
    small = Units(100, 100)  # $0.003 at list price
    assert [spend(sessions, p, units=small) for _ in range(4)] == [0, 0, 0, None]  # 3 x 0.003 fit in 0.01, the 4th not
    # pro: same included usage, then 2x list price
    org, key = tenant(sessions, "over", "pro")
    p = principal(sessions, key)
    charges = [spend(sessions, p, units=small) for _ in range(5)]
    # 0.003, 0.006, 0.009 included; the 4th crosses 0.010 by 0.002 -> 2 x 0.002; the 5th is all overage -> 2 x 0.003
    assert charges == [0, 0, 0, 4000, 6000]
    with sessions() as s:
        fees = s.scalars(select(UsageRecord).where(UsageRecord.org_id == org, UsageRecord.endpoint == "subscription")).all()
        assert [f.charged for f in fees] == [100 * MICRO]  # the month's fee, billed once
        report = crud.usage_report(s, ["tenant"], org_id=org)
    assert report[0]["revenue"] == pytest.approx(100 + 0.01) and report[0]["requests"] == 6


def test_payg_spend_limit_and_no_plan(database_url):
    sessions = open_db(database_url)
    seed_billing(sessions)
    with sessions.begin() as s:
        crud.create_plan(s, "capped", "payg", spend_limit=0.07)
        crud.create_org(s, "noplan")
    _, key = tenant(sessions, "capped-co", "capped")
    p = principal(sessions, key)
    assert [spend(sessions, p) is not None for _ in range(3)] == [True, True, False]  # $0.03 each under a $0.07 cap
    with sessions.begin() as s:
        org = crud.get_org(s, "noplan")
        with pytest.raises(PaymentRequired, match="no billing plan"):
            crud.reserve(s, org.id, 10)


def test_usage_report_groups_and_margin(database_url):
    sessions = open_db(database_url)
    seed_billing(sessions)
    with sessions.begin() as s:
        crud.set_price(s, "m", "v1", input_per_1k=0.1, output_per_1k=0.2)  # the exact version beats the "*" price
    a, ka = tenant(sessions, "a", "payg")
    b, kb = tenant(sessions, "b", "payg")
    pa, pb = principal(sessions, ka), principal(sessions, kb)
    spend(sessions, pa, "m")
    spend(sessions, pa, "other")
    spend(sessions, pb, "m")
    with sessions() as s:
        rows = crud.usage_report(s, ["tenant", "model"])
        assert [(r["tenant"], r["model"], r["revenue"]) for r in rows] == [(a, "m", 0.3), (a, "other", 0.03), (b, "m", 0.3)]
        # cost: 0.5 compute-seconds x $0.001; margin = revenue - cost
        assert all(r["cost"] == pytest.approx(0.0005) and r["margin"] == pytest.approx(r["revenue"] - 0.0005) for r in rows)
        assert [r["revenue"] for r in crud.usage_report(s, ["model"], org_id=b)] == [0.3]
        today = crud.utcnow().date()
        assert crud.usage_report(s, ["day"], start=today + dt.timedelta(days=1)) == []
        with pytest.raises(Exception, match="unknown group_by"):
            crud.usage_report(s, ["colour"])


def test_rollups_match_records(database_url):
    sessions = open_db(database_url)
    seed_billing(sessions)
    _, key = tenant(sessions, "many", "payg")
    p = principal(sessions, key)
    for i in range(30):
        spend(sessions, p, f"m{i % 3}", Units(i, 2 * i))
    with sessions() as s:
        from_records = dict(s.execute(select(UsageRecord.model, func.sum(UsageRecord.charged)).group_by(UsageRecord.model)).all())
        report = {r["model"]: round(r["revenue"] * MICRO) for r in crud.usage_report(s, ["model"])}
    assert report == from_records


def test_http_concurrency_prepaid_402(server):
    """60 concurrent API requests against credit for exactly 10: 10 succeed, 50 get 402, nothing overspent."""
    org, key = tenant(server.sessions, "rush-" + uuid.uuid4().hex[:6], "prepaid", credits=0.0023)  # 10 x $0.00023
    body = {"model": "echo", "prompt": "a b c", "max_tokens": 10}

    def one(_):
        return httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    with ThreadPoolExecutor(60) as pool:
        responses = list(pool.map(one, range(60)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 10 and codes.count(402) == 50, codes
    assert all(r.json()["error"]["type"] == "insufficient_quota" for r in responses if r.status_code == 402)
    with server.sessions() as s:
        o = s.get(Organization, org)
        assert o.credits == 0 and o.reserved == 0
        assert s.scalar(select(func.count()).select_from(UsageRecord).where(UsageRecord.org_id == org)) == 10


# ---------------------------------------------------------------- group commit

def _held(sessions, p, units, server=None):
    with sessions.begin() as s:
        price = crud.find_price(s, "m", "v1")
        hold_id = crud.new_hold_id() if server else None
        return crud.SettleItem("r-" + uuid.uuid4().hex, p, "m", "v1", "completions", "ok", units, price,
                               crud.reserve(s, p.org_id, crud.list_price(price, units), server, hold_id), 0.5, server, hold_id)


def _ledger(sessions, org):
    with sessions() as s:
        o = s.get(Organization, org)
        rolls = [(r.requests, r.charged, r.input_tokens, r.output_tokens, r.list_price)
                 for r in s.scalars(select(UsageRollup).where(UsageRollup.org_id == org, UsageRollup.model == "m")).all()]
        charged = sorted(s.scalars(select(UsageRecord.charged).where(UsageRecord.org_id == org,
                                                                    UsageRecord.endpoint == "completions")).all())
        return (o.credits, o.reserved, o.period_list, o.period_charged), rolls, charged


@pytest.mark.parametrize("plan", ["pro", "prepaid", "payg"])
def test_a_group_commit_charges_exactly_what_settling_one_by_one_does(database_url, plan):
    """The same requests settled one per transaction for one tenant and in one settle_many for a twin tenant: the same
    charges item by item (a subscription's overage crossing the included amount mid-batch), balances and rollups."""
    sessions = open_db(database_url)
    seed_billing(sessions)
    sizes = [Units(100, 100), Units(50, 20), Units(100, 100), Units(10, 300), Units(100, 100), Units(0, 0)]
    charges = {}
    for how in ("one", "many"):
        org, key = tenant(sessions, f"{plan}-{how}", plan, credits=1.0)
        p = principal(sessions, key)
        items = [_held(sessions, p, u, server="srv-a" if i % 2 else None) for i, u in enumerate(sizes)]
        if how == "one":
            got = []
            for it in items:
                with sessions.begin() as s:
                    got.append(crud.settle(s, it.request_id, p, "m", "v1", "completions", "ok", it.units, it.price, it.held,
                                           it.compute_s, 0.001, it.server, it.hold_id).charged)
        else:
            with sessions.begin() as s:
                got = [d.charged for d in crud.settle_many(s, items, 0.001)]
        charges[how] = (got, _ledger(sessions, org))
    assert charges["one"] == charges["many"]
    got, ((_, reserved, _, _), rolls, _) = charges["many"]
    assert reserved == 0 and rolls[0][0] == len(sizes)
    if plan == "pro":  # 0.003, 0.0014, 0.003, 0.0061 ... crosses the included 0.01 at the 4th: overage from there
        assert got[:3] == [0, 0, 0] and got[3] > 0 and got[5] == 0


def test_a_group_commit_releases_nothing_for_a_hold_already_reaped(database_url):
    """A hold its server no longer tracks (found dead and released meanwhile) is not released a second time."""
    sessions = open_db(database_url)
    seed_billing(sessions)
    org, key = tenant(sessions, "reaped", "payg")
    p = principal(sessions, key)
    kept, lost = _held(sessions, p, Units(100, 100), "srv-b"), _held(sessions, p, Units(100, 100), "srv-b")
    with sessions.begin() as s:
        s.execute(crud.text("DELETE FROM server_holds WHERE id = :i"), {"i": lost.hold_id})  # the reaper's half
        s.execute(crud.text("UPDATE organizations SET reserved = reserved - :a WHERE id = :o"), {"a": lost.held, "o": org})
    with sessions.begin() as s:
        crud.settle_many(s, [kept, lost], 0.001)
    assert _ledger(sessions, org)[0][1] == 0  # nothing held, nothing released twice (reserved never below 0)


def test_the_settle_queue_groups_requests_and_isolates_a_failing_one(database_url):
    """Concurrent settles through Billing's queue on PostgreSQL: fewer transactions than requests, each request its own
    result; a request whose record is refused (its id already recorded) fails alone, the others are charged once."""
    import asyncio

    from aigc.serve.billing import Billing, Hold

    sessions = open_db(database_url)
    seed_billing(sessions)
    org, key = tenant(sessions, "queued", "payg")
    p = principal(sessions, key)
    billing = Billing(sessions, 0.001)
    billing.inline = False  # the queue on SQLite too: the same code, one writer at a time
    items = [_held(sessions, p, Units(100, 100)) for _ in range(40)]
    dup = items[7].request_id
    with sessions.begin() as s:  # request 7's id is already taken: its settle must fail, and only its
        s.execute(crud.text("INSERT INTO usage_records (request_id, created_at, day, org_id, model, version, endpoint, status, "
                            "input_tokens, output_tokens, images, seconds, list_price, charged, compute_s, cost) VALUES "
                            "(:r, :t, :d, :o, 'm', 'v1', 'other', 'ok', 0, 0, 0, 0, 0, 0, 0, 0)"),
                  {"r": dup, "t": str(dt.datetime.now(dt.UTC)), "d": str(dt.date.today()), "o": org})

    async def run(batch):
        async def one(it):
            return await billing.settle(it.request_id, p, "m", "v1", "completions", "ok", it.units, Hold(it.held, it.price),
                                        it.compute_s)
        return await asyncio.gather(*(one(it) for it in batch), return_exceptions=True)

    try:
        first = asyncio.run(run(items[20:]))  # all good: grouped
        assert first == [(3000, 500)] * 20 and billing.queue.alone == 0
        assert billing.queue.settled == 20 and billing.queue.batches < 20
        results = asyncio.run(run(items[:20]))
    finally:
        billing.close()
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [7] and "IntegrityError" in type(results[7]).__name__
    assert all(r == (3000, 500) for i, r in enumerate(results) if i != 7)
    (_, reserved, _, charged_total), rolls, charged = _ledger(sessions, org)
    assert len(charged) == 39 and charged_total == 39 * 3000 and rolls[0][0] == 39
    assert reserved == items[7].held  # the failed request's hold stays until its server's holds are reaped
