"""Gateway A/B benchmark; prints ONE JSON object as its last line.

The serving path of two checkouts side by side (``--baseline``, e.g. a worktree of the commit before a
change, and this one): both serve the echo model with full governance and metering into their own
SQLite database, and one client sends sequential completions to each in alternating blocks, so the
machine's noise falls on both alike. Reports each side's median and p90 latency and the difference.
An open-loop rate test (serve_load.py) on a shared machine swings by milliseconds from run to run;
this comparison resolves a tenth of one. With ``--run``, both also serve that text run, and one
streaming client alternates between them too (median completion tokens per second of one stream).

    git worktree add ../base HEAD~1 && python benchmarks/gateway_ab.py --baseline ../base
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PY = sys.executable
HERE = Path(__file__).resolve().parents[1]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def setup(src):
    work = Path(tempfile.mkdtemp(prefix="ab-"))
    env = {**os.environ, "PYTHONPATH": f"{src}/src", "AIGC_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    db = f"sqlite:///{work / 'home' / 'aigc.db'}"
    def aigc(*a):
        return subprocess.run([PY, "-m", "aigc.cli", *a, "--db", db], env=env, check=True, capture_output=True, text=True).stdout
    aigc("admin", "plan", "create", "bench", "--kind", "payg", "--rpm", "1000000", "--tpm", "1000000000")
    aigc("admin", "price", "set", "*", "--input-per-1k", "0.001", "--output-per-1k", "0.002")
    aigc("admin", "org", "create", "bench", "--plan", "bench")
    aigc("admin", "user", "create", "bench", "load@bench.example")
    key = json.loads(aigc("admin", "key", "create", "bench", "load@bench.example", "--json"))["api_key"]
    port = free_port()
    served = [f"text={args.run}"] if args.run else []
    proc = subprocess.Popen([PY, "-m", "aigc.cli", "serve", *served, "--echo-model", "echo", "--port", str(port), "--db", db], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, url, key

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--baseline", required=True, help="root of the other checkout (its src/ is imported)")
ap.add_argument("--blocks", type=int, default=12, help="alternating blocks of --block requests per side")
ap.add_argument("--block", type=int, default=200)
ap.add_argument("--run", type=Path, help="a text run to serve as well: also compare one stream's tokens/s on it")
ap.add_argument("--stream-tokens", type=int, default=100)
args = ap.parse_args()
servers = {name: setup(src) for name, src in (("before", args.baseline), ("after", str(HERE)))}
lat = {n: [] for n in servers}
body = {"model": "echo", "prompt": "a b c d", "max_tokens": 4}
clients = {n: httpx.Client(base_url=u, headers={"Authorization": f"Bearer {k}"}) for n, (_, u, k) in servers.items()}
for n, c in clients.items():
    for _ in range(100):
        c.post("/v1/completions", json=body)  # warm-up
for block in range(args.blocks):
    for n, c in (clients.items() if block % 2 == 0 else reversed(list(clients.items()))):
        for _ in range(args.block):
            t = time.perf_counter()
            r = c.post("/v1/completions", json=body)
            lat[n].append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
rates = {n: [] for n in servers}
if args.run:
    ask = {"model": "text", "prompt": "The ", "max_tokens": args.stream_tokens, "temperature": 1.0, "stream": True, "seed": 1,
           "stream_options": {"include_usage": True}}
    for block in range(args.blocks):
        for n, c in (clients.items() if block % 2 == 0 else reversed(list(clients.items()))):
            for _ in range(3):
                t, tokens = time.perf_counter(), 0
                with c.stream("POST", "/v1/completions", json=ask) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {") and '"usage"' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                rates[n].append(tokens / (time.perf_counter() - t))
for p, _, _ in servers.values():
    p.terminate()
out = {"benchmark": "gateway_ab", "cpus": os.cpu_count(), "baseline": args.baseline}
out.update({n: {"requests": len(v), "median_ms": round(statistics.median(v), 3), "p90_ms": round(sorted(v)[int(len(v) * .9)], 3)} for n, v in lat.items()})
if args.run:
    for n, v in rates.items():
        out[n]["stream_tokens_per_s"] = round(statistics.median(v), 1)
out["after_minus_before_median_ms"] = round(out["after"]["median_ms"] - out["before"]["median_ms"], 3)
print(json.dumps(out))
