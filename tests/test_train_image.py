import json
from pathlib import Path

import numpy as np
import pytest

from aigc.config import load_config
from aigc.errors import UserError
from aigc.generate.image import ImagePipeline
from aigc.train.common import read_jsonl
from aigc.train.image import ImageTrainConfig, prepare_run, train

TINY = Path(__file__).parents[1] / "src/aigc/configs/image/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    from aigc.data.images import ImagePrepareOptions, prepare

    out = tmp_path_factory.mktemp("img") / "shapes8"
    prepare([], out, ImagePrepareOptions(size=8, count=120), builtin=["shapes"])
    return out


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    from aigc.data.images import ImagePrepareOptions, prepare

    out = tmp_path_factory.mktemp("img") / "digits8"
    prepare([], out, ImagePrepareOptions(size=8, mode="gray"), builtin=["digits"])
    return out


def _cfg(data, kind, **train):
    return load_config(ImageTrainConfig, TINY, {"data": {"path": str(data)}, "model": {"kind": kind}, "train": train})


@pytest.mark.parametrize("kind", ["dcgan", "vae", "ddpm"])
def test_each_kind_trains_and_samples(tmp_path, tiny_shapes, tiny_digits, kind):
    for data, condition in ((tiny_shapes, "caption"), (tiny_digits, "class")):
        run = tmp_path / f"{kind}-{condition}"
        cfg = _cfg(data, kind)
        prepare_run(cfg, run)
        summary = train(cfg, run)
        assert summary["steps"] == 12 and summary["condition"] == condition
        records = read_jsonl(run / "metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, 13))
        key = "loss_d" if kind == "dcgan" else "loss"
        assert all(np.isfinite(r[key]) for r in records)
        if kind != "dcgan":
            assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 10, 12]  # every 4 steps, and a tenth left without one
        for f in ("loss.png", "samples.png", "samples/step-000006.png", "samples/step-000012.png", "summary.json", "model/aigc_image.json"):
            assert (run / f).is_file(), f
        assert list((run / "tb").iterdir())
        pipe = ImagePipeline.from_run(run)
        a, labels = pipe.generate(n=3, seed=5)
        assert a.shape[1:] == (8, 8, 3 if condition == "caption" else 1) and a.dtype == np.uint8
        assert (labels[0] in pipe.meta.prompts) if condition == "caption" else labels == ["0", "1", "2"]
        key = {"captions": labels[1:]} if condition == "caption" else {"classes": labels[1:]}
        b, _ = pipe.generate(n=2, seed=6, batch_size=1, **key)
        # image i depends on seed + i and its condition only, not on n or batching (up to float rounding)
        assert np.abs(a[1:].astype(int) - b).max() <= 1


def test_loss_goes_down_on_digits(tmp_path, tiny_digits):
    run = tmp_path / "vae"
    cfg = _cfg(tiny_digits, "vae", max_steps=150, batch_size=32, lr=3e-3, eval_interval=50, sample_interval=150, checkpoint_interval=150)
    prepare_run(cfg, run)
    train(cfg, run)
    val = [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert len(val) >= 8 and val[-1] < 0.6 * val[0]  # a curve (every 50 steps and each tenth), falling
    assert max(val[len(val) // 2:]) < min(val[:2])  # the second half lies below the start, whatever the noise


@pytest.mark.parametrize("kind", ["dcgan", "ddpm"])
def test_resume_is_exact(tmp_path, tiny_shapes, kind):
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = _cfg(tiny_shapes, kind)
    prepare_run(cfg, full)
    train(cfg, full)
    prepare_run(cfg, part)

    class Killed(Exception):
        pass

    def kill_at_10(step, total, record):  # after the step-8 checkpoint and two more steps that are lost
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, part, progress=kill_at_10)
    train(cfg, part, resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")} for r in rs]  # noqa: E731
    assert strip(read_jsonl(part / "metrics.jsonl")) == strip(read_jsonl(full / "metrics.jsonl"))
    a, _ = ImagePipeline.from_run(full).generate(n=2, seed=1)
    b, _ = ImagePipeline.from_run(part).generate(n=2, seed=1)
    assert np.array_equal(a, b)


def test_interpolation_ends_on_the_seeds_own_images(tmp_path, tiny_digits):
    run = tmp_path / "gan"
    cfg = _cfg(tiny_digits, "dcgan")
    prepare_run(cfg, run)
    train(cfg, run)
    pipe = ImagePipeline.from_run(run)
    frames = pipe.interpolate(3, 9, frames=5, classes=["7"])
    ends, _ = pipe.generate(n=1, seed=3, classes=["7"])
    last, _ = pipe.generate(n=1, seed=9, classes=["7"])
    assert frames.shape[0] == 5
    assert np.abs(frames[0].astype(int) - ends[0]).max() <= 1 and np.abs(frames[-1].astype(int) - last[0]).max() <= 1
    with pytest.raises(UserError, match="unknown class '11'"):
        pipe.generate(n=1, classes=["11"])
    with pytest.raises(UserError, match="class-conditional"):
        pipe.generate(n=1, captions=["a digit"])


def test_bad_configs_and_runs(tmp_path, tiny_shapes, tiny_digits):
    with pytest.raises(UserError, match="condition=caption needs a dataset with captions"):
        prepare_run(load_config(ImageTrainConfig, TINY, {"data": {"path": str(tiny_digits)}, "model": {"condition": "caption"}}), tmp_path / "r")
    with pytest.raises(UserError, match="model.kind"):
        load_config(ImageTrainConfig, TINY, {"model": {"kind": "gan"}})
    with pytest.raises(UserError, match="no training data"):
        prepare_run(load_config(ImageTrainConfig, TINY), tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="not an image run"):
        ImagePipeline.from_run(tmp_path)
    run = tmp_path / "ok"
    cfg = _cfg(tiny_shapes, "vae", max_steps=2)
    prepare_run(cfg, run)
    train(cfg, run)
    meta = json.loads((run / "model/aigc_image.json").read_text())
    assert meta["kind"] == "vae" and meta["condition"] == "caption" and "circle" in meta["vocab"]
    with pytest.raises(UserError, match="never saw these caption words: hexagon"):
        ImagePipeline.from_run(run).generate(n=1, captions=["a small red hexagon at top left"])
