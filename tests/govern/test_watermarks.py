"""Text and image watermarks: embedding, detection, keys, robustness and bad input."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from aigc.data import shapes
from aigc.errors import UserError
from aigc.generate.image import to_pil, upscale
from aigc.generate.text import SamplingParams, TextGenerator
from aigc.govern import image_watermark as iw
from aigc.govern import records
from aigc.govern import text_watermark as tw


def test_green_lists_cover_gamma_and_depend_on_key_and_context():
    keys = torch.tensor([1, 1, 2])
    ctx = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 8]])
    mask = tw.green_mask(keys, ctx, 5000)
    assert abs(mask.float().mean().item() - tw.GAMMA) < 0.02
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[0], mask[2])
    # detection recomputes exactly the generation-time split
    green_tok = int(mask[0].nonzero()[0])
    red_tok = int((~mask[0]).nonzero()[0])
    k = tw.context_width(5000)
    assert k == 1 and tw.context_width(80) == 4
    assert tw.detect([8, green_tok], 1, 5000).green == 1 and tw.detect([8, red_tok], 1, 5000).green == 0


def test_detect_random_text_is_not_flagged_and_short_input_is_safe():
    rng = np.random.default_rng(0)
    zs = [tw.detect(rng.integers(0, 80, 300).tolist(), 1234 + i, 80).z for i in range(200)]
    assert abs(np.mean(zs)) < 0.4 and max(zs) < tw.Z_THRESHOLD
    for ids in ([], [3], [1, 2, 3, 4]):  # truncated text: nothing to score, no crash
        d = tw.detect(ids, 1, 80)
        assert d.scored == 0 and not d.detected and d.z == 0.0


def test_generation_carries_the_key_and_only_that_key(spread_model):
    gen = TextGenerator.from_path(spread_model)
    mark = tw.Watermark(tw.tenant_key(b"s" * 32, 7))
    other = tw.tenant_key(b"s" * 32, 8)
    assert mark.key != other
    outs = gen.generate(["The "], SamplingParams(max_new_tokens=200, temperature=1.0, seed=3, n=3, ignore_eos=True, watermark=mark))
    plain = gen.generate(["The "], SamplingParams(max_new_tokens=200, temperature=1.0, seed=3, n=3, ignore_eos=True))
    for o, p in zip(outs, plain):
        assert tw.detect_text(o.text, gen.tokenizer, mark.key).detected
        assert tw.detect_text(o.text, gen.tokenizer, other).z < tw.Z_THRESHOLD
        assert tw.detect_text(p.text, gen.tokenizer, mark.key).z < tw.Z_THRESHOLD


def _shape(side: int) -> Image.Image:
    imgs, _ = shapes.generate(1, 32, seed=5)
    return to_pil(upscale(imgs[0], side))


def test_image_payload_survives_jpeg_and_resize():
    img = _shape(256)
    marked = iw.embed(img, 0xC0FFEE)
    psnr = 10 * np.log10(255**2 / ((np.asarray(marked, float) - np.asarray(img, float)) ** 2).mean())
    assert psnr > 30
    buf = io.BytesIO()
    marked.save(buf, "JPEG", quality=75)
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    small = marked.resize((128, 128), Image.Resampling.BILINEAR).resize((256, 256), Image.Resampling.BILINEAR)
    for v in (marked, jpeg, small):
        got = iw.extract(v)
        assert got.found and got.watermark_id == 0xC0FFEE
    assert not iw.extract(img).found


def test_error_correction_repairs_flipped_bits_and_crc_rejects_garbage():
    bits = iw.encode_payload(123456789).astype(float)
    soft = bits.copy()
    soft[[0, 13, 40, 77]] = 1 - soft[[0, 13, 40, 77]]  # four flipped bits in four different codewords
    got = iw.decode_payload(soft)
    assert got.found and got.watermark_id == 123456789 and got.corrected_bits == 4
    rng = np.random.default_rng(1)
    assert sum(iw.decode_payload(rng.random(iw.CODED_BITS)).found for _ in range(300)) <= 2


def test_image_watermark_bad_input():
    with pytest.raises(UserError, match="at least 256x256"):
        iw.embed(_shape(128), 1)
    assert "not a readable image" in records.check_image_mark(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)["reason"]
    buf = io.BytesIO()
    _shape(64).save(buf, "PNG")
    assert "carry no watermark" in records.check_image_mark(buf.getvalue())["reason"]
