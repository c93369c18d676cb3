"""Music evaluation: held-out likelihood and statistics of samples against the training pieces.

Likelihood is the model's negative log-likelihood of each held-out piece as written (no
transposition), in three units:

- nats per event token (what training minimises);
- nats per note: the piece's total NLL (structure tokens included) divided by its notes;
- nats per 16th-note step: the same total divided by the piece's length in 16th notes. Coconet
  (Huang et al. 2017) reports 0.57 nats per 16th-note frame on JSB chorales, but for a piano-roll model
  of exactly four voices given the rest of the frame; this model predicts a whole event sequence
  left to right, so the figures share a denominator, not a task.

Sample statistics (each also computed on the held-out pieces, the floor a perfect model would reach):
pitch-class histogram distance to the training set (total variation, 0 = identical, 1 = disjoint),
notes per bar, mean duration, pitch range, in-key ratio (notes in the scale of the piece's key; minor
counts the raised leading tone), polyphony (notes sounding per 16th step that has any), and key
adherence: the share of samples whose Krumhansl-Schmuckler key estimate equals the requested key.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from aigc.data.music import Piece, Vocab, estimate_key, pitch_class_histogram, key_name, parse_key, scale_pitch_classes

COCONET_NATS_PER_FRAME = 0.57
EVAL_KEYS = ("C major", "G major", "D minor", "A minor", "F major", "E minor", "Bb major", "B minor")


def statistics(pieces: list[Piece], reference_hist: np.ndarray | None = None) -> dict:
    """Note statistics of a set of pieces (and its pitch-class distance to ``reference_hist``)."""
    notes = [n for p in pieces for n in p.notes]
    if not notes:
        return {"pieces": len(pieces), "notes": 0}
    bars = sum(max(1, -(-p.length_ticks // p.bar_ticks)) for p in pieces)
    in_key = sum(sum(n[2] % 12 in scale_pitch_classes(p.tonic, p.mode) for n in p.notes) for p in pieces)
    poly_steps, poly_total = 0, 0
    for p in pieces:
        sounding = np.zeros(p.length_ticks + 1, dtype=np.int32)
        for onset, _, _, dur in p.notes:
            sounding[onset: onset + dur] += 1
        active = sounding[sounding > 0]
        poly_steps += len(active)
        poly_total += int(active.sum())
    pitches = np.array([n[2] for n in notes])
    hist = pitch_class_histogram(pieces)
    out = {
        "pieces": len(pieces),
        "notes": len(notes),
        "notes_per_bar": round(len(notes) / bars, 3),
        "mean_duration_quarters": round(float(np.mean([n[3] for n in notes])) / 4, 4),
        "pitch_mean": round(float(pitches.mean()), 2),
        "pitch_range_mean": round(float(np.mean([max(n[2] for n in p.notes) - min(n[2] for n in p.notes) for p in pieces if p.notes])), 2),
        "in_key_ratio": round(in_key / len(notes), 4),
        "polyphony": round(poly_total / max(1, poly_steps), 3),
        "pitch_class_histogram": [round(float(x), 4) for x in hist],
    }
    if reference_hist is not None:
        out["pitch_class_distance"] = round(0.5 * float(np.abs(hist - reference_hist).sum()), 4)
    return out


def likelihood(pipe, pieces: list[Piece], vocab: Vocab, progress: Callable[[str, int, int], None] | None = None) -> dict:
    total, tokens, notes, steps = 0.0, 0, 0, 0
    for i, p in enumerate(pieces):
        if progress:
            progress("held-out likelihood (pieces)", i, len(pieces))
        ids = vocab.encode(p)
        total += pipe.nll(ids)
        tokens += len(ids) - 1
        notes += len(p.notes)
        steps += p.length_ticks
    return {
        "pieces": len(pieces),
        "tokens": tokens,
        "notes": notes,
        "sixteenth_steps": steps,
        "nats_per_token": round(total / max(1, tokens), 4),
        "nats_per_note": round(total / max(1, notes), 4),
        "bits_per_note": round(total / max(1, notes) / np.log(2), 4),
        "nats_per_16th_step": round(total / max(1, steps), 4),
        "reference": {"coconet_nats_per_16th_frame": COCONET_NATS_PER_FRAME,
                      "note": "Coconet scores a 4-voice piano roll frame given the rest of the frame; this model scores "
                              "the whole event sequence left to right. Same denominator, different task."},
    }


def _read_pieces(path: Path) -> list[Piece]:
    return [Piece(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate_run(run_dir: str | Path, n_samples: int = 8, bars: int = 8, seed: int = 0, max_pieces: int = 0,
                 progress: Callable[[str, int, int], None] | None = None, device: str = "cpu") -> dict:
    """Evaluate a music run; writes eval/report.json and eval/report.md in the run directory.
    ``progress(stage, done, total)`` hears how each stage advances."""
    from aigc.errors import UserError
    from aigc.generate.music import MusicParams, MusicPipeline

    run_dir = Path(run_dir)
    pipe = MusicPipeline.from_run(run_dir, device=device)
    data = run_dir / "data"
    if not (data / "val.jsonl").is_file():
        raise UserError(f"{run_dir}: no held-out pieces (data/val.jsonl); is this a music run directory?")
    train, val = _read_pieces(data / "train.jsonl"), _read_pieces(data / "val.jsonl")
    if max_pieces:
        val = val[:max_pieces]
    started = time.perf_counter()
    vocab = Vocab()
    lik = likelihood(pipe, val, vocab, progress)
    if progress:
        progress("held-out likelihood (pieces)", len(val), len(val))
    train_hist = pitch_class_histogram(train)
    samples, matched, seconds, gen_s = [], 0, 0.0, 0.0
    for i in range(n_samples):
        if progress:
            progress("composing samples", i, n_samples)
        key = EVAL_KEYS[i % len(EVAL_KEYS)]
        result = pipe.generate(MusicParams(bars=bars, key=key, seed=seed + i))
        samples.append(result.piece)
        matched += estimate_key(result.piece) == parse_key(key)
        seconds += result.seconds
        gen_s += result.elapsed_s
    if progress:
        progress("composing samples", n_samples, n_samples)
    report = {
        "run": str(run_dir),
        "likelihood": lik,
        "train": statistics(train),
        "heldout": statistics(val, train_hist),
        "samples": {**statistics(samples, train_hist), "bars_each": bars,
                    "key_adherence": round(matched / max(1, n_samples), 4),
                    "keys_requested": [EVAL_KEYS[i % len(EVAL_KEYS)] for i in range(n_samples)],
                    "keys_estimated": [key_name(*estimate_key(s)).replace("_", " ") for s in samples],
                    "music_seconds_per_second": round(seconds / max(gen_s, 1e-9), 3)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_report(report, run_dir / "eval")
    return report


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    lik = report["likelihood"]
    lines = [f"# Music evaluation: {report['run']}", "",
             f"## Held-out likelihood ({lik['pieces']} pieces as written, {lik['notes']} notes)", "",
             "| unit | value |", "| --- | --- |",
             f"| nats per event token | {lik['nats_per_token']:.4f} |",
             f"| nats per note | {lik['nats_per_note']:.4f} |",
             f"| bits per note | {lik['bits_per_note']:.4f} |",
             f"| nats per 16th-note step | {lik['nats_per_16th_step']:.4f} |", "",
             f"For scale: Coconet reports {COCONET_NATS_PER_FRAME} nats per 16th-note frame on JSB chorales. "
             + lik["reference"]["note"], "",
             "## Statistics", "",
             "| statistic | training | held-out | samples |", "| --- | --- | --- | --- |"]
    tr, ho, sa = report["train"], report["heldout"], report["samples"]
    for key, label in (("notes_per_bar", "notes per bar"), ("mean_duration_quarters", "mean duration (quarters)"),
                       ("pitch_mean", "mean pitch (MIDI)"), ("pitch_range_mean", "pitch range per piece"),
                       ("in_key_ratio", "in-key ratio"), ("polyphony", "polyphony (notes sounding)"),
                       ("pitch_class_distance", "pitch-class distance to training (TV)")):
        lines.append(f"| {label} | {tr.get(key, '')} | {ho.get(key, '')} | {sa.get(key, '')} |")
    lines += ["", f"Key adherence: {sa['key_adherence']:.0%} of {sa['pieces']} samples of {sa['bars_each']} bars "
              f"(Krumhansl-Schmuckler estimate equals the requested key). "
              f"Generation speed: {sa['music_seconds_per_second']} seconds of music per second.", ""]
    (out_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
