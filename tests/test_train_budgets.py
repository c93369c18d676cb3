"""Every training loop (text, music, VAE, DCGAN, diffusion): stops at its time budget within one step with the
schedule at its end, names what stopped it, reports progress that never jumps back, and on Ctrl-C / SIGTERM
checkpoints the step it is on, from which a resume continues exactly."""
import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from aigc.config import load_config
from aigc.train.common import read_jsonl
from conftest import AIGC, run_cli, wait_for

CONFIGS = Path(__file__).parents[1] / "src/aigc/configs"
KINDS = ["text", "sft", "dpo", "music", "vae", "dcgan", "ddpm"]
# SFT fully fine-tuned, DPO with LoRA (its reference is the same model with the adapter off)
CHAT = {"sft": ("products_chat", False), "dpo": ("products_pref", True)}


@pytest.fixture(scope="module")
def shapes8(tmp_path_factory):
    from aigc.data.images import ImagePrepareOptions, prepare

    out = tmp_path_factory.mktemp("img") / "shapes8"
    prepare([], out, ImagePrepareOptions(size=8, count=120), builtin=["shapes"])
    return out


@pytest.fixture
def loop(request, pydoc_corpus, music_data, shapes8):
    """(make config from train overrides, prepare_run, train) of one model kind, on tiny built-in data."""
    kind = request.param
    if kind == "text":
        from aigc.train.lm import TextTrainConfig as Cfg, prepare_run, train

        base, data, extra = CONFIGS / "text/tiny.yaml", pydoc_corpus, {}
    elif kind in CHAT:
        from aigc.train.text import TextTrainConfig as Cfg, prepare_run, train

        fixture, lora = CHAT[kind]
        base, data = None, request.getfixturevalue(fixture)
        extra = {"task": kind, "init": {"path": str(request.getfixturevalue("chat_model"))}, "lora": {"enabled": lora},
                 "model": {"block_size": 768}}
    elif kind == "music":
        from aigc.train.music import MusicTrainConfig as Cfg, prepare_run, train

        base, data, extra = CONFIGS / "music/tiny.yaml", music_data, {}
    else:
        from aigc.train.image import ImageTrainConfig as Cfg, prepare_run, train

        base, data, extra = CONFIGS / "image/tiny.yaml", shapes8, {"model": {"kind": kind}}

    def make(**train_overrides):
        quiet = {"samples": 0} if kind in ("text", "music", *CHAT) else {"sample_interval": 10**6}
        chat = {"batch_size": 2 if kind == "sft" else 1, "lr": 3e-3, "warmup_steps": 2, "eval_batches": 2, "precision": "fp32"} if kind in CHAT else {}
        return load_config(Cfg, base, {"data": {"path": str(data)}, **extra, "train": {**chat, **quiet, **train_overrides}})

    return kind, make, prepare_run, train


@pytest.mark.parametrize("loop", KINDS, indirect=True)
def test_time_budget_stops_within_a_step_and_ends_the_schedule(tmp_path, loop):
    kind, make, prepare_run, train = loop
    cfg = make(max_steps=10**6, max_seconds=1.5, checkpoint_interval=10**6, eval_interval=10**6)
    prepare_run(cfg, tmp_path / "run")
    seen = []
    summary = train(cfg, tmp_path / "run", progress=lambda step, done, record: seen.append(done))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert summary["stopped"] == "budget" and summary["steps"] == len(records) > 5
    # the first step boundary past the budget (time_s is rounded to the millisecond: 1.4996 s is logged as 1.5)
    assert records[-2]["time_s"] <= 1.5 <= records[-1]["time_s"] and records[-2]["time_s"] < records[-1]["time_s"]
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == len(records)  # a bar over it never jumps back
    if kind != "dcgan":  # the GAN keeps a constant rate; the others decay on time to their floor at the budget
        lr, floor = cfg.train.lr, cfg.train.min_lr
        # the last step's rate is the schedule's at its start: near the floor, by as much as the step took (on a busy
        # machine a step is a larger share of 1.5 s; cosine leaves (pi*e)^2/4 of the range with e of the budget left)
        left = max(0.0, 1.5 - records[-2]["time_s"]) / 1.5
        assert records[-1]["lr"] - floor < max(0.05, 4 * left ** 2 + 0.01) * (lr - floor)
        assert records[-1]["lr"] < records[len(records) // 2]["lr"] and 0.05 * (lr - floor) < records[len(records) // 2]["lr"] - floor
        assert sum("val_loss" in r for r in records) >= 2  # a curve, not one dot, although the interval was never reached


@pytest.mark.parametrize("loop", KINDS, indirect=True)
def test_interrupt_checkpoints_the_current_step_and_resume_is_exact(tmp_path, loop):
    kind, make, prepare_run, train = loop
    cfg = make(max_steps=12, checkpoint_interval=100, eval_interval=4)
    for name in ("straight", "stopped"):
        prepare_run(cfg, tmp_path / name)
    train(cfg, tmp_path / "straight")

    def ctrl_c_after_step_5(step, done, record):
        if step == 5:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C: the handler notes it, the loop ends its step

    summary = train(cfg, tmp_path / "stopped", progress=ctrl_c_after_step_5)
    assert summary["stopped"] == "interrupted" and summary["steps"] == 6
    import torch

    assert torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=False)["state"]["step"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handlers are gone again
    summary = train(cfg, tmp_path / "stopped", resume=True)
    assert summary["stopped"] == "steps" and summary["steps"] == 12
    key = "loss_d" if kind == "dcgan" else "loss"
    straight, resumed = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r[key] for r in resumed] == [r[key] for r in straight]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in straight]


def test_cli_ctrl_c_and_sigterm_print_the_resume_command_and_exit_130(tmp_path, pydoc_corpus):
    env = {**os.environ, "AIGC_HOME": str(tmp_path / "home")}
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"

    def steps():
        lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")] if metrics.is_file() else []
        return json.loads(lines[-1])["step"] if lines else 0

    def interrupt(args, sig):
        proc = subprocess.Popen([*AIGC, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        start = steps()
        wait_for(lambda: steps() >= start + 20, "20 more training steps", timeout=180, proc=proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, err

    code, err = interrupt(["train", "text", "tiny", "--data", str(pydoc_corpus), "--run", "runs/t", "--train.max_steps=100000",
                           "--train.samples=0"], signal.SIGINT)
    last = err.strip().splitlines()[-1]
    assert code == 130 and last.startswith("interrupted at step ") and "Traceback" not in err, err
    at = int(last.split("interrupted at step ")[1].split(":")[0])
    assert at == steps()  # the checkpoint is the step the loop was on: nothing logged is lost
    command = shlex.split(last.split("Resume with: ")[1])
    assert command == ["aigc", "train", "text", "--resume", "--run", "runs/t"]
    code, err = interrupt([*command[1:]], signal.SIGTERM)  # the printed command, as a user would paste it
    assert code == 130 and "Resume with: aigc train text --resume --run runs/t" in err and steps() > at + 20
    res = run_cli(*command[1:], f"--train.max_steps={steps() + 3}", "--json", cwd=tmp_path)
    assert json.loads(res.stdout)["steps"] == steps() and [r["step"] for r in read_jsonl(metrics)] == list(range(1, steps() + 1))


def test_resume_without_a_checkpoint_says_it_starts_over(tmp_path, pydoc_corpus):
    from aigc.train.lm import TextTrainConfig, prepare_run

    cfg = load_config(TextTrainConfig, CONFIGS / "text/tiny.yaml", {"data": {"path": str(pydoc_corpus)}, "train": {"samples": 0}})
    prepare_run(cfg, tmp_path / "r")  # as a run killed before its first checkpoint leaves it
    res = run_cli("train", "text", "--resume", "--run", tmp_path / "r", "--train.max_steps=3")
    assert f"{tmp_path / 'r'} has no checkpoint yet: starting from step 0" in res.stderr
    assert "trained 3 steps" in res.stdout and "reached train.max_steps" in res.stdout
