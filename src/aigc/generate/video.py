"""Storyboard-to-video composition: text model -> scenes, image model -> frames, music model -> soundtrack.

1. **Storyboard**: the text run continues the prompt once per scene (one line each, seeded per scene);
   or the scenes are given, or written in the prompt ("a red circle; then a blue square"). Each scene is mapped to a condition the image model knows: a class named
   in the scene text (else one chosen by the seed), or the training caption sharing most words with
   it. The mapping and its reason are written down.
2. **Key frames**: scene i is rendered from latent seed + i under its condition.
3. **In-between frames**: each scene holds its key frame while drifting slightly (a small spherical
   step towards a second latent), then morphs into the next scene: the latents are interpolated
   spherically and the condition vectors linearly, and every frame is decoded by the image model
   (for diffusion, with the deterministic DDIM sampler, so neighbouring frames stay coherent).
4. **Soundtrack**: the music run generates enough bars for the duration at the tempo; it is rendered
   to 44.1 kHz stereo, cut to length with a fade-out. A voice-over (``voice``) speaks each scene's line from the
   start of its scene (``generate.speech``), the music lowered while it speaks. The track as delivered carries the
   frames' watermark id as an inaudible audio mark (when ``audio_key`` is given).
5. **Mux**: PyAV (bundled FFmpeg) encodes H.264 + AAC into MP4. Captions are optionally burned in.
   Frames of 256 px or more carry the invisible image watermark; the MP4 is C2PA-signed by the
   caller. The default yuv420p plays everywhere, but its 4:2:0 chroma often erases the frame
   watermark on saturated, flat frames; ``chroma="444"`` keeps it readable (fewer players).

Everything is kept in the output folder: ``storyboard.json`` (scenes, conditions, reasons),
``keyframes/scene-NN.png``, ``soundtrack.mid``, ``soundtrack.wav``, ``voiceover.wav``, ``params.json`` (what
re-makes it) and ``video.mp4``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from aigc.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class VideoParams:
    prompt: str = ""
    scenes: int = 3
    scene_texts: list[str] = field(default_factory=list)  # given storyboard (overrides the text model)
    seconds: float = 6.0
    fps: int = 12
    size: int = 256  # square frames, size x size pixels
    captions: bool = False  # burn the scene text into the frames
    seed: int = 0
    steps: int | None = None  # diffusion denoising steps (default: the image run's)
    guidance: float | None = None
    hold: float = 0.5  # share of each scene spent on its key frame before morphing to the next
    key: str | None = None  # soundtrack key ("D minor")
    tempo: int | None = None  # soundtrack tempo
    synth: str = "auto"
    watermark: bool = True
    # "420" (yuv420p) plays everywhere; "444" (yuv444p, High 4:4:4) keeps the frames' invisible watermark
    # readable after encoding, which 4:2:0 chroma often erases on saturated, flat frames (measured).
    chroma: str = "420"
    scene_tokens: int = 48  # text model tokens per scene line
    voice: str = ""  # a voice-over of the scene lines with this voice (generate.speech; "auto": by language); "": none
    voice_speed: float = 1.0
    device: str = "cpu"  # where the image, text and music models compute (cpu, cuda, cuda:N, mps, auto)

    def validate(self) -> None:
        if not 1 <= self.scenes <= 32:
            raise UserError(f"scenes must be between 1 and 32, got {self.scenes}")
        if not 0.5 <= self.seconds <= 600:
            raise UserError(f"seconds must be between 0.5 and 600, got {self.seconds}")
        if not 1 <= self.fps <= 60:
            raise UserError(f"fps must be between 1 and 60, got {self.fps}")
        if not 16 <= self.size <= 1024 or self.size % 2:
            raise UserError(f"size must be an even number of pixels between 16 and 1024, got {self.size}")
        if self.chroma not in ("420", "444"):
            raise UserError(f"chroma must be 420 or 444, got {self.chroma!r}")
        if not 0.25 <= self.voice_speed <= 4.0:
            raise UserError(f"voice_speed must be between 0.25 and 4.0, got {self.voice_speed}")
        if not 0.0 <= self.hold <= 1.0:
            raise UserError(f"hold must be in [0, 1], got {self.hold}")
        if self.scene_texts and len(self.scene_texts) != self.scenes:
            self.scenes = len(self.scene_texts)
        if self.frames < self.scenes:
            raise UserError(f"{self.frames} frames cannot show {self.scenes} scenes: raise seconds or fps")

    @property
    def frames(self) -> int:
        return max(1, round(self.seconds * self.fps))


@dataclass
class Scene:
    index: int
    text: str
    condition: str  # class name, caption or "" (unconditional)
    reason: str
    seed: int
    start_s: float
    end_s: float


@dataclass
class VideoResult:
    folder: Path
    mp4: bytes
    storyboard: list[Scene]
    frames: int
    seconds: float
    audio: bool
    watermark_id: int | None
    timings: dict
    audio_marked: bool = False  # the soundtrack carries watermark_id too (an audio mark)


# ---------------------------------------------------------------- storyboard

def write_storyboard(prompt: str, scenes: int, text_run: str | Path | None, seed: int, tokens: int = 48,
                     device: str = "cpu") -> list[str]:
    """One line of text per scene: the text model continuing the prompt, or the prompt itself."""
    if text_run is None:
        if not prompt:
            raise UserError("no storyboard: give a prompt, --scene texts, or a --text-run to write one")
        parts = split_prompt(prompt)
        return parts if len(parts) > 1 else [prompt] * scenes
    from aigc.generate.text import SamplingParams, TextGenerator

    gen = TextGenerator.from_path(text_run, device=device)
    lines = []
    for i in range(scenes):
        head = f"{prompt}\n" if prompt else ""
        out = gen.generate([head], SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=seed + i, stop=["\n"]))[0].text
        line = " ".join(out.split()).strip()
        lines.append(line or prompt)
    return lines


def _words(text: str) -> set[str]:
    from aigc.models.conditioning import words

    return set(words(text))


def split_prompt(prompt: str) -> list[str]:
    """Scenes written in the prompt itself: parts separated by ';', new lines or ' then '."""
    import re

    parts = [p.strip(" ,.") for p in re.split(r"[;\n]|\bthen\b|然后|；", prompt)]
    return [p for p in parts if p]


def choose_condition(meta, text: str, prompt: str, seed: int) -> tuple[str, str]:
    """(condition, reason) for a scene: what the image model will draw for it."""
    if meta.condition == "none":
        return "", "unconditional image model"
    scene_words, prompt_words = _words(text), _words(prompt)
    pick = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest(), 16)
    if meta.condition == "class":
        for where, ws in (("scene text", scene_words), ("prompt", prompt_words)):
            named = [c for c in meta.classes if c.lower() in ws]
            if named:
                return named[pick % len(named)], f"class named in the {where}"
        return meta.classes[pick % len(meta.classes)], "no class named in the scene or prompt: chosen by the seed"
    # Nearest training caption: shared scene words weighted by rarity (idf); the prompt's words only break ties.
    captions = [(c, _words(c)) for c in meta.prompts]
    df: dict[str, int] = {}
    for _, ws in captions:
        for w in ws:
            df[w] = df.get(w, 0) + 1
    idf = {w: math.log(len(captions) / d) for w, d in df.items()}
    scores = [((round(sum(idf[w] for w in ws & scene_words), 9), round(sum(idf[w] for w in ws & prompt_words), 9)), c)
              for c, ws in captions]
    top = max(sc for sc, _ in scores)
    if top > (0, 0):
        best = [c for sc, c in scores if sc == top]
        choice = best[pick % len(best)]
        shared = sorted(_words(choice) & (scene_words if top[0] > 0 else prompt_words))
        return choice, f"nearest training caption (shares: {', '.join(shared)})"
    return meta.prompts[pick % len(meta.prompts)], "no caption word in the scene: a training caption chosen by the seed"


# ---------------------------------------------------------------- frames

def frame_plan(n_frames: int, n_scenes: int, hold: float) -> list[tuple[int, float, float]]:
    """Per frame: (scene, drift in [0, 1] within the hold, morph weight towards scene + 1 in [0, 1])."""
    plan = []
    bounds = [round(i * n_frames / n_scenes) for i in range(n_scenes + 1)]
    for s in range(n_scenes):
        length = bounds[s + 1] - bounds[s]
        last = s == n_scenes - 1
        held = length if last else max(1, round(length * hold))
        for j in range(length):
            if j < held:
                plan.append((s, j / max(1, held - 1) if held > 1 else 0.0, 0.0))
            else:
                plan.append((s, 1.0, (j - held + 1) / (length - held + 1)))
    return plan


def render_frames(pipe, conds: list, seeds: list[int], plan, steps=None, guidance=None, batch: int = 32) -> np.ndarray:
    """Decode every frame of the plan: (F, H, W, C) uint8."""
    from aigc.generate.image import slerp, to_uint8

    keys = pipe.latents(seeds)
    drifts = pipe.latents([s + 7919 for s in seeds])  # a second draw per scene, for slow motion within it
    vectors = [pipe.condition_vectors(c) for c in conds]
    zs, cs = [], []
    for scene, drift, morph in plan:
        z_here = slerp(keys[scene], drifts[scene], 0.12 * drift)
        c_here = vectors[scene]
        if morph > 0 and scene + 1 < len(seeds):
            z_next = keys[scene + 1]
            z_here = slerp(z_here, z_next, morph)
            if c_here is not None:
                c_here = (1 - morph) * c_here + morph * vectors[scene + 1]
        zs.append(z_here)
        cs.append(c_here)
    out = []
    for start in range(0, len(zs), batch):
        z = torch.stack(zs[start: start + batch])
        c = None if cs[0] is None else torch.cat(cs[start: start + batch])
        out.append(to_uint8(pipe.decode_vectors(z, c, steps, guidance)))
    return np.concatenate(out)


def burn_caption(image: np.ndarray, text: str) -> np.ndarray:
    """Draw ``text`` on a dark band at the bottom of an (H, W, 3) uint8 frame."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(image)
    h, w = image.shape[:2]
    font = ImageFont.load_default(size=max(10, h // 18))
    draw = ImageDraw.Draw(img, "RGBA")
    text = text if len(text) <= 60 else text[:57] + "..."
    box = draw.textbbox((0, 0), text, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    pad = max(4, h // 64)
    draw.rectangle([0, h - th - 3 * pad, w, h], fill=(0, 0, 0, 150))
    draw.text(((w - tw) // 2, h - th - 2 * pad), text, font=font, fill=(255, 255, 255, 255))
    return np.asarray(img)


# ---------------------------------------------------------------- audio and muxing

def voiceover(scenes: list[Scene], voice: str, speed: float, seconds: float, sample_rate: int,
              voices_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """Each scene's line spoken from the start of its scene: (samples, 2) at ``sample_rate``, and the voice used.
    A line longer than its scene runs on over the next (it is never cut or sped up)."""
    from scipy.signal import resample_poly

    from aigc.generate.speech import Speaker

    speaker = Speaker(voices_dir)
    out = np.zeros((int(round(seconds * sample_rate)), 2), dtype=np.float32)
    used = ""
    for scene in scenes:
        if not scene.text.strip():
            continue
        audio, rate, v = speaker.speak(scene.text, voice, speed)
        used = v.name
        if rate != sample_rate:
            audio = resample_poly(audio, sample_rate, rate, axis=0).astype(np.float32)
        start = int(scene.start_s * sample_rate)
        n = max(0, min(len(audio), len(out) - start))
        out[start:start + n] += audio[:n]  # mono voice in both channels
    return out, used


def mix_voice(music: np.ndarray | None, voice: np.ndarray, sample_rate: int, duck: float = 0.3) -> np.ndarray:
    """The voice over the music, the music lowered to ``duck`` while the voice speaks (with 150 ms ramps)."""
    if music is None:
        return np.clip(voice, -1, 1)
    active = (np.abs(voice).max(1) > 1e-3).astype(np.float32)
    ramp = max(1, int(0.15 * sample_rate))
    active = np.convolve(active, np.ones(ramp, dtype=np.float32) / ramp, mode="same").clip(0, 1)
    gain = 1.0 - (1.0 - duck) * active
    return np.clip(music * gain[:, None] + voice, -1, 1).astype(np.float32)


def fit_audio(audio: np.ndarray, seconds: float, sample_rate: int, fade_s: float = 0.5) -> np.ndarray:
    """Cut or pad (samples, 2) audio to ``seconds``, fading out the last ``fade_s``."""
    n = int(round(seconds * sample_rate))
    out = np.zeros((n, audio.shape[1]), dtype=np.float32)
    out[: min(n, len(audio))] = audio[:n]
    f = min(n, int(fade_s * sample_rate))
    if f:
        out[n - f:] *= np.linspace(1.0, 0.0, f, dtype=np.float32)[:, None]
    return out


def mux_mp4(frames: np.ndarray, fps: int, audio: np.ndarray | None, sample_rate: int = 44100, crf: int = 20,
            chroma: str = "420") -> bytes:
    """H.264 (yuv420p) + AAC in MP4, returned as bytes. frames: (F, H, W, 3) uint8; audio: (samples, 2) float."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv444p" if chroma == "444" else "yuv420p"
        video.options = {"crf": str(crf), "preset": "medium"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate, layout="stereo")
            astream.bit_rate = 192_000  # the soundtrack's audio watermark reads back whole at this rate (not always at 128k)
        chunk, a_pos = 1024, 0
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1, fps)
            for packet in video.encode(vf):
                container.mux(packet)
            if astream is not None:  # keep the audio up to this frame's time, so the file interleaves
                until = min(len(audio), int((i + 1) / fps * sample_rate))
                a_pos = _push_audio(container, astream, audio, a_pos, until, chunk, sample_rate)
        for packet in video.encode():
            container.mux(packet)
        if astream is not None:
            _push_audio(container, astream, audio, a_pos, len(audio), chunk, sample_rate)
            for packet in astream.encode():
                container.mux(packet)
    return buf.getvalue()


def _push_audio(container, stream, audio: np.ndarray, pos: int, until: int, chunk: int, sample_rate: int) -> int:
    import av

    while pos + chunk <= until or (until == len(audio) and pos < until):
        part = audio[pos: pos + chunk]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(part.T.astype(np.float32)), format="fltp", layout="stereo")
        frame.sample_rate = sample_rate
        frame.pts = pos
        frame.time_base = Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        pos += len(part)
    return pos


def probe_mp4(data: bytes) -> dict:
    """Streams of an MP4: codec, size, frames, duration (for tests, the CLI and verification)."""
    import io

    import av

    info = {}
    with av.open(io.BytesIO(data)) as c:
        for s in c.streams:
            entry = {"codec": s.codec_context.name}
            if s.type == "video":
                entry.update(width=s.codec_context.width, height=s.codec_context.height, fps=float(s.average_rate or 0))
            if s.type == "audio":
                entry.update(sample_rate=s.codec_context.sample_rate, channels=s.codec_context.channels)
            info[s.type] = entry
        frames = 0
        for frame in c.decode(video=0):
            frames += 1
            last_time = frame.time
        info["video"]["frames"] = frames
        info["video"]["last_frame_s"] = round(float(last_time or 0), 3)
        info["duration_s"] = round(c.duration / 1e6, 3) if c.duration else None
    return info


# ---------------------------------------------------------------- the pipeline

def compose(image_run: str | Path, out_dir: str | Path, params: VideoParams, text_run: str | Path | None = None,
            music_run: str | Path | None = None, watermark_id: int | None = None, overwrite: bool = False,
            audio_key: bytes | None = None, voices_dir: Path | None = None) -> VideoResult:
    """Make the video and every intermediate in ``out_dir``; returns the (unsigned) MP4 bytes and the storyboard.
    With the watermark on, the frames carry a 32-bit id, and so does the soundtrack when ``audio_key`` (the server's
    audio-watermark secret) is given and it is long enough."""
    import secrets

    from aigc.generate.image import ImagePipeline, to_pil, upscale
    from aigc.govern import audio_watermark, image_watermark

    params.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    from aigc import devices

    device = devices.resolve(params.device)
    pipe = ImagePipeline.from_run(image_run, device=device)
    if pipe.meta.channels not in (1, 3):
        raise UserError(f"{image_run}: images with {pipe.meta.channels} channels cannot be encoded as video")
    texts = list(params.scene_texts) or write_storyboard(params.prompt, params.scenes, text_run, params.seed, params.scene_tokens, device)
    timings["storyboard_s"] = time.perf_counter() - t0
    n = len(texts)
    plan = frame_plan(params.frames, n, params.hold)
    seeds = [params.seed + i for i in range(n)]
    scenes, conds = [], []
    bounds = [round(i * params.frames / n) for i in range(n + 1)]
    for i, text in enumerate(texts):
        condition, reason = choose_condition(pipe.meta, text, params.prompt, params.seed + i)
        cond, _ = pipe.conditions(1, [condition] if pipe.meta.condition == "class" else None,
                                  [condition] if pipe.meta.condition == "caption" else None)
        conds.append(cond)
        scenes.append(Scene(i, text, condition, reason, seeds[i], round(bounds[i] / params.fps, 3), round(bounds[i + 1] / params.fps, 3)))

    out.mkdir(parents=True, exist_ok=True)
    (out / "keyframes").mkdir(exist_ok=True)
    t1 = time.perf_counter()
    raw = render_frames(pipe, conds, seeds, plan, params.steps, params.guidance)  # (F, h, w, C) at model size
    timings["frames_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    frames = np.empty((len(raw), params.size, params.size, 3), dtype=np.uint8)
    wm_id = None
    if params.watermark and params.size >= image_watermark.MIN_SIDE:
        wm_id = watermark_id if watermark_id is not None else secrets.randbits(32)
    key_index = {}
    for f, (scene, drift, morph) in enumerate(plan):
        if morph == 0 and drift == 0:
            key_index.setdefault(scene, f)
    for f, img in enumerate(raw):
        big = upscale(img, params.size)
        big = np.repeat(big, 3, axis=2) if big.shape[2] == 1 else big
        if params.captions:
            big = burn_caption(big, scenes[plan[f][0]].text)
        if wm_id is not None:
            big = np.asarray(image_watermark.embed(to_pil(big), wm_id))
        frames[f] = big
    for scene, f in key_index.items():
        to_pil(frames[f]).save(out / "keyframes" / f"scene-{scene + 1:02d}.png")
    timings["finish_frames_s"] = time.perf_counter() - t2

    from aigc.data.audio import read_wav, write_wav
    from aigc.generate.music import SAMPLE_RATE

    audio, audio_marked = None, False
    if music_run is not None:
        t3 = time.perf_counter()
        from aigc.generate.music import MusicParams, MusicPipeline

        music = MusicPipeline.from_run(music_run, device=device).generate(MusicParams(seconds=params.seconds, key=params.key, tempo=params.tempo,
                                                                     seed=params.seed))
        midi = music.midi_bytes()
        wav, synth = music.render(params.synth)
        samples, rate = read_wav(wav)
        if rate != SAMPLE_RATE:
            raise UserError(f"the soundtrack came back at {rate} Hz, expected {SAMPLE_RATE}")
        if samples.shape[1] == 1:
            samples = np.repeat(samples, 2, axis=1)
        audio = fit_audio(samples, len(frames) / params.fps, SAMPLE_RATE)
        (out / "soundtrack.mid").write_bytes(midi)
        (out / "soundtrack.wav").write_bytes(write_wav(audio, SAMPLE_RATE))
        timings["soundtrack_s"] = time.perf_counter() - t3
        timings["synth"] = synth
    if params.voice:
        t5 = time.perf_counter()
        voice, timings["voice"] = voiceover(scenes, params.voice, params.voice_speed, len(frames) / params.fps, SAMPLE_RATE,
                                            voices_dir)
        audio = mix_voice(audio, voice, SAMPLE_RATE)
        (out / "voiceover.wav").write_bytes(write_wav(voice, SAMPLE_RATE))
        timings["voiceover_s"] = time.perf_counter() - t5
    if audio is not None and wm_id is not None and audio_key is not None \
            and len(audio) / SAMPLE_RATE >= audio_watermark.MIN_SECONDS:  # the track as delivered carries the frames' id
        audio = audio_watermark.embed(audio, SAMPLE_RATE, wm_id, audio_key)
        audio_marked = True
    t4 = time.perf_counter()
    mp4 = mux_mp4(frames, params.fps, audio, chroma=params.chroma)
    timings["mux_s"] = time.perf_counter() - t4
    timings["total_s"] = time.perf_counter() - t0
    timings = {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}
    story = {"prompt": params.prompt, "source": "given" if params.scene_texts else ("text model" if text_run else "prompt"),
             "scenes": [asdict(s) for s in scenes]}
    (out / "storyboard.json").write_text(json.dumps(story, indent=2, ensure_ascii=False), encoding="utf-8")
    record = {"params": asdict(params), "image_run": str(image_run), "text_run": str(text_run) if text_run else None,
              "music_run": str(music_run) if music_run else None, "frames": len(frames),
              "seconds": round(len(frames) / params.fps, 3), "watermark_id": wm_id, "audio_watermark": audio_marked, "timings": timings}
    (out / "params.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return VideoResult(out, mp4, scenes, len(frames), len(frames) / params.fps, audio is not None, wm_id, timings, audio_marked)

