"""The inaudible audio watermark: the 32-bit id read back after MP3, AAC, resampling and noise, nothing read from
unmarked audio or with another key, and the delivery and verification paths around it."""
import numpy as np
import pytest

from aigc.data import audio as aio
from aigc.errors import UserError
from aigc.govern import audio_watermark as aw

KEY = b"k" * 32
WM = 0xC0FFEE42


def notes(seconds: float = 7.0, rate: int = 44100, seed: int = 0) -> np.ndarray:
    """Music-like stereo audio: overlapping harmonic notes with decaying envelopes."""
    r = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = np.zeros((len(t), 2), np.float32)
    pos = 0.0
    while pos < seconds:
        d, f0 = r.uniform(0.15, 0.6), 110 * 2 ** (r.integers(0, 36) / 12)
        i0, i1 = int(pos * rate), int(min(seconds, pos + d) * rate)
        tt = t[i0:i1] - pos
        s = sum(np.sin(2 * np.pi * f0 * h * tt) / h for h in range(1, 8) if f0 * h < 10000)
        out[i0:i1] += (0.16 * np.exp(-3 * tt) * np.minimum(1, tt * 200) * s)[:, None]
        pos += d * r.uniform(0.5, 1.0)
    return out


@pytest.fixture(scope="module")
def marked():
    audio = notes()
    return audio, aw.embed(audio, 44100, WM, KEY)


def test_the_mark_is_inaudible_by_its_snr_and_reads_back_exactly(marked):
    audio, y = marked
    assert y.shape == audio.shape and y.dtype == audio.dtype
    assert aw.snr_db(audio, y) >= 35  # the mark is at least 35 dB under the music
    got = aw.extract(y, 44100, KEY)
    assert got.found and got.watermark_id == WM and got.offset_ms == 0 and got.fit > aw.FIT_MIN
    assert aw.bit_accuracy(y, 44100, WM, KEY) == 1.0


@pytest.mark.parametrize("attack", ["mp3", "m4a", "resample16k", "noise30db"])
def test_the_mark_survives_codecs_resampling_and_noise(marked, attack):
    _, y = marked
    if attack in ("mp3", "m4a"):
        data = aio.encode(y, 44100, attack, bitrate=128_000)
        assert len(data) < len(aio.write_wav(y, 44100)) / 5  # really compressed
        a, rate = aio.decode(data)
    elif attack == "resample16k":
        a, rate = aw._resample(aw._resample(y.astype(np.float64), 44100, 16000), 16000, 44100).astype(np.float32), 44100
    else:
        noise = np.random.default_rng(1).normal(0, np.sqrt(np.mean(y.astype(np.float64) ** 2) / 1000), y.shape)
        a, rate = (y + noise).astype(np.float32), 44100
    got = aw.extract(a, rate, KEY)
    assert got.found and got.watermark_id == WM, got
    assert aw.bit_accuracy(a, rate, WM, KEY) >= 0.95


def test_unmarked_audio_or_another_key_reads_nothing(marked):
    _, y = marked
    assert not aw.extract(y, 44100, b"another key, another server.....").found
    for seed in range(1, 6):
        clip = notes(6.0, seed=seed)
        got = aw.extract(clip, 44100, KEY)
        assert not got.found and got.watermark_id is None and got.fit < aw.FIT_MIN


def test_short_or_low_rate_audio_is_refused_with_a_reason():
    with pytest.raises(UserError, match=f"at least {aw.MIN_SECONDS:.1f} s"):
        aw.embed(notes(2.0), 44100, WM, KEY)  # under MIN_SECONDS (2.8 s)
    with pytest.raises(UserError, match="16000 Hz"):
        aw.embed(notes(6.0, rate=8000), 8000, WM, KEY)


def test_audio_files_round_trip_through_every_format():
    audio = notes(1.0)
    for fmt in ("wav", "flac", "mp3", "m4a"):
        back, rate = aio.decode(aio.encode(audio, 44100, fmt))
        assert rate == 44100 and back.shape[1] == 2 and abs(len(back) - len(audio)) < 4096
    with pytest.raises(UserError, match="unknown audio format"):
        aio.encode(audio, 44100, "ogg-vorbis")
    with pytest.raises(UserError, match="not a readable audio file"):
        aio.decode(b"certainly not audio" * 10)


def test_delivery_marks_a_wav_and_verification_reads_it_after_mp3(tmp_path):
    from aigc.govern import delivery, records
    from aigc.govern.c2pa import Provenance

    prov = Provenance.from_home(tmp_path)
    wav = aio.write_wav(notes(), 44100)
    done = delivery.finish(wav, delivery.WAV, watermark=True, audio_key=KEY, provenance=prov,
                           claim=delivery.Claim("a.wav", "chorales", "v1"))
    assert done.watermark_id is not None and done.filters == ["watermark:audio:stdm", "c2pa"]
    report = records.verify_file(done.data, prov.trust_anchors, audio_key=KEY)
    assert report["c2pa"]["state"] == "Trusted" and report["audio_watermark"]["watermark_id"] == done.watermark_id
    assert report["c2pa"]["manifest"]  # the manifest names the mark
    a, rate = aio.read_wav(done.data)
    mp3 = aio.encode(a, rate, "mp3")  # re-encoded: the signature is gone, the mark is not
    report = records.verify_file(mp3, prov.trust_anchors, audio_key=KEY)
    assert report["kind"] == "audio/mpeg" and report["audio_watermark"]["found"]
    assert report["audio_watermark"]["watermark_id"] == done.watermark_id
    assert "reason" in records.verify_file(mp3, prov.trust_anchors)["audio_watermark"]  # without the key: says why
    short = delivery.finish(aio.write_wav(notes(2.0), 44100), delivery.WAV, watermark=True, audio_key=KEY)
    assert short.watermark_id is None and short.filters == []  # too short to carry it: delivered unmarked
