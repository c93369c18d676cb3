"""Fleet benchmark: `aigc serve --workers N` on one PostgreSQL; prints ONE JSON object as its last line.

(1) Scaling (--parts scaling): the echo model behind 1 worker, then 2 workers, on PostgreSQL. An open-loop load
    generator steps through --rates (each for --step-seconds) against the gateway and against a bare uvicorn app with
    the same number of processes that answers the same JSON; a rate counts as sustained when every answer is a 200,
    the achieved rate is within 3% of the asked one and the added p99 (gateway - bare at that rate) is <= 10 ms.
    `max_rps` is the highest sustained rate; `scaling` = workers_2 / workers_1; `max_served_rps` the highest rate
    answered in full (all 200, p99 under a second) whatever its latency. The load generator shares the machine.
(2) A global rate limit (--parts ratelimit): a key whose plan allows 60 requests a minute, 2 workers, requests sent at
    5/s for 60 s: how many were admitted (target <= 60: the limit is one across the workers, not one per worker).
(3) Soak (--parts soak): 2 workers for --soak-minutes at --soak-rate requests/s, streaming chat completions and image
    generations mixed (1 in 4 an image, each fetched through its signed URL); resident memory of each
    worker after the first minute and at the end (target growth <= 10%) and the errors seen (target 0).
(4) Gateway overhead (--parts overhead): benchmarks/serve_load.py's measurement (one process, SQLite, governance on,
    the generation log and audit committed before each response), target added p50 <= 2 ms and p99 <= 10 ms at 200/s.

PostgreSQL: --database-url (a server the benchmark may create databases on), else a private server is started from
Debian's binaries (/usr/lib/postgresql/*/bin) and removed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import BARE, free_port, open_loop, wait_ready

ECHO_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "AIGC_THREADS": "1"}


@contextmanager
def postgres(url: str | None):
    """A server URL ``postgresql+psycopg://.../postgres`` to create databases on."""
    if url:
        yield url
        return
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        raise SystemExit("no PostgreSQL: pass --database-url or install Debian's postgresql")
    data = Path(tempfile.mkdtemp(prefix="aigc-bench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, bin_ = free_port(), bins[-1].parent
    subprocess.run([*as_user, str(bin_ / "initdb"), "-D", str(data / "data"), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    ctl = [*as_user, str(bin_ / "pg_ctl"), "-D", str(data / "data"), "-w", "-l", str(data / "server.log")]
    subprocess.run([*ctl, "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True, check=False)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def database(server_url: str):
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    name = "aigc_bench_" + uuid.uuid4().hex[:8]
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def aigc(*args, env) -> str:
    return subprocess.run([sys.executable, "-m", "aigc.cli", *args], env=env, check=True, capture_output=True,
                          text=True).stdout


def tenant(db: str, env: dict, name: str, rpm: int) -> str:
    """An organisation on a pay-as-you-go plan of ``rpm`` requests a minute, and an API key of it."""
    aigc("admin", "plan", "create", name, "--kind", "payg", "--rpm", str(rpm), "--tpm", "1000000000", "--db", db, env=env)
    aigc("admin", "org", "create", name, "--plan", name, "--db", db, env=env)
    aigc("admin", "user", "create", name, f"bench@{name}.example", "--db", db, env=env)
    return json.loads(aigc("admin", "key", "create", name, f"bench@{name}.example", "--json", "--db", db, env=env))["api_key"]


class Server:
    def __init__(self, args: list[str], workers: int, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.proc = subprocess.Popen([sys.executable, "-m", "aigc.cli", "serve", *args, "--port", str(self.port),
                                      "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=log.open("w"), text=True)
        wait_ready(self.url, self.proc, timeout=240)
        t0 = time.time()
        while len(self.pids()) < workers:
            if time.time() - t0 > 120:
                raise SystemExit(f"{workers} workers did not start (see {log})")
            time.sleep(0.5)

    def pids(self) -> list[int]:
        if self.workers == 1:
            return [self.proc.pid]
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False).stdout.split()
        pids = []
        for p in out:
            try:
                if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace"):
                    pids.append(int(p))
            except OSError:
                pass
        return sorted(pids)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


class Bare:
    """The bare app with ``workers`` processes (the same process model as the gateway)."""

    def __init__(self, work: Path, workers: int):
        (work / "bare.py").write_text(BARE)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare:app", "--port", str(self.port), "--log-level",
                                      "warning", "--workers", str(workers)], cwd=work, stderr=subprocess.PIPE, text=True)
        wait_ready(self.url, self.proc)
        time.sleep(1 if workers == 1 else 3)  # every worker up

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def scaling(work: Path, db: str, env: dict, key: str, workers: int, rates: list[float], seconds: float) -> dict:
    bare = Bare(work, workers)
    srv = Server(["--echo-model", "echo"], workers, {**env, "AIGC_DATABASE_URL": db}, work / f"scaling-{workers}.log")
    steps, best, most = [], 0.0, 0.0
    try:
        asyncio.run(open_loop(srv.url, key, 50, 4))  # warm up every worker (models and classifiers load on first use)
        for rate in rates:
            b = asyncio.run(open_loop(bare.url, key, rate, seconds, timeout=20, max_connections=256))
            g = asyncio.run(open_loop(srv.url, key, rate, seconds, timeout=20, max_connections=256))
            added = round(g["p99_ms"] - b["p99_ms"], 3)
            served = set(g["codes"]) == {200} and g["achieved_rps"] >= 0.97 * rate and g["p99_ms"] < 1000
            ok = served and added <= 10
            steps.append({"rate": rate, "bare_p99_ms": b["p99_ms"], "gateway_p50_ms": g["p50_ms"],
                          "gateway_p99_ms": g["p99_ms"], "added_p99_ms": added, "achieved_rps": g["achieved_rps"],
                          "codes": {str(k): v for k, v in g["codes"].items()}, "sustained": ok})
            print(json.dumps({"workers": workers, **steps[-1]}), flush=True)
            if ok:
                best = rate
            if not served:  # overloaded: past this rate answers only queue up
                break
            most = rate
    finally:
        srv.stop()
        bare.stop()
    return {"max_rps": best, "max_served_rps": most, "steps": steps}


async def _rate_limited(url: str, key: str, rate: float, seconds: float) -> dict:
    codes: dict[int, int] = {}
    # a new connection per request, so that the kernel spreads them over the workers (kept-alive ones stay with one)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                 limits=httpx.Limits(max_keepalive_connections=0)) as client:
        async def one():
            r = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b c", "max_tokens": 2})
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

        start, tasks = time.perf_counter(), []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return codes


def rate_limit(work: Path, db: str, env: dict, key: str) -> dict:
    srv = Server(["--echo-model", "echo"], 2, {**env, "AIGC_DATABASE_URL": db}, work / "ratelimit.log")
    try:
        codes = asyncio.run(_rate_limited(srv.url, key, 5.0, 60.0))
        served = _pids_served(work / "ratelimit.log")
    finally:
        srv.stop()
    return {"limit": 60, "sent": sum(codes.values()), "admitted": codes.get(200, 0), "refused_429": codes.get(429, 0),
            "other": {str(k): v for k, v in codes.items() if k not in (200, 429)}, "workers_answering": served,
            "target_met": codes.get(200, 0) <= 60}


def _pids_served(log: Path) -> int:
    pids = set()
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "request" and rec.get("path") == "/v1/completions":
            pids.add(rec.get("pid"))
    return len(pids)


async def _soak(url: str, key: str, rate: float, seconds: float, on_minute) -> dict:
    stats = {"chat": 0, "images": 0, "image_urls": 0, "errors": 0, "error_samples": []}
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)

    def error(what: str) -> None:
        stats["errors"] += 1
        if len(stats["error_samples"]) < 10:
            stats["error_samples"].append(what[:300])

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits) as c:
        async def chat(i: int):
            body = {"model": "echo", "stream": True, "max_tokens": 24,
                    "messages": [{"role": "user", "content": f"soak request {i}: " + "word " * rng.randint(4, 40)}]}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    error(f"chat {r.status_code}: {(await r.aread()).decode(errors='replace')}")
                    return
                done = False
                async for line in r.aiter_lines():
                    done = done or line.strip() == "data: [DONE]"
                if not done:
                    error("chat stream ended without [DONE]")
                    return
            stats["chat"] += 1

        async def image(i: int):
            fmt = "url"  # the image is then fetched through its signed URL (the media path under load)
            r = await c.post("/v1/images/generations", json={"model": "shapes", "prompt": "a large red circle in the center",
                                                             "n": 1, "response_format": fmt})
            if r.status_code != 200:
                error(f"image {r.status_code}: {r.text}")
                return
            stats["images"] += 1
            if fmt == "url":
                got = await c.get(r.json()["data"][0]["url"])
                if got.status_code != 200 or not got.content.startswith(b"\x89PNG"):
                    error(f"image url {got.status_code}")
                    return
                stats["image_urls"] += 1

        async def guarded(coro):
            try:
                await coro
            except Exception as exc:  # noqa: BLE001 -- a connection reset or timeout: an error of the soak
                error(f"{type(exc).__name__}: {exc}")

        start, pending, minute = time.perf_counter(), set(), 0
        i = 0
        while time.perf_counter() - start < seconds:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(guarded(image(i) if i % 4 == 3 else chat(i)))
            pending.add(t)
            t.add_done_callback(pending.discard)
            i += 1
            if int((time.perf_counter() - start) // 60) > minute:
                minute += 1
                on_minute(minute)
        await asyncio.gather(*pending)
    stats["requests"] = i
    return stats


def soak(work: Path, db: str, env: dict, key: str, image_run: Path, minutes: float, rate: float) -> dict:
    srv = Server([f"shapes={image_run}", "--echo-model", "echo"], 2, {**env, "AIGC_DATABASE_URL": db}, work / "soak.log")
    pids = srv.pids()
    series: dict[int, list[float]] = {p: [rss_mb(p)] for p in pids}
    start_rss: dict[int, float] = {}

    def on_minute(m: int) -> None:
        for p in pids:
            try:
                series[p].append(rss_mb(p))
            except (OSError, RuntimeError):
                series[p].append(-1.0)  # the worker is gone (counted below)
        if m == 1:
            start_rss.update({p: series[p][-1] for p in pids})
        print(json.dumps({"soak_minute": m, "rss_mb": [series[p][-1] for p in pids]}), flush=True)

    try:
        stats = asyncio.run(_soak(srv.url, key, rate, minutes * 60, on_minute))
        end = {p: rss_mb(p) if Path(f"/proc/{p}").exists() else -1.0 for p in pids}
        replaced = sorted(set(srv.pids()) - set(pids))
    finally:
        srv.stop()
    if not start_rss:  # a soak shorter than a minute: the first reading
        start_rss = {p: series[p][0] for p in pids}
    errors = stats["errors"] + len(replaced)
    growth = max((end[p] - start_rss[p]) / start_rss[p] * 100 for p in pids)
    return {"minutes": minutes, "rate": rate, "workers": len(pids), "rss_start_mb": [start_rss[p] for p in pids],
            "rss_end_mb": [end[p] for p in pids], "growth_pct": round(growth, 2), "errors": errors,
            "requests": stats["requests"], "chat_streams": stats["chat"], "images": stats["images"],
            "image_urls_fetched": stats["image_urls"], "workers_replaced": len(replaced),
            "error_samples": stats["error_samples"], "rss_series_mb": [series[p] for p in pids],
            "target_met": growth <= 10 and errors == 0}


def image_run(work: Path) -> Path:
    import aigc
    from aigc.config import load_config
    from aigc.data.images import ImagePrepareOptions, prepare
    from aigc.train.image import ImageTrainConfig, prepare_run, train

    prepare([], work / "shapes", ImagePrepareOptions(size=8, count=120), builtin=["shapes"])
    tiny = Path(aigc.__file__).parent / "configs/image/tiny.yaml"
    cfg = load_config(ImageTrainConfig, tiny, {"data": {"path": str(work / "shapes")}, "model": {"kind": "vae"}})
    run = work / "shapes-vae"
    prepare_run(cfg, run)
    train(cfg, run)
    return run


def overhead(seconds: float) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "serve_load.py"), "--parts", "overhead", "--seconds",
                          str(seconds)], check=True, capture_output=True, text=True).stdout
    o = json.loads(out.strip().splitlines()[-1])["overhead"]
    return {"added_p50_ms": o["added_p50_ms"], "added_p99_ms": o["added_p99_ms"], "rate": o["rate"],
            "achieved_rps": o["gateway"]["achieved_rps"], "codes": o["gateway"]["codes"], "target_met": o["target_met"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="overhead,scaling,ratelimit,soak")
    ap.add_argument("--database-url", help="a PostgreSQL server to create the benchmark's databases on")
    ap.add_argument("--rates", default="25,50,75,100,150,200,300,400,600")
    ap.add_argument("--step-seconds", type=float, default=8.0)
    ap.add_argument("--soak-minutes", type=float, default=20.0)
    ap.add_argument("--soak-rate", type=float, default=8.0, help="soak requests/s (1 in 4 an image)")
    ap.add_argument("--overhead-seconds", type=float, default=15.0)
    args = ap.parse_args()
    parts = args.parts.split(",")
    work = Path(tempfile.mkdtemp(prefix="aigc-fleet-bench-"))
    env = {**os.environ, **ECHO_ENV, "AIGC_HOME": str(work / "home")}
    result: dict = {"benchmark": "serve_fleet", "cpus": os.cpu_count()}
    if "overhead" in parts:
        result["overhead"] = overhead(args.overhead_seconds)
        print(json.dumps({"overhead": result["overhead"]}), flush=True)
    with postgres(args.database_url) as server, database(server) as db:
        aigc("admin", "price", "set", "*", "--input-per-1k", "0.001", "--output-per-1k", "0.002", "--per-image", "0.01",
             "--db", db, env=env)
        key = tenant(db, env, "bench", 10_000_000)
        limited = tenant(db, env, "sixty", 60)
        if "scaling" in parts:
            rates = [float(r) for r in args.rates.split(",")]
            for n in (1, 2):
                result[f"workers_{n}"] = scaling(work, db, env, key, n, rates, args.step_seconds)
            w1, w2 = result["workers_1"]["max_rps"], result["workers_2"]["max_rps"]
            result["scaling"] = round(w2 / w1, 2) if w1 else None
            s1, s2 = result["workers_1"]["max_served_rps"], result["workers_2"]["max_served_rps"]
            result["scaling_served"] = round(s2 / s1, 2) if s1 else None
        if "ratelimit" in parts:
            result["rate_limit_global"] = rate_limit(work, db, env, limited)
            print(json.dumps({"rate_limit_global": result["rate_limit_global"]}), flush=True)
        if "soak" in parts:
            result["soak"] = soak(work, db, env, key, image_run(work), args.soak_minutes, args.soak_rate)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
