"""The run directory module and the atomic writes of data/store.py."""
import json
import os
import time

import pytest

from aigc import run
from aigc.data import store
from aigc.errors import UserError


def test_kind_model_folder_and_fingerprint(tmp_path):
    r = tmp_path / "r"
    assert run.detect_kind(r) is None
    with pytest.raises(UserError, match="not a trained run"):
        run.require_kind(r)
    (r / "model").mkdir(parents=True)
    run.ImageMeta(kind="vae", size=8, channels=1, condition="class", classes=["a"]).save(r / "model")
    (r / "model" / "vae.safetensors").write_bytes(b"weights")
    assert run.model_folder(r) == r / "model" and run.model_folder(r / "model") == r / "model"
    assert run.detect_kind(r) == run.IMAGE and run.detect_kind(r / "model") == run.IMAGE
    meta = run.ImageMeta.load(r)
    assert meta.classes == ["a"] and run.ImageMeta.load(r / "model") == meta
    fp = run.fingerprint(r)
    assert len(fp.version) == 12 and fp.size_bytes > len(b"weights") and fp.version == run.fingerprint(r).version
    time.sleep(0.01)
    (r / "model" / "vae.safetensors").write_bytes(b"retrained")
    os.utime(r / "model" / "vae.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run.fingerprint(r).version != fp.version  # retraining changes the version


def test_music_before_text_and_clear_meta_errors(tmp_path):
    m = tmp_path / "m" / "model"
    m.mkdir(parents=True)
    (m / "config.json").write_text("{}")
    assert run.detect_kind(m.parent) == run.TEXT
    run.MusicMeta(voices=["S", "A"], tempo=80).save(m)
    assert run.detect_kind(m.parent) == run.MUSIC  # a music model is also an HF folder
    assert run.MusicMeta.load(m.parent).tempo == 80
    with pytest.raises(UserError, match="not an image run .*aigc train image"):
        run.ImageMeta.load(m.parent)


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with store.atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(UserError, match="--overwrite"):
        with store.atomic_folder(out):
            pass
    with pytest.raises(RuntimeError):
        with store.atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("crash half-way")
    assert (out / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with store.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert [p.name for p in out.iterdir()] == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_manifests_name_their_kind(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Opts:
        seed: int = 1

    with store.atomic_folder(tmp_path / "d") as tmp:
        (tmp / "train.jsonl").write_text("x\n")
        m = store.write_manifest(tmp, store.manifest("music", time.time(), Opts()), ("train.jsonl",))
    assert m["kind"] == "music" and m["options"] == {"seed": 1} and len(m["files"]["train.jsonl"]) == 64
    assert store.read_manifest(tmp_path / "d", "music") == json.loads((tmp_path / "d" / "manifest.json").read_text())
    with pytest.raises(UserError, match="a prepared music dataset, not an image one"):
        store.read_manifest(tmp_path / "d", "image")
    with pytest.raises(UserError, match="run `aigc data prepare --kind image` first"):
        store.read_manifest(tmp_path / "nothing", "image")
    with pytest.raises(UserError, match="not a prepared corpus .*`aigc data prepare` first"):
        store.read_manifest(tmp_path / "nothing", "text")
