import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigc.data import shapes
from aigc.data.images import ImagePrepareOptions, load_prepared, prepare
from aigc.errors import UserError


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_checker_reads_back_every_attribute(size):
    images, specs = shapes.generate(480, size, seed=7)  # every combination twice
    assert len({s for s in specs}) == len(shapes.all_specs()) == 240
    for img, spec in zip(images, specs):
        assert shapes.check(img) == spec.as_dict()


def test_shapes_captions_round_trip_and_checker_rejects_blank():
    for spec in shapes.all_specs():
        assert shapes.parse_caption(spec.caption) == spec
    assert shapes.parse_caption("a small red circle") is None  # no position
    assert shapes.parse_caption("a big cat at top left") is None
    assert shapes.check(np.zeros((32, 32, 3), np.uint8)) is None


def _png(colour, size=(20, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_folder_with_classes_captions_and_bad_files(tmp_path):
    root = tmp_path / "imgs"
    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.png").write_bytes(_png(colour))
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 255, 0)).save(jpeg, format="JPEG")
    (root / "red" / "ok.jpg").write_bytes(jpeg.getvalue())
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "red" / "broken.png").write_bytes(_png((1, 2, 3))[:60])  # truncated
    (root / "blue" / "text.webp").write_bytes(b"not an image at all")
    (root / "blue" / "huge.png").write_bytes(_png((0, 0, 0), size=(300, 300)))
    captions = [{"file": f"{c}/{i}.png", "caption": f"a {c} square"} for c in ("red", "blue") for i in range(5)]
    captions += [{"file": "red/ok.jpg", "caption": "green"}] + [{"file": f, "caption": "x"} for f in
                                                                   ("red/empty.png", "red/broken.png", "blue/text.webp", "blue/huge.png")]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    out = tmp_path / "prepared"
    m = prepare([root], out, ImagePrepareOptions(size=8, max_pixels=200 * 200, val_fraction=0.2))
    assert m["images"]["skipped"] == 4 and m["images"]["train"] + m["images"]["val"] == 11
    reasons = {Path(s["file"]).name: s["reason"] for s in m["skipped"]}
    assert reasons["empty.png"] == "empty file"
    assert reasons["huge.png"].startswith("oversized image")
    assert reasons["broken.png"].startswith("unreadable") and reasons["text.webp"].startswith("unreadable")
    assert m["classes"] == ["blue", "red"] and m["captions"] is True
    train, val, _ = load_prepared(out)
    assert train.images.shape[1:] == (8, 8, 3) and train.images.dtype == np.uint8
    for split in (train, val):
        for img, label, rec in zip(split.images, split.labels, split.records):
            colour = {"red": [255, 0, 0], "blue": [0, 0, 255]}.get(rec["class"])
            assert m["classes"][label] == rec["class"]
            if rec["source"].endswith("ok.jpg"):
                assert img[4, 4, 1] > 200 and rec["caption"] == "green"
            else:
                assert np.abs(img[4, 4].astype(int) - colour).max() <= 2


def test_prepare_errors_leave_nothing_behind(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "b.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(UserError, match="no usable images: 2 skipped"):
        prepare([root], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="no such file"):
        prepare([tmp_path / "missing"], tmp_path / "out")
    good = tmp_path / "good"
    (good / "cats").mkdir(parents=True)
    (good / "cats" / "1.png").write_bytes(_png((9, 9, 9)))
    (good / "captions.jsonl").write_text('{"file": "cats/2.png", "caption": "x"}\n')
    with pytest.raises(UserError, match="captions for files that are not there: cats/2.png"):
        prepare([good], tmp_path / "out")
    (good / "captions.jsonl").write_text('{"file": "cats/1.png"}\n')
    with pytest.raises(UserError, match=r"captions.jsonl:1: each line needs"):
        prepare([good], tmp_path / "out")
    (good / "captions.jsonl").unlink()
    (good / "root.png").write_bytes(_png((9, 9, 9)))
    with pytest.raises(UserError, match="no class"):
        prepare([good], tmp_path / "out")
    with pytest.raises(UserError, match="multiple of 4"):
        prepare([], tmp_path / "out", ImagePrepareOptions(size=10), builtin=["digits"])


def test_builtin_digits_and_shapes(tmp_path):
    m = prepare([], tmp_path / "d", ImagePrepareOptions(size=16, mode="gray"), builtin=["digits"])
    train, val, _ = load_prepared(tmp_path / "d")
    assert m["images"]["read"] == 1797 and len(train.images) + len(val.images) == 1797
    assert train.images.shape[1:] == (16, 16, 1) and m["classes"] == [str(i) for i in range(10)]
    assert sorted(set(train.labels.tolist())) == list(range(10))
    m = prepare([], tmp_path / "s", ImagePrepareOptions(size=32, count=300), builtin=["shapes"])
    train, val, _ = load_prepared(tmp_path / "s")
    assert m["captions"] and m["attributes"] == ["colour", "position", "shape", "size"]
    rec = train.records[0]
    assert shapes.check(train.images[0]) == rec["attributes"] and shapes.parse_caption(rec["caption"]).as_dict() == rec["attributes"]
    again = prepare([], tmp_path / "s2", ImagePrepareOptions(size=32, count=300), builtin=["shapes"])
    assert again["files"] == m["files"]  # seeded: the same bytes every time
    with pytest.raises(UserError, match="already exists"):
        prepare([], tmp_path / "s", ImagePrepareOptions(size=32, count=10), builtin=["shapes"])
