"""Training on several processes (DDP over gloo, started by torchrun through `aigc train --nproc`), on this CPU.

The promise: ``train.batch_size`` is the global batch, each rank trains on its share of it, so 2 processes log the
losses of 1 process (to float rounding); only rank 0 writes; a killed rank stops the job and the run resumes
exactly; two "nodes" on 127.0.0.1 train together; bad requests are refused before anything starts.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigc.config import load_config
from aigc.train.common import read_jsonl
from conftest import run_cli

CONFIGS = Path(__file__).parents[1] / "src/aigc/configs"
TIMEOUT_S = 240  # a launch: the processes' imports and a few tiny steps; a hang fails loudly instead


def aigc(*args, timeout=TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in read_jsonl(run / "metrics.jsonl")]


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    """Equal to 1e-5, relative for values above 1 (a VAE's loss is ~9000 nats: float32 holds 7 digits of it)."""
    return abs(a - b) <= tol * max(1.0, abs(a))


def assert_same(one: list[tuple], two: list[tuple]) -> None:
    assert [s for s, *_ in one] == [s for s, *_ in two]  # rank 0 alone logged: one line per step
    for (step, a, va), (_, b, vb) in zip(one, two):
        assert close(a, b), (step, a, b)
        assert (va is None) == (vb is None) and (va is None or close(va, vb)), (step, va, vb)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from aigc.data.images import ImagePrepareOptions, prepare

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    prepare([], out, ImagePrepareOptions(size=8, count=120), builtin=["shapes"])
    return out


def single_run(tmp_path, modality, config, data, overrides: dict) -> Path:
    """The same job in this process, world size 1."""
    from aigc.train import image, music, text

    module, cls = {"text": (text, text.TextTrainConfig), "music": (music, music.MusicTrainConfig),
                   "image": (image, image.ImageTrainConfig)}[modality]
    path = CONFIGS / modality / f"{config}.yaml"  # "none": the defaults, as `aigc train text` without a config
    cfg = load_config(cls, path if path.is_file() else None, overrides | {"data": {"path": str(data)}})
    run = tmp_path / "one"
    module.prepare_run(cfg, run)
    module.train(cfg, run)
    return run


def flags(overrides: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            out += flags(value, f"{prefix}{key}.")
        else:
            out.append(f"--{prefix}{key}={json.dumps(value) if isinstance(value, (list, bool)) else value}")
    return out


JOBS = {
    "pretrain": ("text", "tiny", "pydoc_corpus", {"train": {"max_steps": 12, "samples": 0}}),
    # FSDP2 shards the model instead of replicating it: the same losses (on gloo here; on NCCL in benchmarks/gpu.py)
    "pretrain-fsdp2": ("text", "tiny", "pydoc_corpus", {"train": {"max_steps": 8, "samples": 0, "fsdp": True}}),
    "music": ("music", "tiny", "music_data", {"train": {"max_steps": 6, "samples": 0, "eval_interval": 3}}),
    "vae": ("image", "tiny", "shapes", {"model": {"kind": "vae"}, "train": {"max_steps": 6, "precision": "fp32", "sample_interval": 100}}),
}


@pytest.mark.parametrize("job", list(JOBS))
def test_two_processes_log_the_losses_of_one(tmp_path, request, job):
    modality, config, data_fixture, overrides = JOBS[job]
    data = request.getfixturevalue(data_fixture)
    single = {k: v for k, v in overrides["train"].items() if k != "fsdp"}  # one process: nothing to shard
    one = single_run(tmp_path, modality, config, data, {**overrides, "train": single})
    r = aigc("train", modality, config, "--data", data, "--run", tmp_path / "two", "--nproc", 2, *flags(overrides), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])  # rank 0 alone reports
    assert summary["world_size"] == 2 and r.stdout.count('"world_size"') == 1
    assert_same(losses(one), losses(tmp_path / "two"))
    assert (tmp_path / "two" / "checkpoints" / "last.pt").is_file() and (tmp_path / "two" / "model").is_dir()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2-lora"])
def test_sft_on_two_processes_weights_every_supervised_token_once(tmp_path, chat_model, products_chat, strategy):
    """SFT rows hold different numbers of supervised tokens: each rank's loss is its share of the global mean."""
    overrides = {"task": "sft", "init": {"path": str(chat_model)}, "model": {"block_size": 768},
                 "train": {"batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "max_steps": 4, "eval_interval": 2, "eval_batches": 2,
                           "checkpoint_interval": 4, "precision": "fp32", "samples": 0}}
    if strategy == "fsdp2-lora":
        overrides["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    one = single_run(tmp_path, "text", "none", products_chat, overrides)
    extra = ["--train.fsdp=true"] if strategy.startswith("fsdp2") else []
    r = aigc("train", "text", "--data", products_chat, "--run", tmp_path / "two", "--nproc", 2, *flags(overrides), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(losses(one), losses(tmp_path / "two"))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["strategy"] == ("fsdp2" if extra else "ddp")
    if extra:  # the adapter gathered from the shards is the one a single process trains
        from safetensors.torch import load_file

        a, b = (load_file(str(run / "model" / "adapter_model.safetensors")) for run in (one, tmp_path / "two"))
        assert sorted(a) == sorted(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def _rank_pid(run: Path, rank: int) -> int | None:
    """The pid of the process of ``rank`` training ``run`` (from /proc: its command line and torchrun's RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in cmd and b"torch.distributed.run" not in b" ".join(cmd) and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_stops_the_job_and_the_run_resumes_exactly(tmp_path, pydoc_corpus):
    # a flat learning rate, so the resumed run may be given a shorter budget without changing its schedule
    args = ["--train.lr=0.003", "--train.min_lr=0.003", "--train.checkpoint_interval=10", "--train.eval_interval=1000",
            "--train.samples=0", "--model.n_embd=32", "--model.block_size=64"]
    run = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "aigc", "train", "text", "tiny", "--data", str(pydoc_corpus), "--run", str(run),
                            "--nproc", "2", "--train.max_steps=100000", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # past a checkpoint (every 10 steps), a few steps before the next
            logged = len(read_jsonl(run / "metrics.jsonl"))
            if logged >= 12 and 2 <= logged % 10 <= 7:
                break
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled"
            time.sleep(0.005)
        pid = _rank_pid(run, 1)
        assert pid, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        _, err = job.communicate(timeout=TIMEOUT_S)  # no hang: the launcher stops the other rank
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "the distributed job stopped" in err and f"aigc train text --resume --run {run} --nproc 2" in err
    import torch

    resumed_from = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["state"]["step"]
    before = {step: loss for step, loss, _ in losses(run)}
    replayed = [s for s in before if s > resumed_from]
    assert resumed_from % 10 == 0 and replayed, (resumed_from, max(before))
    r = aigc("train", "text", "--resume", "--run", run, "--nproc", 2, f"--train.max_steps={max(before) + 2}")
    assert r.returncode == 0, r.stderr[-3000:]
    after = {step: loss for step, loss, _ in losses(run)}
    assert sorted(after) == list(range(1, max(before) + 3))
    for step in replayed:  # the steps after the checkpoint, run twice: the same losses
        assert abs(before[step] - after[step]) <= 1e-6, (step, before[step], after[step])


def test_two_nodes_on_one_host_train_together(tmp_path, pydoc_corpus):
    from aigc.distributed import free_port

    port = free_port()
    common = ["train", "text", "tiny", "--data", pydoc_corpus, "--run", tmp_path / "two", "--nnodes", 2, "--nproc", 1,
              "--master-addr", "127.0.0.1", "--master-port", port, "--train.max_steps=6", "--train.samples=0"]
    # node 1 first: it must wait for node 0 (which also prepares the run directory), not fail
    nodes = [subprocess.Popen([sys.executable, "-m", "aigc", *map(str, common), "--node-rank", str(rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (1, 0)]
    results = []
    try:
        for node in nodes:
            results.append((node.wait(timeout=TIMEOUT_S), node.stderr.read()))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(rc == 0 for rc, _ in results), [e[-2000:] for _, e in results]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    one = single_run(tmp_path, "text", "tiny", pydoc_corpus, {"train": {"max_steps": 6, "samples": 0}})
    assert_same(losses(one), losses(tmp_path / "two"))


def test_bad_requests_are_refused_before_anything_starts(tmp_path, pydoc_corpus):
    from aigc import threads

    cores = len(threads.usable_cores())
    base = ["train", "text", "tiny", "--data", pydoc_corpus, "--train.max_steps=2", "--train.samples=0"]
    r = run_cli(*base, "--run", tmp_path / "a", "--nproc", cores + 1, ok=False)
    assert r.returncode == 2 and f"--nproc {cores + 1} on {cores} CPU core(s)" in r.stderr and "--oversubscribe" in r.stderr
    r = run_cli(*base, "--run", tmp_path / "b", "--nproc", 3, "--oversubscribe", ok=False)  # tiny's batch is 4
    assert r.returncode == 2 and "train.batch_size=4 (the global batch) does not divide among 3 processes" in r.stderr
    r = run_cli(*base, "--run", tmp_path / "c", "--nproc", 2, "--nnodes", 2, ok=False)
    assert r.returncode == 2 and "--master-port" in r.stderr
    r = run_cli("train", "image", "tiny", "--data", tmp_path, "--run", tmp_path / "d", "--model.kind=dcgan", "--nproc", 2, ok=False)
    assert r.returncode == 2 and "dcgan loop trains in one process" in r.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    r = run_cli(*base, "--run", tmp_path / "taken", "--nproc", 2, ok=False)  # an existing run directory, not resumed
    assert r.returncode == 2 and "already exists; use --resume to continue it or --overwrite" in r.stderr
    r = run_cli("train", "text", "tiny", "--data", tmp_path / "nope", "--run", tmp_path / "f", "--nproc", 2, ok=False)
    assert r.returncode == 2 and "data not found" in r.stderr
    assert not any((tmp_path / x).exists() for x in "abcdf")  # nothing written
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    # a run trained in one process resumes in one
    run_cli(*base, "--run", tmp_path / "e")
    r = run_cli("train", "text", "--resume", "--run", tmp_path / "e", "--nproc", 2, "--train.max_steps=4", ok=False)
    assert r.returncode == 2 and "trained in one process and is resumed on 2" in r.stderr
    assert len(read_jsonl(tmp_path / "e" / "metrics.jsonl")) == 2
