"""The README's workflow through the real CLI: prepare -> train -> kill -9 -> resume -> generate -> eval."""
import json
import os
import signal
import subprocess
import time

from conftest import AIGC, run_cli


def aigc(*args, cwd, check=True):
    """A command through the CLI's entry point in this process (imports paid once); the killed run below is a real process."""
    return run_cli(*args, cwd=cwd, ok=check)


def steps_logged(path):
    if not path.is_file():
        return 0
    lines = [l for l in path.read_text().splitlines() if l.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def test_prepare_train_kill_resume_generate_eval(tmp_path):
    aigc("data", "prepare", "--builtin", "pydoc", "--out", "corpus", cwd=tmp_path)
    args = ["train", "text", "tiny", "--data", "corpus", "--train.max_steps=300", "--train.checkpoint_interval=20",
            "--train.eval_interval=50", "--train.samples=0"]
    # Reference: an uninterrupted run.
    aigc(*args, "--run", "runs/straight", cwd=tmp_path)
    # The same run, killed with SIGKILL part-way, then resumed.
    proc = subprocess.Popen([*AIGC, *args, "--run", "runs/killed"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs/killed/metrics.jsonl"
    deadline = time.time() + 300
    while steps_logged(metrics) < 50 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = steps_logged(metrics)
    assert 50 <= killed_at < 300, "the run must be killed mid-way"
    aigc("train", "text", "--resume", "--run", "runs/killed", cwd=tmp_path)
    straight = [json.loads(l) for l in (tmp_path / "runs/straight/metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 301))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # exactly, every step after the resume too
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in straight]

    gen = aigc("generate", "text", "runs/killed", "--prompt", "The ", "--max-new-tokens", "30", "--seed", "3", "--json", cwd=tmp_path)
    again = aigc("generate", "text", "runs/killed", "--prompt", "The ", "--max-new-tokens", "30", "--seed", "3", "--json", cwd=tmp_path)
    first = json.loads(gen.stdout)
    assert first == json.loads(again.stdout) and first["completions"][0]["completion_tokens"] <= 30
    streamed = aigc("generate", "text", "runs/killed", "--prompt", "The ", "--max-new-tokens", "30", "--seed", "3", cwd=tmp_path)
    assert streamed.stdout == "The " + first["completions"][0]["text"] + "\n"
    tpl = aigc("generate", "text", "runs/killed", "--template", "ad-slogan", "--var", "brand=Acme", "--var", "product=rope",
               "--max-new-tokens", "5", "--json", cwd=tmp_path)
    assert json.loads(tpl.stdout)["prompt"] == "Brand: Acme\nProduct: rope\nAudience: everyone\nSlogan:"

    ev = aigc("eval", "text", "runs/killed", "--pairs", "3", "--samples", "3", "--max-new-tokens", "20", "--json", cwd=tmp_path)
    report = json.loads(ev.stdout)
    assert report["likelihood"]["bits_per_char"] > 0 and "rougeL" in report["reference"]
    assert (tmp_path / "runs/killed/eval/report.md").is_file()
    other = aigc("eval", "text", "runs/killed", "--data", "corpus", "--pairs", "2", "--samples", "0", "--max-new-tokens", "10",
                 cwd=tmp_path)
    assert "unknown to this model's tokenizer" in other.stdout and (tmp_path / "runs/killed/eval/data-corpus/report.md").is_file()


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xfe\n")
    cases = [
        ["data", "prepare", "missing.txt", "--out", "o"],
        ["data", "prepare", "bad.txt", "--out", "o"],
        ["train", "text", "tiny", "--data", "o", "--run", "r"],
        ["train", "text", "tiny", "--model.n_lyer=2"],
        ["train", "text", "--resume", "--run", "nowhere"],
        ["generate", "text", "nowhere"],
        ["generate", "text", "nowhere", "--template", "poem"],
        ["eval", "text", "nowhere"],
    ]
    for args in cases:
        res = run_cli(*args, cwd=tmp_path, ok=False)  # in this process: the imports are paid once
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()
