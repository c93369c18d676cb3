"""Music generation from a trained run: sampling event tokens, writing MIDI, rendering to 44.1 kHz WAV.

Sampling is constrained by ``aigc.data.music.Grammar``: only tokens that keep the sequence well formed
can be drawn, so every sample decodes to a valid score. Controls:

- **key**: the key token of the header (the model saw every key through transposition augmentation);
  a primer is transposed to the requested key;
- **length**: a number of bars (or seconds at the tempo): ``Bar`` is masked once the count is
  reached and ``<eos>`` until it is;
- **tempo**: the tempo token and the rendering tempo;
- **primer**: a MIDI/MusicXML file whose bars are kept and continued.

Rendering: a built-in additive synthesizer (harmonics, ADSR envelope, slight vibrato, voices panned
across the stereo field) needs nothing installed; FluidSynth with a General MIDI soundfont is used
when installed (Debian ``fluidsynth`` + ``fluid-soundfont-gm``), or when asked for.
"""
from __future__ import annotations

import io
import logging
import math
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aigc import threads
from aigc.data.audio import write_wav
from aigc.data.music import (BOS, Grammar, Piece, Vocab, bar_ticks, key_name, parse_key, tempo_bucket,
                             ticks_to_seconds, TIME_SIGNATURES)
from aigc.errors import UserError
from aigc.generate.text import cache_arg

log = logging.getLogger(__name__)

SAMPLE_RATE = 44100
SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2", "/usr/share/soundfonts/default.sf2")


@dataclass
class MusicParams:
    bars: int = 8  # bars to generate (after the primer's)
    seconds: float = 0.0  # > 0: generate enough bars for this many seconds at the tempo (overrides bars)
    key: str | None = None  # "G major", "e minor"; None: the model chooses (or the primer's key)
    tempo: int | None = None  # quarter notes per minute; None: the run's most common tempo
    time_signature: str | None = None  # None: the run's most common one (or the primer's)
    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0
    max_tokens: int = 0  # safety cap on generated tokens (0: 120 per bar)
    primer: Piece | None = field(default=None, repr=False)

    def validate(self) -> None:
        if not 1 <= self.bars <= 512:
            raise UserError(f"bars must be between 1 and 512, got {self.bars}")
        if self.seconds < 0 or self.seconds > 1800:
            raise UserError(f"seconds must be between 0 and 1800, got {self.seconds}")
        if self.tempo is not None and not 20 <= self.tempo <= 300:
            raise UserError(f"tempo must be between 20 and 300 quarter notes per minute, got {self.tempo}")
        if self.time_signature is not None and self.time_signature not in TIME_SIGNATURES:
            raise UserError(f"time signature {self.time_signature!r} not supported (one of {', '.join(TIME_SIGNATURES)})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_tokens < 0:
            raise UserError("temperature must be >= 0, top_p in (0, 1], top_k and max_tokens >= 0")
        if self.key is not None:
            parse_key(self.key)


@dataclass
class MusicResult:
    piece: Piece
    tokens: list[int]
    tempo: int
    program: int
    seconds: float  # length of the music
    elapsed_s: float  # time taken to sample it
    primer_bars: int = 0

    def midi_bytes(self) -> bytes:
        return to_midi(self.piece, self.tempo, self.program)

    def write_midi(self, path: Path) -> None:
        _atomic_write(path, self.midi_bytes())

    def render(self, synth: str = "auto") -> tuple[bytes, str]:
        """(WAV bytes, synthesizer used)."""
        return render_wav(self.piece, self.tempo, self.program, synth)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class MusicPipeline:
    """Sample scores from a music run's ``model/`` folder, on the device the model is on (the grammar and the
    sampling of each next event run on the CPU, on its logits)."""

    def __init__(self, model, meta, vocab: Vocab | None = None):
        self.model, self.meta, self.vocab = model, meta, vocab or Vocab()
        model.eval()
        self.device = model.device
        self.block = int(model.config.max_position_embeddings)

    @classmethod
    def from_run(cls, run: str | Path, device: str | torch.device = "cpu") -> MusicPipeline:
        from transformers import AutoModelForCausalLM

        from aigc.run import MusicMeta, model_folder

        meta = MusicMeta.load(run)
        folder = model_folder(run)
        vocab = Vocab()
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        if model.config.vocab_size != len(vocab):
            raise UserError(f"{run}: the model has {model.config.vocab_size} tokens, this version's event vocabulary {len(vocab)}")
        from aigc import devices

        return cls(model.to(devices.as_device(device)), meta, vocab)

    # ------------------------------------------------------------ sampling

    def _pick(self, logits: torch.Tensor, mask: np.ndarray, p: MusicParams, gen: torch.Generator) -> int:
        logits = logits.float().clone()
        logits[~torch.from_numpy(mask)] = -float("inf")
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, int(mask.sum()))).values[-1]
            logits[logits < kth] = -float("inf")
        probs = torch.softmax(logits, -1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    @torch.no_grad()
    def generate(self, params: MusicParams | None = None) -> MusicResult:
        from transformers import DynamicCache

        p = params or MusicParams()
        p.validate()
        v, meta = self.vocab, self.meta
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(int(p.seed))
        primer = p.primer
        ts = p.time_signature or (primer.time_signature if primer else meta.time_signature)
        tempo = p.tempo or (primer.tempo if primer and primer.tempo else meta.tempo)
        key = parse_key(p.key) if p.key else None
        voices = max(len(meta.voices), len(primer.voices) if primer else 0) or 4
        if primer is not None:
            if primer.time_signature != ts:
                raise UserError(f"the primer is in {primer.time_signature}; it cannot be continued in {ts}")
            if key is not None:  # move the primer to the requested key, by the smallest interval
                shift = (key[0] - primer.tonic) % 12
                shift = shift - 12 if shift > 6 else shift
                moved = primer.transposed(shift)
                if moved is None:
                    raise UserError(f"the primer cannot be transposed to {p.key}: notes would leave the piano range")
                primer = Piece(moved.source, key[0], key[1], moved.time_signature, moved.tempo, moved.voices, moved.notes)
            key = (primer.tonic, primer.mode)
        bars = p.bars
        if p.seconds:
            bar_s = ticks_to_seconds(bar_ticks(ts), tempo)
            bars = max(1, math.ceil(p.seconds / bar_s))
        grammar = Grammar(v, ts, voices)
        if primer is not None:
            prefix = v.encode(Piece(primer.source, key[0], key[1], ts, tempo, primer.voices, primer.notes), end=False)
        elif key is not None:
            prefix = v.header(key[0], key[1], ts, tempo)
        else:
            prefix = [v.index[BOS]]
        for i in prefix:
            grammar.advance(i)
        primer_bars = grammar.bars
        target = primer_bars + bars
        max_tokens = p.max_tokens or 120 * bars
        window = max(8, self.block - self.block // 4)
        history, ctx = list(prefix), list(prefix)  # every token so far / the tokens the KV cache covers
        cache, fed, generated = DynamicCache(), 0, 0
        cache_name = cache_arg(self.model)
        while generated < max_tokens:
            threads.adapt()
            if len(ctx) >= self.block:  # the model never saw positions past its block: keep the header + the newest tokens
                ctx = ctx[:4] + ctx[-(window - 4):]
                cache, fed = DynamicCache(), 0
            out = self.model(input_ids=torch.tensor([ctx[fed:]], device=self.device), use_cache=True, **{cache_name: cache})
            fed = len(ctx)  # the cache was extended in place
            logits = out.logits[0, -1].float().cpu()
            if len(history) == 1:  # after <bos> alone: the model picks the key; time signature and tempo are set
                mask = np.zeros(len(v), dtype=bool)
                mask[v.key0: v.key0 + 24] = True
                header = [self._pick(logits, mask, p, gen), v.index[f"TimeSig_{ts}"], v.index[f"Tempo_{tempo_bucket(tempo)}"]]
                for i in header:
                    grammar.advance(i)
                history += header
                ctx += header
                continue
            mask = grammar.allowed(end_ok=grammar.bars >= target, bar_ok=grammar.bars < target)
            nxt = self._pick(logits, mask, p, gen)
            grammar.advance(nxt)
            generated += 1
            if nxt == v.eos:
                break
            history.append(nxt)
            ctx.append(nxt)
        piece = v.decode(history, "generated", list(meta.voices))
        piece.tempo = tempo
        return MusicResult(piece, history, tempo, meta.program, piece.seconds(tempo), time.perf_counter() - started, primer_bars)

    # ------------------------------------------------------------ scoring

    @torch.no_grad()
    def nll(self, ids: list[int]) -> float:
        """Total negative log-likelihood (nats) of ``ids[1:]``, each token given the ones before it.

        The first block is scored in one pass. Past it, each window is the piece's header followed by
        the previous half block and the next tokens (the context the model was trained with and
        generates with), so every later token has at least half a block of context.
        """
        header = 4  # <bos> Key TimeSig Tempo
        x = torch.tensor(ids)
        logp = torch.log_softmax(self.model(input_ids=x[: self.block][None].to(self.device)).logits[0, :-1].float().cpu(), -1)  # (T-1, V)
        total = -float(logp.gather(1, x[1: self.block, None]).sum())
        pos = min(len(ids), self.block)
        while pos < len(ids):
            begin = pos - self.block // 2  # >= header, since pos >= block
            end = min(len(ids), begin + self.block - header)
            window = torch.cat([x[:header], x[begin:end]])
            logp = torch.log_softmax(self.model(input_ids=window[None].to(self.device)).logits[0].float().cpu(), -1)  # (T, V)
            rows = torch.arange(header - 1 + pos - begin, header - 1 + end - begin)  # row r predicts window[r + 1]
            total -= float(logp[rows, x[pos:end]].sum())
            pos = end
        return total


# ---------------------------------------------------------------- MIDI

def to_midi(piece: Piece, tempo: int, program: int = 52) -> bytes:
    """A standard MIDI file: one instrument per voice, the tempo, key and time signature."""
    import pretty_midi

    pm = pretty_midi.PrettyMIDI(initial_tempo=float(tempo))
    num, den = (int(x) for x in piece.time_signature.split("/"))
    pm.time_signature_changes.append(pretty_midi.TimeSignature(num, den, 0.0))
    pm.key_signature_changes.append(pretty_midi.KeySignature(piece.tonic + (12 if piece.mode == "minor" else 0), 0.0))
    n_voices = max((n[1] for n in piece.notes), default=-1) + 1
    for voice in range(n_voices):
        name = piece.voices[voice] if voice < len(piece.voices) else f"voice {voice + 1}"
        inst = pretty_midi.Instrument(program=program, name=name)
        for onset, vc, pitch, dur in piece.notes:
            if vc == voice:
                start = ticks_to_seconds(onset, tempo)
                inst.notes.append(pretty_midi.Note(velocity=80, pitch=int(pitch), start=start, end=start + ticks_to_seconds(dur, tempo)))
        pm.instruments.append(inst)
    buf = io.BytesIO()
    pm.write(buf)
    return buf.getvalue()


# ---------------------------------------------------------------- audio

def soundfont(path: str = "") -> str | None:
    """The General MIDI soundfont to use with FluidSynth, if one is installed."""
    for candidate in ([path] if path else []) + list(SOUNDFONTS):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def fluidsynth_available(sf2: str = "") -> bool:
    return shutil.which("fluidsynth") is not None and soundfont(sf2) is not None


def render_wav(piece: Piece, tempo: int, program: int = 52, synth: str = "auto", sf2: str = "") -> tuple[bytes, str]:
    """Render to 16-bit stereo 44.1 kHz WAV bytes; returns (bytes, "builtin" or "fluidsynth")."""
    if synth not in ("auto", "builtin", "fluidsynth"):
        raise UserError(f"unknown synthesizer {synth!r} (auto, builtin, fluidsynth)")
    if synth == "fluidsynth" and not fluidsynth_available(sf2):
        raise UserError("FluidSynth or a General MIDI soundfont is not installed "
                        "(Debian: apt-get install fluidsynth fluid-soundfont-gm); use --synth builtin")
    if synth == "fluidsynth" or (synth == "auto" and fluidsynth_available(sf2)):
        return _fluidsynth(to_midi(piece, tempo, program), soundfont(sf2)), "fluidsynth"
    return write_wav(synthesize(piece, tempo), SAMPLE_RATE), "builtin"


def _fluidsynth(midi: bytes, sf2: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        mid, wav = Path(d) / "in.mid", Path(d) / "out.wav"
        mid.write_bytes(midi)
        proc = subprocess.run(["fluidsynth", "-ni", "-g", "0.6", "-r", str(SAMPLE_RATE), "-F", str(wav), sf2, str(mid)],
                              capture_output=True, timeout=600)
        if proc.returncode != 0 or not wav.is_file():
            raise UserError(f"fluidsynth failed: {proc.stderr.decode(errors='replace')[-300:]}")
        return wav.read_bytes()


def synthesize(piece: Piece, tempo: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The built-in synthesizer: (samples, 2) float32 in [-1, 1].

    Each note is a sum of six harmonics (amplitude 1/k^1.3, an organ/choir-like spectrum) with a
    5.5 Hz vibrato of 0.25%, shaped by an ADSR envelope (20 ms attack, 100 ms decay to 70%, 150 ms
    release). Voice v of n is panned from right (top voice) to left (bass) with constant power.
    """
    release = 0.15
    length = piece.seconds(tempo) + release + 0.05
    out = np.zeros((int(length * sample_rate) + 1, 2), dtype=np.float32)
    n_voices = max((n[1] for n in piece.notes), default=0) + 1
    harmonics = np.arange(1, 7)
    amps = (1.0 / harmonics ** 1.3).astype(np.float32)
    amps /= amps.sum()
    for onset, voice, pitch, dur in piece.notes:
        start = ticks_to_seconds(onset, tempo)
        held = ticks_to_seconds(dur, tempo)
        n = int((held + release) * sample_rate)
        t = np.arange(n, dtype=np.float32) / sample_rate
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        # instantaneous frequency f0 * (1 + 0.0025 sin(2 pi 5.5 t)), integrated to a phase
        phase = 2 * np.pi * f0 * t - (f0 * 0.0025 / 5.5) * np.cos(2 * np.pi * 5.5 * t)
        nyquist_ok = harmonics * f0 < sample_rate / 2
        tone = (amps[nyquist_ok, None] * np.sin(harmonics[nyquist_ok, None] * phase[None, :])).sum(0)
        env = _adsr(t, held, 0.02, 0.1, 0.7, release)
        pan = 0.5 if n_voices == 1 else 1.0 - voice / (n_voices - 1)  # 1 = right
        gains = np.array([math.cos(pan * math.pi / 2), math.sin(pan * math.pi / 2)], dtype=np.float32)
        i = int(start * sample_rate)
        seg = out[i: i + n]
        seg += (tone * env)[: len(seg), None] * gains[None, :]
    peak = float(np.abs(out).max())
    if peak > 0:
        out *= 0.89 / peak  # -1 dBFS
    return out


def _adsr(t: np.ndarray, held: float, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    env = np.where(t < attack, t / attack, np.where(t < attack + decay, 1 - (1 - sustain) * (t - attack) / decay, sustain))
    level_at_release = np.interp(held, [0, attack, attack + decay], [0, 1, sustain]) if held < attack + decay else sustain
    after = t >= held
    env = np.where(after, level_at_release * np.clip(1 - (t - held) / release, 0, 1), env)
    return env.astype(np.float32)


def key_label(piece: Piece) -> str:
    return key_name(piece.tonic, piece.mode).replace("_", " ")
