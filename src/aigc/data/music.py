"""Symbolic music: score files to note lists, note lists to REMI-style event tokens, and back.

Reading: MIDI (``.mid``/``.midi``) note for note with pretty_midi; MusicXML (``.xml``/``.musicxml``/
``.mxl``), Humdrum ``.krn`` and ABC through music21, plus the Bach chorales music21 ships
(``--builtin chorales``, no download).
Each score becomes a :class:`Piece`: key (tonic pitch class + major/minor), time signature, tempo and
notes ``(onset, voice, pitch, duration)`` on a grid of ``TICKS_PER_QUARTER`` (16th notes), with tied
notes merged and bar 0 starting at the first downbeat (a pickup is shifted so bars line up). Each part
(track) is a voice; percussion parts and parts beyond ``MAX_VOICES`` are dropped and counted.

Tokens (REMI, Huang & Yang 2020, with a voice token per note as in multi-track REMI)::

    <bos> Key_A_major TimeSig_4/4 Tempo_96  Bar Pos_0 Voice_0 Pitch_69 Dur_2 Voice_1 Pitch_64 Dur_4 ...
    Pos_2 Voice_0 Pitch_71 Dur_2  Bar ...  <eos>

Within a bar the positions rise; at one position notes are ordered by voice, then pitch (high first).
A note is three tokens; ``Grammar`` gives the tokens allowed next, so sampling can only produce
well-formed sequences. Transposition (augmentation, and the key control) shifts every pitch and the
key token together.

Prepared folder::

    train.jsonl, val.jsonl   one piece per line (source, key, time signature, tempo, voices, notes)
    manifest.json            options, sources, counts, skipped files with reasons, token statistics
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aigc.data import store
from aigc.errors import UserError

TICKS_PER_QUARTER = 4  # 16th-note grid
MAX_VOICES = 8
PITCH_MIN, PITCH_MAX = 21, 108  # the piano range
MAX_DURATION = 32  # ticks (two 4/4 bars); longer notes are clipped
MAX_BAR_TICKS = 32  # the longest bar a time signature may give (8 quarters)
TIME_SIGNATURES = ("2/4", "3/4", "4/4", "5/4", "6/4", "2/2", "3/2", "4/2", "3/8", "6/8", "9/8", "12/8")
TEMPI = tuple(range(40, 216, 8))  # tempo buckets in quarter notes per minute
DEFAULT_TEMPO = 96
NOTE_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
SUFFIXES = {".mid", ".midi", ".xml", ".musicxml", ".mxl", ".krn", ".abc"}
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10, 11)  # natural minor plus the raised leading tone (harmonic minor)


@dataclass
class Piece:
    source: str
    tonic: int  # pitch class 0-11
    mode: str  # major | minor
    time_signature: str  # "4/4"
    tempo: int  # quarter notes per minute
    voices: list[str]
    notes: list[list[int]]  # [onset_tick, voice, pitch, duration_ticks], sorted by onset, voice, -pitch

    @property
    def bar_ticks(self) -> int:
        return bar_ticks(self.time_signature)

    @property
    def length_ticks(self) -> int:
        return max((n[0] + n[3] for n in self.notes), default=0)

    def seconds(self, tempo: int | None = None) -> float:
        return ticks_to_seconds(self.length_ticks, tempo or self.tempo)

    def transposed(self, semitones: int) -> Piece | None:
        """The piece shifted by ``semitones``; None when a note would leave the piano range."""
        if not semitones:
            return self
        pitches = [n[2] + semitones for n in self.notes]
        if pitches and (min(pitches) < PITCH_MIN or max(pitches) > PITCH_MAX):
            return None
        notes = [[n[0], n[1], n[2] + semitones, n[3]] for n in self.notes]
        return Piece(self.source, (self.tonic + semitones) % 12, self.mode, self.time_signature, self.tempo, self.voices, notes)

    def to_json(self) -> dict:
        return asdict(self)


def bar_ticks(time_signature: str) -> int:
    num, den = (int(x) for x in time_signature.split("/"))
    return num * TICKS_PER_QUARTER * 4 // den


def ticks_to_seconds(ticks: float, tempo: float) -> float:
    return ticks / TICKS_PER_QUARTER * 60.0 / tempo


def key_name(tonic: int, mode: str) -> str:
    return f"{NOTE_NAMES[tonic % 12]}_{mode}"


def parse_key(text: str) -> tuple[int, str]:
    """'C', 'c minor', 'F# major', 'Bb_minor', 'am' -> (tonic pitch class, mode)."""
    t = text.strip().replace("_", " ")
    parts = t.split()
    if not parts:
        raise UserError("empty key: give a tonic and mode, e.g. 'G major' or 'E minor'")
    name = parts[0]
    mode = parts[1].lower() if len(parts) > 1 else ("minor" if name[-1:] == "m" and len(name) > 1 else "major")
    if len(parts) == 1 and name[-1:] == "m" and len(name) > 1:
        name = name[:-1]
    if mode not in ("major", "minor"):
        raise UserError(f"key {text!r}: mode must be major or minor")
    letters = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
    base = letters.get(name[:1].upper())
    if base is None or any(c not in "#b" for c in name[1:]):
        raise UserError(f"key {text!r}: tonic must be a note name like C, F#, Bb")
    return (base + name[1:].count("#") - name[1:].count("b")) % 12, mode


def scale_pitch_classes(tonic: int, mode: str) -> set[int]:
    return {(tonic + s) % 12 for s in (MAJOR_SCALE if mode == "major" else MINOR_SCALE)}


# Krumhansl-Kessler key profiles (C major, C minor), from probe-tone ratings.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def pitch_class_histogram(pieces: list[Piece], weighted: bool = False) -> np.ndarray:
    h = np.zeros(12)
    for p in pieces:
        for n in p.notes:
            h[n[2] % 12] += n[3] if weighted else 1
    return h / max(h.sum(), 1e-12)


def estimate_key(piece: Piece) -> tuple[int, str]:
    """Krumhansl-Schmuckler: the key whose profile correlates best with the duration-weighted pitch classes."""
    h = pitch_class_histogram([piece], weighted=True)
    best, best_r = (0, "major"), -2.0
    for mode, profile in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            r = float(np.corrcoef(h, np.roll(profile, tonic))[0, 1]) if h.std() > 0 else -1.0
            if r > best_r:
                best, best_r = (tonic, mode), r
    return best


def tempo_bucket(bpm: float) -> int:
    return min(TEMPI, key=lambda b: abs(b - bpm))


# ---------------------------------------------------------------- reading scores

def read_score(path: str | Path, source: str | None = None) -> Piece:
    """Parse one score file (MIDI with pretty_midi, the rest with music21); raises ValueError with the reason."""
    import music21

    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    if path.suffix.lower() in (".mid", ".midi"):
        return read_midi(path, source)
    try:
        score = music21.converter.parse(str(path))
    except ValueError:
        raise
    except Exception as e:  # music21 raises many types on bad input (ConverterException, MidiException, ...)
        raise ValueError(f"unreadable score ({type(e).__name__}: {str(e)[:120]})") from None
    return piece_from_stream(score, source or str(path))


def piece_from_stream(score, source: str) -> Piece:
    """A music21 Score (or Part) as a Piece on the 16th-note grid."""
    import music21

    parts = list(score.parts) if hasattr(score, "parts") and len(score.parts) else [score]
    flat = score.flatten()
    sigs = list(flat.getElementsByClass(music21.meter.TimeSignature))
    ts = f"{sigs[0].numerator}/{sigs[0].denominator}" if sigs else "4/4"
    if ts not in TIME_SIGNATURES:
        raise ValueError(f"unsupported time signature {ts} (supported: {', '.join(TIME_SIGNATURES)})")
    keys = list(flat.getElementsByClass(music21.key.Key))
    key = (keys[0].tonic.pitchClass, "minor" if keys[0].mode in ("minor", "dorian", "phrygian", "aeolian", "locrian") else "major") \
        if keys else None
    marks = list(flat.getElementsByClass(music21.tempo.MetronomeMark))
    bpm = marks[0].getQuarterBPM() if marks and marks[0].number else None
    tempo = tempo_bucket(bpm) if bpm else DEFAULT_TEMPO

    # A pickup bar is padded on the left, so bar lines fall on multiples of the bar length.
    shift = 0.0
    measures = list(parts[0].getElementsByClass(music21.stream.Measure))
    if measures and measures[0].paddingLeft:
        shift = float(measures[0].paddingLeft)
    notes: list[list[int]] = []
    voices: list[str] = []
    dropped_parts = 0
    for part in parts:
        instrument = part.getInstrument(returnDefault=False)
        if instrument is not None and isinstance(instrument, music21.instrument.UnpitchedPercussion):
            dropped_parts += 1
            continue
        part_notes = []
        for el in part.stripTies().flatten().notes:
            onset = round((float(el.offset) + shift) * TICKS_PER_QUARTER)
            dur = max(1, min(MAX_DURATION, round(float(el.quarterLength) * TICKS_PER_QUARTER)))
            if el.duration.isGrace or float(el.quarterLength) == 0:
                continue
            for p in el.pitches:
                if PITCH_MIN <= p.midi <= PITCH_MAX:
                    part_notes.append([onset, 0, int(p.midi), dur])
        if not part_notes:
            continue
        if len(voices) == MAX_VOICES:
            dropped_parts += 1
            continue
        for n in part_notes:
            n[1] = len(voices)
        voices.append(part.partName or f"part {len(voices) + 1}")
        notes.extend(part_notes)
    if not notes:
        raise ValueError("no pitched notes")
    start = min(n[0] for n in notes)
    if start < 0:
        raise ValueError("notes before the start of the score")
    # Drop the duplicates a chord written twice (or unison doubling in one part) leaves on the grid.
    unique = sorted({tuple(n) for n in notes}, key=lambda n: (n[0], n[1], -n[2], n[3]))
    seen, cleaned = set(), []
    for n in unique:
        if (n[0], n[1], n[2]) not in seen:
            seen.add((n[0], n[1], n[2]))
            cleaned.append(list(n))
    piece = Piece(source, 0, "major", ts, tempo, voices, cleaned)
    piece.tonic, piece.mode = key or estimate_key(piece)  # files without a key (most MIDI): Krumhansl-Schmuckler
    return piece


def read_midi(path_or_file, source: str | None = None) -> Piece:
    """A MIDI file (a path or a binary file object) read note for note.

    music21's MIDI import re-voices overlapping notes of one track; pretty_midi keeps them as written.
    """
    import pretty_midi

    try:
        pm = pretty_midi.PrettyMIDI(path_or_file if hasattr(path_or_file, "read") else str(path_or_file))
    except Exception as e:  # mido/pretty_midi raise OSError, EOFError, KeySignatureError, ...
        raise ValueError(f"unreadable MIDI ({type(e).__name__}: {str(e)[:120]})") from None
    sig = pm.time_signature_changes[0] if pm.time_signature_changes else None
    ts = f"{sig.numerator}/{sig.denominator}" if sig else "4/4"
    if ts not in TIME_SIGNATURES:
        raise ValueError(f"unsupported time signature {ts} (supported: {', '.join(TIME_SIGNATURES)})")
    tempi = pm.get_tempo_changes()[1]
    tempo = tempo_bucket(float(tempi[0])) if len(tempi) else DEFAULT_TEMPO

    def tick(t: float) -> float:
        return pm.time_to_tick(t) / pm.resolution * TICKS_PER_QUARTER

    voices, notes = [], []
    for inst in pm.instruments:
        if inst.is_drum or not inst.notes:
            continue
        if len(voices) == MAX_VOICES:
            break
        v = len(voices)
        voices.append(inst.name or pretty_midi.program_to_instrument_name(inst.program))
        for n in inst.notes:
            if PITCH_MIN <= n.pitch <= PITCH_MAX:
                onset = round(tick(n.start))
                notes.append([onset, v, int(n.pitch), max(1, min(MAX_DURATION, round(tick(n.end)) - onset))])
    if not notes:
        raise ValueError("no pitched notes")
    unique = {(n[0], n[1], n[2]): n for n in sorted(notes)}  # one note per (onset, voice, pitch)
    piece = Piece(source or str(path_or_file), 0, "major", ts, tempo, voices, sorted(unique.values(), key=lambda n: (n[0], n[1], -n[2])))
    if pm.key_signature_changes:
        k = pm.key_signature_changes[0].key_number
        piece.tonic, piece.mode = k % 12, "minor" if k >= 12 else "major"
    else:
        piece.tonic, piece.mode = estimate_key(piece)
    return piece


def builtin_chorale_paths() -> list[Path]:
    """The Bach chorales (MusicXML) in music21's corpus, sorted by name."""
    from music21 import corpus

    return sorted((p for p in corpus.getComposer("bach") if p.suffix in (".mxl", ".xml")), key=lambda p: p.name)


def piece_from_midi(data: bytes, source: str = "primer") -> Piece:
    """A MIDI file given as bytes (a primer upload) as a Piece."""
    import io

    if not data:
        raise ValueError("empty file")
    return read_midi(io.BytesIO(data), source)


# ---------------------------------------------------------------- tokens

class Vocab:
    """The event vocabulary: a fixed list, so every run of a given format shares ids."""

    def __init__(self):
        tokens = [PAD, BOS, EOS]
        tokens += [f"Key_{key_name(t, m)}" for m in ("major", "minor") for t in range(12)]
        tokens += [f"TimeSig_{ts}" for ts in TIME_SIGNATURES]
        tokens += [f"Tempo_{b}" for b in TEMPI]
        tokens += ["Bar"]
        tokens += [f"Pos_{i}" for i in range(MAX_BAR_TICKS)]
        tokens += [f"Voice_{i}" for i in range(MAX_VOICES)]
        tokens += [f"Pitch_{p}" for p in range(PITCH_MIN, PITCH_MAX + 1)]
        tokens += [f"Dur_{d}" for d in range(1, MAX_DURATION + 1)]
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.pad, self.bos, self.eos, self.bar = self.index[PAD], self.index[BOS], self.index[EOS], self.index["Bar"]
        self.pos0, self.voice0 = self.index["Pos_0"], self.index["Voice_0"]
        self.pitch0, self.dur1 = self.index[f"Pitch_{PITCH_MIN}"], self.index["Dur_1"]
        self.key0, self.ts0, self.tempo0 = self.index["Key_C_major"], self.index[f"TimeSig_{TIME_SIGNATURES[0]}"], self.index[f"Tempo_{TEMPI[0]}"]

    def __len__(self) -> int:
        return len(self.tokens)

    def kind(self, i: int) -> str:
        return self.tokens[i].split("_", 1)[0]

    def header(self, tonic: int, mode: str, time_signature: str, tempo: int) -> list[int]:
        return [self.bos, self.index[f"Key_{key_name(tonic, mode)}"], self.index[f"TimeSig_{time_signature}"],
                self.index[f"Tempo_{tempo_bucket(tempo)}"]]

    def encode(self, piece: Piece, end: bool = True) -> list[int]:
        """Token ids of a whole piece: header, bars, and EOS when ``end``."""
        ids = self.header(piece.tonic, piece.mode, piece.time_signature, piece.tempo)
        bt = piece.bar_ticks
        bar, pos = -1, -1
        for onset, voice, pitch, dur in piece.notes:
            b, p = divmod(onset, bt)
            while bar < b:
                ids.append(self.bar)
                bar, pos = bar + 1, -1
            if p != pos:
                ids.append(self.pos0 + p)
                pos = p
            ids += [self.voice0 + voice, self.pitch0 + pitch - PITCH_MIN, self.dur1 + min(dur, MAX_DURATION) - 1]
        if end:
            ids.append(self.eos)
        return ids

    def decode(self, ids: list[int], source: str = "generated", voices: list[str] | None = None) -> Piece:
        """Tokens back to a Piece. Malformed stretches (possible only without the grammar) are skipped."""
        tonic, mode, ts, tempo = 0, "major", "4/4", DEFAULT_TEMPO
        notes = []
        bar, pos, voice, pitch = -1, 0, None, None
        for i in ids:
            tok = self.tokens[i]
            kind, _, value = tok.partition("_")
            if tok == EOS:
                break
            if kind == "Key":
                name, mode = value.split("_")
                tonic = NOTE_NAMES.index(name)
            elif kind == "TimeSig":
                ts = value
            elif kind == "Tempo":
                tempo = int(value)
            elif tok == "Bar":
                bar, pos, voice, pitch = bar + 1, 0, None, None
            elif kind == "Pos":
                pos, voice, pitch = int(value), None, None
            elif kind == "Voice":
                voice, pitch = int(value), None
            elif kind == "Pitch":
                pitch = int(value) if voice is not None else None
            elif kind == "Dur" and voice is not None and pitch is not None:
                notes.append([max(bar, 0) * bar_ticks(ts) + pos, voice, pitch, int(value)])
                pitch = None
        n_voices = max((n[1] for n in notes), default=-1) + 1
        names = list(voices or [])[:n_voices] + [f"voice {v + 1}" for v in range(len(voices or []), n_voices)]
        notes.sort(key=lambda n: (n[0], n[1], -n[2]))
        return Piece(source, tonic, mode, ts, tempo, names, notes)

    def to_hf_tokenizer(self, model_max_length: int = 1024):
        """A word-level ``PreTrainedTokenizerFast`` over the event names (so checkpoints load with AutoTokenizer)."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(self.index, unk_token=PAD))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD,
                                       model_max_length=model_max_length)


class Grammar:
    """Which tokens may come next: a small state machine over the event syntax.

    header (key, time signature, tempo) -> Bar -> [Pos_p -> (Voice -> Pitch -> Dur)+]* -> Bar ... -> EOS,
    with positions rising inside a bar and below its length, and voices within ``voices`` and in
    order at one position (as ``Vocab.encode`` writes them).
    """

    def __init__(self, vocab: Vocab, time_signature: str = "4/4", voices: int = MAX_VOICES):
        self.v = vocab
        self.bar_ticks = bar_ticks(time_signature)
        self.voices = max(1, min(voices, MAX_VOICES))
        self.size = len(vocab)
        self.state, self.pos, self.bars, self.voice = "start", -1, 0, 0

    def advance(self, i: int) -> None:
        kind = self.v.kind(i)
        tok = self.v.tokens[i]
        if tok == "Bar":
            self.state, self.pos, self.bars = "bar", -1, self.bars + 1
        elif kind == "Pos":
            self.state, self.pos, self.voice = "pos", int(tok[4:]), 0
        elif kind == "Voice":
            self.state, self.voice = "voice", int(tok[6:])
        elif kind == "Pitch":
            self.state = "pitch"
        elif kind == "Dur":
            self.state = "note"
        elif tok == EOS:
            self.state = "end"
        elif kind in ("Key", "TimeSig", "Tempo") or tok == BOS:
            self.state = "start"

    def allowed(self, end_ok: bool = True, bar_ok: bool = True) -> np.ndarray:
        """Boolean mask over the vocabulary for the next token."""
        v, m = self.v, np.zeros(self.size, dtype=bool)
        if self.state == "start":
            m[v.bar] = True
        elif self.state in ("bar", "note"):
            m[v.bar] = bar_ok
            m[v.eos] = end_ok
            m[v.pos0 + self.pos + 1: v.pos0 + self.bar_ticks] = True
            if self.state == "note":  # more notes at this position, in voice order
                m[v.voice0 + self.voice: v.voice0 + self.voices] = True
            if not m.any():  # the bar is full and no new bar is allowed: end
                m[v.eos] = True
        elif self.state == "pos":
            m[v.voice0: v.voice0 + self.voices] = True
        elif self.state == "voice":
            m[v.pitch0: v.pitch0 + PITCH_MAX - PITCH_MIN + 1] = True
        elif self.state == "pitch":
            m[v.dur1: v.dur1 + MAX_DURATION] = True
        else:
            m[v.eos] = True
        return m


# ---------------------------------------------------------------- preparing a dataset

@dataclass
class MusicPrepareOptions:
    val_fraction: float = 0.1
    seed: int = 1337
    limit: int = 0  # built-in chorales: at most this many (0 = all)
    transpose: list[int] = field(default_factory=lambda: [-5, 6])  # augmentation range in semitones (inclusive)
    min_notes: int = 8  # pieces with fewer notes are skipped as too short

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.transpose) != 2 or self.transpose[0] > self.transpose[1] or not -12 <= self.transpose[0] <= 0 <= self.transpose[1] <= 12:
            raise UserError(f"transpose must be a range LOW:HIGH with -12 <= LOW <= 0 <= HIGH <= 12, got {self.transpose}")
        if self.limit < 0 or self.min_notes < 1:
            raise UserError("limit must be >= 0 and min_notes >= 1")


def expand_score_inputs(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"input not found: {p}")
    return files


def _split_score(source: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{source}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def prepare(inputs: list[str | Path], out: str | Path, opts: MusicPrepareOptions | None = None,
            builtin: list[str] | None = None, overwrite: bool = False, progress=lambda done, total: None) -> dict:
    """Read scores, split by source, write the note lists and a manifest atomically; return the manifest."""
    opts = opts or MusicPrepareOptions()
    opts.validate()
    out = Path(out)
    if not inputs and not builtin:
        raise UserError("nothing to prepare: give MIDI/MusicXML files or folders, or --builtin chorales")
    for name in builtin or []:
        if name != "chorales":
            raise UserError(f"unknown built-in music {name!r} (available: chorales)")
    files = expand_score_inputs(inputs)
    store.check_writable(out, overwrite)
    started = time.time()
    jobs: list[tuple[Path, str]] = []
    sources = []
    if builtin:
        paths = builtin_chorale_paths()
        if opts.limit:
            paths = paths[: opts.limit]
        jobs += [(p, f"builtin:chorales/{p.stem}") for p in paths]
        sources.append({"path": "builtin:chorales", "files": len(paths), "origin": "music21 corpus (Bach chorales)"})
    jobs += [(f, str(f)) for f in files]
    if files:
        sources.append({"path": ", ".join(str(Path(i)) for i in inputs), "files": len(files)})
    if not jobs:
        raise UserError(f"no score files found (looked for {', '.join(sorted(SUFFIXES))})")
    pieces: list[Piece] = []
    skipped: list[dict] = []
    digests = set()
    for done, (path, source) in enumerate(jobs, 1):
        try:
            piece = read_score(path, source)
            if len(piece.notes) < opts.min_notes:
                raise ValueError(f"too short ({len(piece.notes)} notes < {opts.min_notes})")
            digest = hashlib.sha256(json.dumps([piece.notes, piece.time_signature]).encode()).hexdigest()
            if digest in digests:
                raise ValueError("duplicate of an earlier score")
            digests.add(digest)
            pieces.append(piece)
        except ValueError as e:
            skipped.append({"file": source, "reason": str(e)})
        progress(done, len(jobs))
    if not pieces:
        reasons = sorted({s["reason"].split(" (")[0] for s in skipped})
        raise UserError(f"no usable scores: {len(skipped)} skipped ({', '.join(reasons)})")
    train = [p for p in pieces if _split_score(p.source, opts.seed) >= opts.val_fraction]
    val = [p for p in pieces if _split_score(p.source, opts.seed) < opts.val_fraction]
    if opts.val_fraction > 0 and not val and len(train) > 1:
        val = [train.pop()]
    vocab = Vocab()
    with store.atomic_folder(out, overwrite) as tmp:
        for split, part in (("train", train), ("val", val)):
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for p in part:
                    f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
        tokens = [len(vocab.encode(p)) for p in pieces]
        manifest = {
            **store.manifest("music", started, opts),
            "ticks_per_quarter": TICKS_PER_QUARTER,
            "vocab_size": len(vocab),
            "sources": sources,
            "pieces": {"read": len(jobs), "skipped": len(skipped), "train": len(train), "val": len(val)},
            "notes": {"train": sum(len(p.notes) for p in train), "val": sum(len(p.notes) for p in val)},
            "tokens_per_piece": {"mean": round(float(np.mean(tokens)), 1), "max": int(max(tokens))},
            "time_signatures": _count(p.time_signature for p in pieces),
            "modes": _count(p.mode for p in pieces),
            "augment": {"transpose": list(opts.transpose)},
            "skipped": skipped,
        }
        store.write_manifest(tmp, manifest, ("train.jsonl", "val.jsonl"))
    return manifest


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def load_prepared(path: str | Path) -> tuple[list[Piece], list[Piece], dict]:
    """Read a prepared music folder: (train pieces, val pieces, manifest)."""
    p = Path(path)
    manifest = store.read_manifest(p, "music")
    splits = []
    for split in ("train", "val"):
        with (p / f"{split}.jsonl").open(encoding="utf-8") as f:
            splits.append([Piece(**json.loads(line)) for line in f if line.strip()])
    return splits[0], splits[1], manifest
