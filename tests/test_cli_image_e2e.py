"""The image workflow through the command line: prepare -> train -> resume -> generate -> eval.

The commands run in this process through the CLI's entry point (`aigc.cli:main`, what the console script
calls): the imports are paid once. tests/test_cli_errors.py runs it in a real process too.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import run_cli as run


def test_image_workflow(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path / "cache"))
    data, runs = tmp_path / "shapes", tmp_path / "run"
    res = run("data", "prepare", "--builtin", "shapes", "--size", "8", "--count", "200", "--out", data, "--json")
    manifest = json.loads(res.stdout)
    assert manifest["kind"] == "image" and manifest["images"]["read"] == 200

    run("train", "image", "tiny", "--data", data, "--run", runs, "--train.max_steps=6")
    res = run("train", "image", "--run", runs, "--resume", "--train.max_steps=12", "--json")
    assert json.loads(res.stdout)["steps"] == 12
    steps = [json.loads(line)["step"] for line in (runs / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))

    out = tmp_path / "gen"
    res = run("generate", "image", runs, "--caption", "a small red circle at top left", "--n", "3", "--seed", "4",
              "--size", "64", "--out", out, "--json")
    files = json.loads(res.stdout)["images"]
    assert [f["seed"] for f in files] == [4, 5, 6]
    img = Image.open(files[0]["file"])
    assert img.size == (64, 64) and img.mode == "RGB"
    grid = json.loads(res.stdout)["grid"]
    assert grid == str(out / "grid-000004.png") and Path(grid).is_file()
    first = Path(files[0]["file"]).read_bytes()
    again = json.loads(run("generate", "image", runs, "--caption", "a small red circle at top left", "--n", "1", "--seed", "4",
                           "--size", "64", "--out", out, "--json").stdout)
    assert again["images"][0]["file"] == str(out / "000004-2.png") and again["grid"] == str(out / "grid-000004-2.png")
    assert Path(files[0]["file"]).read_bytes() == first  # the same seed again never replaces an earlier file
    run("generate", "image", runs, "--caption", "a large blue square in the center", "--interpolate", "1", "2",
        "--frames", "4", "--gif", "--out", out)
    strip = np.asarray(Image.open(out / "interpolate-1-2.png"))
    assert strip.shape == (256, 4 * 256, 3) and Image.open(out / "interpolate-1-2.gif").n_frames == 6

    res = run("eval", "image", runs, "--n", "16", "--feature-steps", "30", "--json")
    report = json.loads(res.stdout)
    assert report["scores"]["generated_images"] == 16 and report["scores"]["fid"] > 0
    assert set(report["conditional_accuracy"]) >= {"class", "colour", "shape", "position"}
    assert (runs / "eval" / "report.md").is_file() and (runs / "eval" / "samples.png").is_file()

    bad = run("generate", "image", runs, "--caption", "a purple hexagon", ok=False)
    assert bad.returncode == 2 and "never saw these caption words: hexagon" in bad.stderr
    bad = run("train", "image", "nope", "--data", data, ok=False)
    assert bad.returncode == 2 and "config not found: nope" in bad.stderr and "ddpm-shapes" in bad.stderr
    bad = run("data", "prepare", tmp_path / "missing", "--kind", "image", "--out", tmp_path / "x", ok=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "no such file" in bad.stderr
