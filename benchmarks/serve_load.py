"""Serving benchmark; prints ONE JSON object as its last line.

(1) Gateway overhead. `aigc serve` (one process) with a stub text model that answers instantly,
    every request authenticated, rate limited, held, settled and metered into SQLite, against a bare
    uvicorn app (same process model) that returns the same JSON without any of that. An open-loop
    load generator sends --rate requests/s for --seconds to each; added latency = gateway - bare
    at p50 and p99. Target (one process, 2 cores): p50 <= 2 ms and p99 <= 10 ms added at 200 req/s.
(3) Usage reports at scale (--parts usage): --records usage records (50 tenants, 200 keys, 5 models,
    90 days) with their daily rollups; time of the tenant x model x day report from the rollups
    (what `aigc usage report` and /v1/usage read) versus the same totals from the raw records, and the
    cost of one more metered request (hold + settle) on the full tables.
(2) Text generation through the API: aggregate completion tokens/s with 1, 8 and 32 concurrent
    streaming clients on a char-small model (trained for a few seconds: speed does not depend on
    quality). Target: 32 streams >= 8x one stream.
(4) Sampling parity (--parts parity): 8 concurrent clients on the same model, chat completions of
    --max-tokens tokens: plain sampling, with frequency/presence penalties and logprobs (top 5), and
    constrained to a JSON schema (a product record); tokens/s of each in the same run, and the share of
    --json-answers schema-constrained answers that parse and validate. The modes take turns for --rounds
    rounds; each reports its median round. Targets: json_valid_rate 1.0, the penalised and the
    constrained paths within 25% of plain.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BARE = '''
import json
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
BODY = json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "echo",
                   "choices": [{"text": "a b c d", "index": 0, "logprobs": None, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}}).encode()
async def completions(request):
    await request.body()
    return Response(BODY, media_type="application/json")
app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/healthz", lambda r: Response("ok"))])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not start")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def open_loop(url: str, key: str, rate: float, seconds: float, timeout: float = 30.0,
                    max_connections: int = 64) -> dict:
    """Send requests at a fixed rate (not waiting for answers), measure each one's latency. A request that fails or
    times out is counted under its exception's name (an overloaded server is a result, not a crash)."""
    body = {"model": "echo", "prompt": "a b c d", "max_tokens": 4}
    headers = {"Authorization": f"Bearer {key}"}
    lat, codes = [], {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        for _ in range(20):  # warm up connections and caches
            await client.post("/v1/completions", json=body)

        async def one():
            t = time.perf_counter()
            try:
                code = (await client.post("/v1/completions", json=body)).status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            lat.append(time.perf_counter() - t)
            codes[code] = codes.get(code, 0) + 1

        tasks, start = [], time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"requests": n, "achieved_rps": round(n / wall, 1), "p50_ms": round(pct(lat, 0.5) * 1000, 3),
            "p99_ms": round(pct(lat, 0.99) * 1000, 3), "codes": codes}


async def streams(url: str, key: str, concurrency: int, per_stream: int, max_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    tokens = [0]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker(w):
            for j in range(per_stream):
                body = {"model": "text", "prompt": "The ", "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
                        "seed": w * 1000 + j, "stream_options": {"include_usage": True}}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"usage"' in line:
                            tokens[0] += json.loads(line[6:])["usage"]["completion_tokens"]

        await worker(-1)  # warm-up (model load)
        tokens[0] = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"streams": concurrency, "tokens": tokens[0], "seconds": round(wall, 2), "tokens_per_s": round(tokens[0] / wall, 1)}


# Small enough for the benchmark's character model (one token per character, a 128-token context) to close it
PRODUCT_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"name": {"type": "string", "maxLength": 12}, "category": {"enum": ["lamp", "mug", "chair", "rug"]},
                   "rating": {"enum": [1, 2, 3, 4, 5]}, "in_stock": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 1}},
    "required": ["name", "category", "rating", "in_stock", "tags"]}


def _valid_product(text: str) -> bool:
    """Parses, and is an instance of PRODUCT_SCHEMA (checked here by hand, not by the server's grammar)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(obj, dict) and sorted(obj) == sorted(PRODUCT_SCHEMA["required"]) and isinstance(obj["name"], str)
            and len(obj["name"]) <= 12 and obj["category"] in ("lamp", "mug", "chair", "rug") and obj["rating"] in (1, 2, 3, 4, 5)
            and not isinstance(obj["rating"], bool) and isinstance(obj["in_stock"], bool) and isinstance(obj["tags"], list)
            and len(obj["tags"]) <= 1 and all(isinstance(t, str) and len(t) <= 8 for t in obj["tags"]))


async def parity(url: str, key: str, mode: str, requests: int, max_tokens: int, concurrency: int = 8) -> dict:
    """Tokens/s of ``requests`` chat completions over ``concurrency`` clients in one sampling mode."""
    headers = {"Authorization": f"Bearer {key}"}
    extra = {"plain": {"ignore_eos": True},
             "penalties_logprobs": {"ignore_eos": True, "frequency_penalty": 0.5, "presence_penalty": 0.5, "logprobs": True,
                                    "top_logprobs": 5},
             "json_schema": {"response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "product", "strict": True, "schema": PRODUCT_SCHEMA}}}}[mode]
    tokens, valid, done = [0], [0], [0]
    queue = list(range(requests))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def one(i):
            body = {"model": "text", "messages": [{"role": "user", "content": "Describe a product."}], "temperature": 1.0,
                    "seed": i, **({"max_tokens": max_tokens} if mode != "json_schema" else {}), **extra}  # JSON: up to the context
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{mode}: {r.status_code} {r.text[:300]}")
            out = r.json()
            tokens[0] += out["usage"]["completion_tokens"]
            done[0] += 1
            valid[0] += mode == "json_schema" and _valid_product(out["choices"][0]["message"]["content"])

        async def worker():
            while queue:
                await one(queue.pop())

        await one(requests + 1)  # warm-up (model load, the mask's vocabulary)
        tokens[0] = valid[0] = done[0] = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    out = {"requests": done[0], "tokens": tokens[0], "seconds": round(wall, 2), "tokens_per_s": round(tokens[0] / wall, 1)}
    if mode == "json_schema":
        out["valid"] = valid[0]
    return out


def usage_at_scale(url: str, n: int) -> dict:
    """Fill the tables with n records (+ rollups) and time the reports and one more metered request."""
    import datetime as dt
    import random

    from sqlalchemy import text

    from aigc.db import crud
    from aigc.db.session import open_db

    sessions = open_db(url)
    engine = sessions.kw["bind"]
    rng = random.Random(0)
    today = dt.date.today()
    with sessions.begin() as s:
        org = crud.get_org(s, "bench")
        principal = crud.lookup_key(s, _KEY[0])
        user = crud.get_user(s, org.id, "load@bench.example")
        key_ids = [crud.create_key(s, user, name=f"k{i}")[0].id for i in range(200)]
    t0 = time.perf_counter()
    cols = "request_id, created_at, day, org_id, key_id, model, version, endpoint, status, input_tokens, output_tokens, " \
           "images, seconds, list_price, charged, compute_s, cost"
    insert = text(f"INSERT INTO usage_records ({cols}) VALUES ({', '.join(':' + c.strip() for c in cols.split(','))})")
    with engine.begin() as conn:
        for start in range(0, n, 50_000):
            rows = []
            for i in range(start, min(n, start + 50_000)):
                day = today - dt.timedelta(days=rng.randrange(90))
                rows.append(dict(request_id=f"bulk-{i}", created_at=f"{day} 12:00:00", day=str(day), org_id=org.id,
                                 key_id=rng.choice(key_ids), model=f"model-{rng.randrange(5)}", version="v1",
                                 endpoint="completions", status="ok", input_tokens=rng.randrange(1, 500),
                                 output_tokens=rng.randrange(1, 500), images=0, seconds=0.0, list_price=100, charged=100,
                                 compute_s=0.01, cost=1))
            conn.execute(insert, rows)
        sums = ", ".join(f"SUM({c})" for c in crud.ROLLUP_SUMS[1:])
        conn.execute(text(f"INSERT INTO usage_rollups (day, org_id, key_id, model, {', '.join(crud.ROLLUP_SUMS)}) "
                          f"SELECT day, org_id, COALESCE(key_id, 0), model, COUNT(*), {sums} FROM usage_records "
                          "GROUP BY day, org_id, COALESCE(key_id, 0), model "
                          "ON CONFLICT (day, org_id, key_id, model) DO NOTHING"))
    fill_s = time.perf_counter() - t0

    def timed(fn, repeat=5):
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return best, out

    with sessions() as s:
        rollup_s, rows = timed(lambda: crud.usage_report(s, ["tenant", "model", "day"]))
        raw_s, raw = timed(lambda: s.execute(text(
            "SELECT org_id, model, day, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(charged), SUM(cost) "
            "FROM usage_records GROUP BY org_id, model, day")).all(), repeat=2)
        n_rollups = s.execute(text("SELECT COUNT(*) FROM usage_rollups")).scalar()
    assert sum(r["requests"] for r in rows) == sum(r[3] for r in raw) >= n
    billing = __import__("aigc.serve.billing", fromlist=["Billing"]).Billing(sessions, 0.00002)
    units = crud.Units(10, 10)
    t = time.perf_counter()
    for i in range(200):
        hold = billing._reserve(principal, "model-0", "v1", units)
        billing.settle_blocking(f"extra-{i}", principal, "model-0", "v1", "completions", "ok", units, hold, 0.0)
    metered_ms = (time.perf_counter() - t) / 200 * 1000
    return {"records": n, "rollup_rows": n_rollups, "fill_s": round(fill_s, 1), "report_groups": len(rows),
            "report_from_rollups_ms": round(rollup_s * 1000, 1), "same_totals_from_records_ms": round(raw_s * 1000, 1),
            "speedup": round(raw_s / rollup_s, 1), "hold_plus_settle_ms": round(metered_ms, 3)}


_KEY: list[str] = []


def aigc(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "aigc.cli", *args], env=env, check=True, capture_output=True, text=True, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s for the overhead test")
    ap.add_argument("--seconds", type=float, default=15.0, help="duration of each overhead run")
    ap.add_argument("--run", type=Path, help="text run directory to serve (default: train char-small briefly)")
    ap.add_argument("--train-seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--parts", default="overhead,streams,usage")
    ap.add_argument("--records", type=int, default=1_000_000, help="usage records for the report test")
    ap.add_argument("--requests", type=int, default=48, help="parity: requests per sampling mode and round")
    ap.add_argument("--rounds", type=int, default=3, help="parity: rounds of the three modes in turn (the median counts)")
    ap.add_argument("--json-answers", type=int, default=200, help="parity: schema-constrained answers checked for validity")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aigc-serve-bench-"))
    env = {**os.environ, "AIGC_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    db = f"sqlite:///{work / 'home' / 'aigc.db'}"
    aigc("admin", "plan", "create", "bench", "--kind", "payg", "--rpm", "1000000", "--tpm", "1000000000", "--db", db, env=env)
    aigc("admin", "price", "set", "*", "--input-per-1k", "0.001", "--output-per-1k", "0.002", "--db", db, env=env)
    aigc("admin", "org", "create", "bench", "--plan", "bench", "--db", db, env=env)
    aigc("admin", "user", "create", "bench", "load@bench.example", "--db", db, env=env)
    key = json.loads(aigc("admin", "key", "create", "bench", "load@bench.example", "--json", "--db", db, env=env).stdout)["api_key"]
    _KEY.append(key)
    result: dict = {"benchmark": "serve_load", "cpus": os.cpu_count()}
    parts = args.parts.split(",")
    procs = []
    try:
        if "overhead" in parts:
            port_g, port_b = free_port(), free_port()
            (work / "bare.py").write_text(BARE)
            bare = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare:app", "--port", str(port_b), "--log-level", "warning"],
                                    cwd=work, stderr=subprocess.PIPE, text=True)
            gw = subprocess.Popen([sys.executable, "-m", "aigc.cli", "serve", "--echo-model", "echo", "--port", str(port_g), "--db", db],
                                  env=env, stderr=subprocess.DEVNULL, text=True)
            procs += [bare, gw]
            wait_ready(f"http://127.0.0.1:{port_b}", bare)
            wait_ready(f"http://127.0.0.1:{port_g}", gw)
            base = asyncio.run(open_loop(f"http://127.0.0.1:{port_b}", key, args.rate, args.seconds))
            full = asyncio.run(open_loop(f"http://127.0.0.1:{port_g}", key, args.rate, args.seconds))
            for p in (bare, gw):
                p.terminate()
                p.wait(30)
            result["overhead"] = {
                "rate": args.rate, "seconds": args.seconds, "bare": base, "gateway": full,
                "added_p50_ms": round(full["p50_ms"] - base["p50_ms"], 3), "added_p99_ms": round(full["p99_ms"] - base["p99_ms"], 3),
                "target": {"added_p50_ms": 2.0, "added_p99_ms": 10.0, "rps": 200},
            }
            o = result["overhead"]
            o["target_met"] = o["added_p50_ms"] <= 2 and o["added_p99_ms"] <= 10 and full["achieved_rps"] >= 0.97 * args.rate \
                and set(full["codes"]) == {200}
            print(json.dumps({"overhead": o}), flush=True)
        if "streams" in parts or "parity" in parts:
            run = args.run
            if run is None:
                aigc("data", "prepare", "--builtin", "pydoc", "--out", str(work / "corpus"), env=env)
                run = work / "text"
                aigc("train", "text", "char-small", "--data", str(work / "corpus"), "--run", str(run),
                     f"--train.max_seconds={args.train_seconds}", env=env)
            port = free_port()
            srv = subprocess.Popen([sys.executable, "-m", "aigc.cli", "serve", f"text={run}", "--port", str(port), "--db", db,
                                    "--max-batch", "32"], env=env, stderr=subprocess.DEVNULL, text=True)
            procs.append(srv)
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, srv)
            if "streams" in parts:
                rows = {}
                for c, per in ((1, 6), (8, 3), (32, 2)):
                    rows[c] = asyncio.run(streams(url, key, c, per, args.max_tokens))
                    print(json.dumps({"streams": rows[c]}), flush=True)
                result["streams"] = {str(c): r for c, r in rows.items()}
                result["streams"]["ratio_32_vs_1"] = round(rows[32]["tokens_per_s"] / rows[1]["tokens_per_s"], 2)
                result["streams"]["ratio_8_vs_1"] = round(rows[8]["tokens_per_s"] / rows[1]["tokens_per_s"], 2)
                result["streams"]["target_ratio"] = 8.0
            if "parity" in parts:
                # the modes take turns, round after round, and each keeps its median round: a busy machine's drift
                # falls on every mode alike
                modes = ("plain", "penalties_logprobs", "json_schema")
                rounds = {mode: [] for mode in modes}
                for _ in range(args.rounds):
                    for mode in modes:
                        rounds[mode].append(asyncio.run(parity(url, key, mode, args.requests, args.max_tokens)))
                got = {mode: {**sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2],
                              "rounds_tokens_per_s": [r["tokens_per_s"] for r in rs]} for mode, rs in rounds.items()}
                valid = asyncio.run(parity(url, key, "json_schema", args.json_answers, args.max_tokens))
                plain = got["plain"]["tokens_per_s"]
                result["parity"] = {
                    "plain_tokens_per_s": plain, "penalties_logprobs_tokens_per_s": got["penalties_logprobs"]["tokens_per_s"],
                    "json_schema_tokens_per_s": got["json_schema"]["tokens_per_s"],
                    "json_valid_rate": round(valid["valid"] / max(1, valid["requests"]), 4), "json_answers": valid["requests"],
                    "penalties_logprobs_vs_plain": round(got["penalties_logprobs"]["tokens_per_s"] / plain, 3),
                    "json_schema_vs_plain": round(got["json_schema"]["tokens_per_s"] / plain, 3), "runs": got,
                    "target": {"json_valid_rate": 1.0, "within": 0.25}}
                print(json.dumps({"parity": result["parity"]}), flush=True)
            srv.terminate()
            srv.wait(30)
        if "usage" in parts:  # last: it fills the database the servers above used
            result["usage"] = usage_at_scale(db, args.records)
            print(json.dumps({"usage": result["usage"]}), flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
