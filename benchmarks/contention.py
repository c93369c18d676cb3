"""CPU contention benchmark: training and generation speed beside a busy process; prints ONE JSON object last.

A newcomer's laptop is rarely idle. This measures what `aigc train text char-small` and `aigc generate
text` keep of their idle speed when one other process spins on every core (``busy``), under two thread
policies, each in a fresh process as a user would start it:

- ``auto``: the product's default (aigc/threads.py: threads follow the free CPU, short OpenMP spinning);
- ``torch_default``: torch's own default, one thread per core with libgomp's default spinning
  (``OMP_NUM_THREADS=<cores> GOMP_SPINCOUNT=300000``), what the project did before.

Training: char-small on the built-in pydoc corpus for --seconds: tokens trained per second of the loop
(its periodic evaluations included). Generation: one 400-token sample (batch 1, the CLI's case) after a warm-up, tokens/s of the
decode, the median of --repeats. ``busy_share`` is busy / idle for the ``auto`` policy; fair share is
0.5 of a 2-core machine, one thread alone would get about a third. The spinners run in this process's
session (with autogroup scheduling a spinner started from another terminal takes less from us).

    python benchmarks/contention.py --seconds 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("auto", "torch_default")


def policy_env(policy: str, cores: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("AIGC_THREADS", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if policy == "torch_default":
        env.update(OMP_NUM_THREADS=str(cores), GOMP_SPINCOUNT="300000")
    return env


def spinners(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(1.0)  # let the scheduler see them
    return procs


def train_tokens_per_s(corpus: Path, work: Path, seconds: float, env: dict) -> tuple[float, dict]:
    run = work / "train-run"
    res = subprocess.run([sys.executable, "-m", "aigc.cli", "train", "text", "char-small", "--data", str(corpus), "--run", str(run),
                          "--overwrite", f"--train.max_seconds={seconds}", "--train.samples=0", "--json"],
                         env=env, capture_output=True, text=True, timeout=seconds * 6 + 300)
    if res.returncode != 0:
        raise SystemExit(f"training failed: {res.stderr[-2000:]}")
    summary = json.loads(res.stdout)
    import yaml

    loop = yaml.safe_load((run / "config.yaml").read_text())["train"]
    # Over the whole loop (its periodic evaluations included): a slow policy may log too few windows for a median.
    rate = round(summary["steps"] * loop["batch_size"] * loop["grad_accum"] * summary["block_size"] / summary["elapsed_s"])
    return rate, {"steps": summary["steps"], "elapsed_s": summary["elapsed_s"], "median_logged_tokens_per_s": summary["tokens_per_s"],
                  "threads": summary.get("threads")}


def generate_tokens_per_s(run: Path, tokens: int, repeats: int, env: dict) -> tuple[float, dict]:
    res = subprocess.run([sys.executable, __file__, "--worker-generate", str(run), "--tokens", str(tokens), "--repeats", str(repeats)],
                         env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"generation failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["tokens_per_s"], {"threads": out["threads"], "runs": out["runs"]}


def worker_generate(run: Path, tokens: int, repeats: int) -> None:
    """In a fresh process, as `aigc generate text` runs: the thread policy, the model, then timed samples."""
    from aigc import threads
    from aigc.generate.text import SamplingParams, TextGenerator

    threads.configure()
    gen = TextGenerator.from_path(run)
    gen.generate([""], SamplingParams(max_new_tokens=20, seed=0, ignore_eos=True))  # warm-up
    rates = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate(["The "], SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i + 1, ignore_eos=True))
        rates.append(out[0].completion_tokens / (time.perf_counter() - t0))
    print(json.dumps({"tokens_per_s": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates],
                      "threads": threads.current().to_dict()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="training budget per measurement")
    ap.add_argument("--tokens", type=int, default=400, help="tokens per generated sample")
    ap.add_argument("--repeats", type=int, default=3, help="timed samples per generation measurement")
    ap.add_argument("--spinners", type=int, default=0, help="busy processes (0: one per core)")
    ap.add_argument("--worker-generate", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_generate:
        worker_generate(args.worker_generate, args.tokens, args.repeats)
        return

    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="aigc-contention-"))
    corpus = work / "corpus"
    subprocess.run([sys.executable, "-m", "aigc.cli", "data", "prepare", "--builtin", "pydoc", "--out", str(corpus)],
                   check=True, capture_output=True)
    # The model generation is timed on: char-small trained briefly (its speed, not its quality, matters here).
    model = work / "model-run"
    subprocess.run([sys.executable, "-m", "aigc.cli", "train", "text", "char-small", "--data", str(corpus), "--run", str(model),
                    "--train.max_seconds=15", "--train.samples=0"], check=True, capture_output=True)

    results: dict = {p: {"train": {}, "generate": {}, "detail": {}} for p in POLICIES}
    for condition in ("idle", "busy"):
        procs = spinners(args.spinners or cores) if condition == "busy" else []
        try:
            for policy in POLICIES:
                env = policy_env(policy, cores)
                rate, detail = train_tokens_per_s(corpus, work, args.seconds, env)
                results[policy]["train"][condition] = rate
                results[policy]["detail"][f"train_{condition}"] = detail
                rate, detail = generate_tokens_per_s(model, args.tokens, args.repeats, env)
                results[policy]["generate"][condition] = rate
                results[policy]["detail"][f"generate_{condition}"] = detail
                print(f"{condition:>4} {policy:>13}: train {results[policy]['train'][condition]} tok/s, "
                      f"generate {results[policy]['generate'][condition]} tok/s", file=sys.stderr)
        finally:
            for p in procs:
                p.kill()
                p.wait()

    def share(policy: str, what: str) -> float:
        r = results[policy][what]
        return round(r["busy"] / r["idle"], 3)

    auto, base = results["auto"], results["torch_default"]
    print(json.dumps({
        "benchmark": "contention", "cpus": cores, "spinners": args.spinners or cores, "train_seconds": args.seconds,
        "train_tokens_per_s": auto["train"], "generate_tokens_per_s": auto["generate"],
        "busy_share": {"train": share("auto", "train"), "generate": share("auto", "generate")},
        "threads": auto["detail"],
        "torch_default": {"train_tokens_per_s": base["train"], "generate_tokens_per_s": base["generate"],
                          "busy_share": {"train": share("torch_default", "train"), "generate": share("torch_default", "generate")},
                          "threads": base["detail"]},
    }))


if __name__ == "__main__":
    main()
