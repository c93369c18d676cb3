"""The fleet: several server processes on one PostgreSQL keep their promises when things break.

Real processes on 127.0.0.1: `aigc serve --workers 2`, a PostgreSQL server restarted under load, Redis."""
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from sqlalchemy import func, select

from aigc.db import crud
from aigc.db.models import ApiKey, Organization, Server, UsageRecord
from aigc.serve.ratelimit import MemoryLimiter, RedisLimiter, SqlLimiter
from conftest import wait_for
from tests.serve.conftest import seed_billing
from tests.serve.fleet_helpers import fresh_database, private_postgres, private_redis, start_fleet
from tests.serve.helpers import add_key, db, tenant


def settings_for(url, home):
    from aigc.settings import Settings

    return Settings(database_url=url, home=home)


# ---------------------------------------------------------------- one limit, three stores

@pytest.fixture(params=["memory", "postgres", "redis"])
def limiter_pair(request):
    """Two limiters that must act as one: the same object (memory), two engines on one database, two Redis clients."""
    if request.param == "memory":
        one = MemoryLimiter()
        yield one, one
    elif request.param == "postgres":
        from aigc.db.session import open_db

        with fresh_database() as url:
            engines = [open_db(url).kw["bind"] for _ in range(2)]
            yield SqlLimiter(engines[0]), SqlLimiter(engines[1])
            for e in engines:
                e.dispose()
    else:
        with private_redis() as url:
            yield RedisLimiter(url), RedisLimiter(url)


def test_a_limit_admits_exactly_its_number_from_many_clients(limiter_pair):
    a, b = limiter_pair

    def take(i, key="rpm", rpm=25, tpm=10**6, tokens=0):
        return (a if i % 2 else b).take(key, rpm, tpm, tokens)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(take, range(200)))
        assert sum(d.allowed for d in got) == 25
        refused = next(d for d in got if not d.allowed)
        assert "25 requests per minute" in refused.reason and int(refused.headers["retry-after"]) >= 1
        tok = list(pool.map(lambda i: take(i, "tpm", 10**6, 1000, 90), range(60)))
        assert sum(d.allowed for d in tok) == 11  # 11 x 90 <= 1000 < 12 x 90
    d = take(0, "refund", 100, 1000, 500)
    assert d.allowed and d.headers["x-ratelimit-remaining-tokens"] == "500"
    a.refund("refund", 400, d.slot)  # the request used 100 of the 500 it reserved
    assert take(1, "refund", 100, 1000, 0).headers["x-ratelimit-remaining-tokens"] == "900"
    assert not take(0, "big", 100, 1000, 1001).allowed  # more than a minute's tokens: never


# ---------------------------------------------------------------- two workers on PostgreSQL

@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    home = tmp_path_factory.mktemp("fleet")
    with fresh_database() as url:
        sessions = db(settings_for(url, home))
        seed_billing(sessions)
        f = start_fleet(url, home, ["--echo-model", "echo"], env={"AIGC_ECHO_TOKEN_MS": "20", "AIGC_KEY_CACHE_S": "600"})
        f.sessions = sessions
        try:
            yield f
        finally:
            f.stop()
            sessions.kw["bind"].dispose()


def fresh_post(url, key, body, timeout=30):
    """A request on a new connection (so the kernel hands it to either worker)."""
    with httpx.Client(timeout=timeout) as c:
        return c.post(url, json=body, headers={"Authorization": f"Bearer {key}"})


def served_by(fleet) -> set[int]:
    pids = set()
    for line in fleet.log.read_text().splitlines():
        if line.startswith("{") and '"path": "/v1/completions"' in line:
            pids.add(json.loads(line)["pid"])
    return pids


def test_rate_limits_and_metrics_are_global_across_workers(fleet):
    _, key = tenant(fleet.sessions, "limited", "payg", rpm=12)
    body = {"model": "echo", "prompt": "one two", "max_tokens": 2}
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: fresh_post(fleet.url + "/v1/completions", key, body).status_code, range(48)))
    assert codes.count(200) == 12 and codes.count(429) == 36, codes  # 2 workers, one limit: not 24
    assert len(served_by(fleet)) == 2  # both workers answered
    text_ = "\n".join(httpx.get(fleet.url + "/metrics", timeout=10).text for _ in range(6))  # whichever worker answers
    counts = {float(ln.rsplit(" ", 1)[1]) for ln in text_.splitlines()
              if ln.startswith('aigc_requests_total{route="/v1/completions",status="429"}')}
    assert counts == {36.0}, counts  # the same sum from either worker


def test_a_revoked_key_stops_working_on_every_worker_at_once(fleet):
    org, admin = tenant(fleet.sessions, "revoking", "payg", role="admin")
    dev = add_key(fleet.sessions, org, "dev@revoking.example", "developer")
    body = {"model": "echo", "prompt": "hello", "max_tokens": 1}
    with ThreadPoolExecutor(8) as pool:  # both workers cache the key (for 600 s)
        assert set(pool.map(lambda _: fresh_post(fleet.url + "/v1/completions", dev, body).status_code, range(24))) == {200}
    with fleet.sessions() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.hash == crud.hash_key(dev)))
    r = httpx.delete(f"{fleet.url}/v1/organization/keys/{key_id}", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    time.sleep(0.3)  # the NOTIFY is delivered at the commit; the cache alone would keep the key for 600 s
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda _: fresh_post(fleet.url + "/v1/completions", dev, body), range(24)))
    assert {r.status_code for r in after} == {401} and {r.json()["error"]["code"] for r in after} == {"key_revoked"}
    assert fresh_post(fleet.url + "/v1/completions", admin, body).status_code == 200


def stream_one(url, key, results, i, started):
    body = {"model": "echo", "prompt": "alpha beta gamma", "max_tokens": 100, "stream": True,
            "stream_options": {"include_usage": True}}
    words, usage, done = 0, None, False
    try:
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                sock = r.extensions["network_stream"].get_extra_info("socket")
                results[i] = {"port": sock.getsockname()[1]}
                started.release()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            usage = chunk["usage"]["completion_tokens"]
                        words += sum(len(ch["text"].split()) for ch in chunk.get("choices", []))
    except httpx.HTTPError:
        pass
    results[i].update(words=words, usage=usage, done=done)


def worker_of(port, pids):
    for pid in pids:
        if any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections("tcp")):
            return pid
    return None


def test_kill_9_of_a_worker_mid_stream_charges_once_or_releases(fleet):
    org, key = tenant(fleet.sessions, "streams", "payg")
    n = 12
    results, started = {}, threading.Semaphore(0)
    threads = [threading.Thread(target=stream_one, args=(fleet.url, key, results, i, started)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert started.acquire(timeout=30), "a stream did not start"
    pids = fleet.workers()
    owner = {i: worker_of(results[i]["port"], pids) for i in range(n)}
    victim = max(pids, key=lambda p: sum(o == p for o in owner.values()))
    time.sleep(0.5)  # a quarter of the way through: every stream has sent words, none has finished
    subprocess.run(["kill", "-9", str(victim)], check=True)
    for t in threads:
        t.join(timeout=60)
    cut = [i for i in range(n) if owner[i] == victim]
    whole = [i for i in range(n) if owner[i] != victim]
    assert cut and all(not results[i]["done"] and 0 < results[i]["words"] < 100 for i in cut), (results, owner)
    assert all(results[i]["done"] and results[i]["usage"] == results[i]["words"] == 100 for i in whole), results

    def settled():
        with fleet.sessions() as s:
            return s.get(Organization, org).reserved == 0 and victim not in [x.pid for x in s.scalars(select(Server))]
    wait_for(settled, "the dead worker's holds to be released", timeout=30)
    with fleet.sessions() as s:
        recs = s.scalars(select(UsageRecord).where(UsageRecord.org_id == org)).all()
        assert len(recs) == len({r.request_id for r in recs}) == len(whole)  # charged once each, the cut ones not at all
        assert all(r.output_tokens == 100 and r.status == "ok" for r in recs)
        charged = s.get(Organization, org).period_charged
        assert charged == sum(r.charged for r in recs)
    wait_for(lambda: len(fleet.workers()) == 2, "a new worker to replace the dead one", timeout=60)
    assert fresh_post(fleet.url + "/v1/completions", key, {"model": "echo", "prompt": "x", "max_tokens": 1}).status_code == 200
    verify = subprocess.run([sys.executable, "-m", "aigc.cli", "audit", "verify", "--db", fleet.database_url],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# ---------------------------------------------------------------- PostgreSQL restarted under load

def test_postgres_restarted_under_load_gets_503s_then_recovers_and_loses_nothing(tmp_path):
    with private_postgres() as pg:
        sessions = db(settings_for(pg.url, tmp_path / "home"))
        seed_billing(sessions)
        org, key = tenant(sessions, "load", "payg", rpm=10**6, tpm=10**9)
        fleet = start_fleet(pg.url, tmp_path / "home", ["--echo-model", "echo"], env={"AIGC_KEY_CACHE_S": "600"})
        sessions.kw["bind"].dispose()
        stop, log = threading.Event(), []

        def load():
            with httpx.Client(timeout=20) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        r = c.post(fleet.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                   json={"model": "echo", "prompt": "steady load", "max_tokens": 3})
                        log.append((t0, r.status_code, r.headers.get("retry-after"), time.monotonic() - t0))
                    except httpx.HTTPError as exc:
                        log.append((t0, type(exc).__name__, None, time.monotonic() - t0))
                    time.sleep(0.01)
        threads = [threading.Thread(target=load) for _ in range(4)]
        try:
            for t in threads:
                t.start()
            time.sleep(2)
            pg.stop("fast")
            down = time.monotonic()
            time.sleep(2)
            pg.start()
            up = time.monotonic()
            time.sleep(6)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            fleet.stop()
        statuses = {s for _, s, _, _ in log}
        assert statuses <= {200, 503}, statuses  # never a 500, never a dropped connection
        assert all(ra == "2" for _, s, ra, _ in log if s == 503)
        assert any(s == 503 for t0, s, _, _ in log if down <= t0 <= up), "no request saw the database down"
        assert max(d for *_, d in log) < 20  # nothing hung
        late = [s for t0, s, _, _ in log if t0 > up + 3]
        assert late and set(late) == {200}, late  # recovered by itself
        sessions = db(settings_for(pg.url, tmp_path / "home"))
        with sessions() as s:
            recorded = s.scalar(select(func.count()).select_from(UsageRecord).where(UsageRecord.org_id == org))
            reserved = s.get(Organization, org).reserved
        sessions.kw["bind"].dispose()
        assert recorded == sum(1 for _, s, _, _ in log if s == 200)  # every answered request is recorded, once
        assert reserved == 0
