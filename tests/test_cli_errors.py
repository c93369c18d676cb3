"""Every kind of usage mistake is one line (`error: ...`) naming the flag and what is allowed, exit status 2,
no traceback: run against the installed typer and click (pyproject pins their ranges)."""
import socket
import subprocess

import pytest

from conftest import AIGC, run_cli


def one_line_error(*args, **kw) -> str:
    res = run_cli(*args, ok=False, **kw)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (args, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, (args, res.stderr)
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["frobnicate"], ["No such command 'frobnicate'", "commands: ", "train", "generate", "serve"]),
    (["train", "txet"], ["No such command 'txet'", "(aigc train)", "text", "image", "music"]),
    (["--bogus-flag"], ["no such option --bogus-flag", "allowed: --help"]),
    (["generate", "text", "RUN", "--bogus-flag"], ["no such option --bogus-flag (aigc generate text)", "--max-new-tokens", "--prompt"]),
    (["generate", "text", "RUN", "--max-new-tokens", "abc"], ["'--max-new-tokens'", "integer"]),
    (["generate", "image", "RUN", "--size", "abc"], ["'--size'", "integer"]),
    (["admin", "price", "set", "*", "--input-per-1k", "abc"], ["'--input-per-1k'", "number"]),
    (["serve", "--port", "99999"], ["'--port'", "65535"]),
    (["serve", "--port", "0"], ["'--port'", "1"]),
    (["generate", "text"], ["Missing argument", "run"]),
    (["eval", "image", "RUN", "--n"], ["--n", "requires an argument"]),
    (["train", "text", "tiny", "--model.n_lyer=2"], ["model.n_lyer"]),
])
def test_usage_mistakes(tmp_path, args, expected):
    line = one_line_error(*args, cwd=tmp_path)
    for part in expected:
        assert part in line, (part, line)


def test_port_in_use_fails_before_anything_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_cli("serve", "--echo-model", "e", "--port", port, "--home", tmp_path, ok=False)
    assert res.returncode == 2 and res.stderr.strip() == (f"error: --port {port} is in use on 127.0.0.1 (another server?): "
                                                         "stop it or pick another port")
    assert "serving" not in res.stderr + res.stdout  # it never claims to serve


def test_help_is_not_an_error():
    res = run_cli()
    assert res.returncode == 0 and "Usage: aigc" in res.stdout and "train" in res.stdout
    assert run_cli("train", "text", "--help").returncode == 0


def test_the_console_entry_point_too(tmp_path):
    """The same in a real process (the installed `aigc` is `aigc.cli:main`)."""
    res = subprocess.run([*AIGC, "generate", "text", "RUN", "--temperature", "hot"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: Invalid value for '--temperature'")


@pytest.mark.parametrize("value, message", [("abc", "AIGC_THREADS: Input should be a valid integer"),
                                            ("-1", "AIGC_THREADS: Input should be greater than or equal to 0")])
def test_a_bad_setting_is_one_line(tmp_path, monkeypatch, value, message):
    monkeypatch.setenv("AIGC_THREADS", value)
    assert one_line_error("generate", "text", tmp_path / "nowhere").startswith(f"error: bad setting: {message}")
