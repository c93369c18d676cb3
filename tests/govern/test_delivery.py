"""The one delivery path: PNG, JPEG, WAV and MP4 watermarked, described, signed and written atomically."""
import io

import numpy as np
import pytest
from PIL import Image

from aigc.errors import UserError
from aigc.govern import delivery, image_watermark
from aigc.govern.c2pa import Provenance
from aigc.govern.delivery import Claim, finish
from tests.govern.test_c2pa import wav_bytes


@pytest.fixture(scope="module")
def prov(tmp_path_factory):
    return Provenance.from_home(tmp_path_factory.mktemp("home"))


def picture(side=256):
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, side, dtype=np.float32)
    img = np.stack([np.add.outer(base, base) / 2, np.tile(base, (side, 1)), np.tile(base[:, None], (1, side))], -1)
    return Image.fromarray(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("mime", [delivery.PNG, delivery.JPEG])
def test_images_are_marked_described_and_signed_in_that_order(prov, mime, tmp_path):
    done = finish(picture(), mime, watermark=True, parameters="a circle\nSeed: 3, Model: shapes", provenance=prov,
                  claim=Claim("x" + delivery.SUFFIX[mime], "shapes", "v1", {"seed": 3}), watermark_id=12345)
    assert done.mime == mime and done.watermark_id == 12345 and done.signed
    assert done.filters == ["watermark:image:dwtDctSvd", "metadata:parameters", "c2pa"]
    with Image.open(io.BytesIO(done.data)) as img:
        assert img.format == ("PNG" if mime == delivery.PNG else "JPEG")
        found = image_watermark.extract(img.convert("RGB"))
    assert found.found and found.watermark_id == 12345
    assert delivery.read_parameters(done.data) == "a circle\nSeed: 3, Model: shapes"
    verdict = prov.verify(done.data)
    assert verdict.state == "Trusted", verdict.reason
    assert verdict.manifest["model"] == "shapes" and verdict.manifest["watermark"] == "invisible (dwtDctSvd)"
    path = done.save(tmp_path / "out" / "x.img")
    assert path.read_bytes() == done.data and [p.name for p in path.parent.iterdir()] == ["x.img"]  # no temp file left


def test_small_images_and_policy_off(prov):
    done = finish(picture(64), delivery.PNG, watermark=True, parameters=None)
    assert done.watermark_id is None and done.filters == [] and not done.signed
    assert delivery.read_parameters(done.data) is None


def test_wav_is_signed_only(prov):
    done = finish(wav_bytes(), delivery.WAV, provenance=prov, claim=Claim("a.wav", "chorales", "v2", {"midi_sha256": "ab"}))
    assert done.filters == ["c2pa"] and done.watermark_id is None
    v = prov.verify(done.data)
    assert v.state == "Trusted" and v.manifest["model_version"] == "v2" and v.manifest["midi_sha256"] == "ab"


def test_mp4_records_the_frames_mark_and_is_signed(prov):
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=4)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(4):
            for packet in s.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, np.uint8), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    done = finish(buf.getvalue(), delivery.MP4, watermark_id=99, provenance=prov, claim=Claim("v.mp4", "shapes", "v1"))
    assert done.watermark_id == 99 and done.filters == ["watermark:image:dwtDctSvd", "c2pa"]
    assert prov.verify(done.data).state == "Trusted"
    assert delivery.first_frame(done.data).size == (64, 64)


def test_bad_input_is_a_clear_error():
    with pytest.raises(UserError, match="cannot deliver 'image/gif'"):
        finish(picture(), "image/gif")
    with pytest.raises(TypeError, match="bytes"):
        finish(picture(), delivery.WAV)
