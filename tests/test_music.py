"""Music: score reading, event tokens, the grammar, training, constrained generation, rendering, evaluation."""
import io
import json

import numpy as np
import pytest

from aigc.data.music import (Grammar, MusicPrepareOptions, Piece, Vocab, load_prepared, parse_key, prepare, read_score)
from aigc.errors import UserError


def _midi_file(path, notes, tempo=120.0, ts=(3, 4)):
    """Write a MIDI file with (start_quarters, duration_quarters, pitch) notes in one track."""
    import pretty_midi

    pm = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    pm.time_signature_changes.append(pretty_midi.TimeSignature(ts[0], ts[1], 0))
    inst = pretty_midi.Instrument(program=0, name="melody")
    spq = 60.0 / tempo
    for start, dur, pitch in notes:
        inst.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=start * spq, end=(start + dur) * spq))
    pm.instruments.append(inst)
    pm.write(str(path))


def test_midi_file_is_read_on_the_grid(tmp_path):
    scale = [(i * 0.5, 0.5, p) for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72])] + [(4.0, 2.0, 72)]
    _midi_file(tmp_path / "scale.mid", scale, tempo=144, ts=(3, 4))
    piece = read_score(tmp_path / "scale.mid")
    assert piece.time_signature == "3/4" and piece.tempo == 144
    assert [n[2] for n in piece.notes] == [60, 62, 64, 65, 67, 69, 71, 72, 72]
    assert [n[0] for n in piece.notes] == [0, 2, 4, 6, 8, 10, 12, 14, 16]  # 8th notes on a 16th grid
    assert piece.notes[-1][3] == 8  # a half note is 8 sixteenths
    assert (piece.tonic, piece.mode) == (0, "major")  # the key is estimated when the file names none


def test_tokens_round_trip_and_obey_the_grammar(music_data):
    train, val, manifest = load_prepared(music_data)
    v = Vocab()
    for piece in train + val:
        ids = v.encode(piece)
        assert v.decode(ids).notes == piece.notes
        g = Grammar(v, piece.time_signature, len(piece.voices))
        for i in ids:
            if g.state != "start" or v.kind(i) == "Bar":
                assert g.allowed()[i], f"{v.tokens[i]} refused in state {g.state}"
            g.advance(i)
    assert manifest["augment"]["transpose"] == [-1, 1]
    assert manifest["pieces"]["train"] + manifest["pieces"]["val"] == 6


def test_transposition_moves_key_and_pitches_and_respects_the_range():
    p = Piece("x", 7, "major", "4/4", 96, ["s"], [[0, 0, 67, 4], [4, 0, 71, 4]])
    up = p.transposed(3)
    assert up.tonic == 10 and [n[2] for n in up.notes] == [70, 74]
    assert Piece("x", 0, "major", "4/4", 96, ["s"], [[0, 0, 107, 4]]).transposed(2) is None


@pytest.mark.parametrize("text,expected", [("G major", (7, "major")), ("e minor", (4, "minor")), ("Bb", (10, "major")),
                                           ("F#m", (6, "minor")), ("Db_major", (1, "major"))])
def test_parse_key(text, expected):
    assert parse_key(text) == expected


@pytest.mark.parametrize("bad", ["H major", "C lydian", ""])
def test_parse_key_errors(bad):
    with pytest.raises(UserError):
        parse_key(bad)


def test_unreadable_files_are_skipped_and_named(tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    _midi_file(folder / "good.mid", [(i, 1, 60 + i) for i in range(12)], ts=(4, 4))
    (folder / "broken.mid").write_bytes(b"MThd garbage")
    (folder / "empty.xml").write_bytes(b"")
    manifest = prepare([folder], tmp_path / "out", MusicPrepareOptions(val_fraction=0.0, transpose=[0, 0]))
    assert manifest["pieces"] == {"read": 3, "skipped": 2, "train": 1, "val": 0}
    reasons = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"broken.mid", "empty.xml"} and reasons["empty.xml"] == "empty file"
    with pytest.raises(UserError, match="no usable scores: 2 skipped"):
        (folder / "good.mid").unlink()
        prepare([folder], tmp_path / "out2", MusicPrepareOptions())
    assert not (tmp_path / "out2").exists()


def test_prepare_refuses_bad_options(tmp_path):
    with pytest.raises(UserError, match="transpose"):
        prepare([], tmp_path / "o", MusicPrepareOptions(transpose=[3, -3]), builtin=["chorales"])
    with pytest.raises(UserError, match="unknown built-in music"):
        prepare([], tmp_path / "o", MusicPrepareOptions(), builtin=["mozart"])


# ---------------------------------------------------------------- the model

def test_run_is_a_standard_checkpoint(music_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(music_model / "model"))
    tok = AutoTokenizer.from_pretrained(str(music_model / "model"))
    ids = tok("<bos> Key_G_major TimeSig_4/4 Tempo_96 Bar Pos_0 Voice_0 Pitch_67 Dur_4")["input_ids"]
    v = Vocab()
    assert ids == [v.index[t] for t in "<bos> Key_G_major TimeSig_4/4 Tempo_96 Bar Pos_0 Voice_0 Pitch_67 Dur_4".split()]
    assert model.config.vocab_size == len(v)
    steps = [json.loads(line)["step"] for line in (music_model / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
    assert (music_model / "loss.png").is_file()
    meta = json.loads((music_model / "model" / "aigc_music.json").read_text())
    assert meta["time_signature"] == "4/4" and len(meta["voices"]) >= 4


def test_resume_gives_the_same_losses(tmp_path, music_data):
    from aigc.config import load_config
    from aigc.train.music import MusicTrainConfig, prepare_run, train

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    base = {"data": {"path": str(music_data)}, "train": {"samples": 0, "max_steps": 12, "checkpoint_interval": 6, "eval_interval": 6}}
    cfg = load_config(MusicTrainConfig, "src/aigc/configs/music/tiny.yaml", base)
    prepare_run(cfg, tmp_path / "a")
    train(cfg, tmp_path / "a")
    short = load_config(MusicTrainConfig, "src/aigc/configs/music/tiny.yaml", {**base, "train": {**base["train"], "max_steps": 6}})
    prepare_run(short, tmp_path / "b")
    train(short, tmp_path / "b")
    train(cfg, tmp_path / "b", resume=True)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_generation_controls(music_model):
    from aigc.generate.music import MusicParams, MusicPipeline

    pipe = MusicPipeline.from_run(music_model)
    v = pipe.vocab
    r = pipe.generate(MusicParams(bars=3, key="D minor", tempo=80, seed=3))
    assert r.tokens[1] == v.index["Key_D_minor"] and r.tokens[3] == v.index["Tempo_80"]
    assert sum(t == v.bar for t in r.tokens) == 3
    assert (r.piece.tonic, r.piece.mode, r.tempo) == (2, "minor", 80)
    g = Grammar(v, "4/4", len(pipe.meta.voices))
    for t in r.tokens:
        g.advance(t)  # every sampled token was allowed when drawn; the decoded piece matches the tokens
    assert v.decode(r.tokens).notes == r.piece.notes
    again = pipe.generate(MusicParams(bars=3, key="D minor", tempo=80, seed=3))
    assert again.tokens == r.tokens
    other = pipe.generate(MusicParams(bars=3, key="D minor", tempo=80, seed=4))
    assert other.tokens != r.tokens
    # length by seconds: 4/4 at 120 bpm is 2 s a bar, so 5 s needs 3 bars
    assert sum(t == v.bar for t in pipe.generate(MusicParams(seconds=5, tempo=120, seed=1)).tokens) == 3
    with pytest.raises(UserError):
        pipe.generate(MusicParams(time_signature="7/8"))


def test_primer_continuation_keeps_and_transposes_the_primer(music_model, music_data):
    from aigc.generate.music import MusicParams, MusicPipeline

    pipe = MusicPipeline.from_run(music_model)
    train, _, _ = load_prepared(music_data)
    primer = next(p for p in train if p.time_signature == "4/4")
    bar = primer.bar_ticks
    short = Piece(primer.source, primer.tonic, primer.mode, "4/4", primer.tempo, primer.voices,
                  [n for n in primer.notes if n[0] < 2 * bar])
    params = MusicParams(bars=2, seed=0)
    params.primer = short
    r = pipe.generate(params)
    assert r.primer_bars == 2 and sum(t == pipe.vocab.bar for t in r.tokens) == 4
    assert r.piece.notes[: len(short.notes)] == short.notes
    params = MusicParams(bars=1, seed=0, key="C major" if short.mode == "major" else "A minor")
    params.primer = short
    moved = pipe.generate(params)
    shift = moved.piece.notes[0][2] - short.notes[0][2]
    assert moved.piece.tonic in (0, 9) and abs(shift) <= 6
    assert [n[2] - shift for n in moved.piece.notes[: len(short.notes)]] == [n[2] for n in short.notes]


def test_nll_windows_match_a_full_pass(music_model, music_data):
    import torch

    from aigc.generate.music import MusicPipeline

    pipe = MusicPipeline.from_run(music_model)
    _, val, _ = load_prepared(music_data)
    ids = Vocab().encode(val[0])[: pipe.block]
    with torch.no_grad():
        logp = torch.log_softmax(pipe.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    direct = -float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert pipe.nll(ids) == pytest.approx(direct, rel=1e-5)
    longer = Vocab().encode(val[0])[: 3 * pipe.block]
    assert len(longer) > 2 * pipe.block
    total = pipe.nll(longer)
    assert 0 < total / (len(longer) - 1) < np.log(len(Vocab())) + 1
    assert total > pipe.nll(longer[: 2 * pipe.block])  # windows only add the newer tokens' NLL
    # past the first block, a token is scored after the header and the previous half block
    ids = longer[: pipe.block + 5]
    begin = pipe.block - pipe.block // 2
    window = torch.tensor(ids[:4] + ids[begin:])
    with torch.no_grad():
        logp = torch.log_softmax(pipe.model(input_ids=window[None]).logits[0].float(), -1)
    tail = -sum(float(logp[4 + j - begin - 1, ids[j]]) for j in range(pipe.block, len(ids)))
    assert pipe.nll(ids) == pytest.approx(pipe.nll(ids[: pipe.block]) + tail, rel=1e-5)


def test_training_windows_start_with_the_piece_header(music_model):
    from aigc.train.music import get_batch

    v = Vocab()
    data = np.fromfile(music_model / "data" / "train.bin", dtype=np.uint16)
    starts = np.flatnonzero(data == v.bos)
    x, y = get_batch(data, starts, 32, 3000, seed=1, step=0)  # ~1 in 200 windows starts at a header
    assert (x[:, 0] == v.bos).all() and all(v.kind(int(k)) == "Key" for k in x[:, 1])
    cut = (y[:, 0] == -100).numpy()  # windows that began inside a piece: no loss on the header
    assert cut.any() and (y[cut, :4] == -100).all() and (x[cut, 5:] == y[cut, 4:-1]).all()
    whole = ~cut  # windows that began at a piece's start are plain shifted copies
    assert whole.any() and (x[whole, 1:] == y[whole, :-1]).all()
    again, _ = get_batch(data, starts, 32, 3000, seed=1, step=0)
    assert (again == x).all()


def test_midi_and_wav_rendering():
    import pretty_midi

    from aigc.data.audio import read_wav
    from aigc.generate.music import SAMPLE_RATE, render_wav, to_midi

    piece = Piece("t", 9, "minor", "4/4", 120, ["a", "b"], [[0, 0, 69, 8], [0, 1, 57, 8], [8, 0, 72, 8]])
    midi = pretty_midi.PrettyMIDI(io.BytesIO(to_midi(piece, 120)))
    assert [len(i.notes) for i in midi.instruments] == [2, 1]
    assert midi.get_tempo_changes()[1][0] == pytest.approx(120)
    assert midi.instruments[0].notes[1].start == pytest.approx(1.0)  # 8 sixteenths at 120 bpm
    assert midi.key_signature_changes[0].key_number == 9 + 12  # A minor
    wav, synth = render_wav(Piece("t", 9, "major", "4/4", 120, ["a"], [[0, 0, 69, 16]]), 120, synth="builtin")
    audio, rate = read_wav(wav)
    assert synth == "builtin" and rate == SAMPLE_RATE == 44100 and audio.shape[1] == 2
    assert audio.shape[0] / rate == pytest.approx(2.0 + 0.2, abs=0.01)  # two seconds + release + tail
    spectrum = np.abs(np.fft.rfft(audio[: rate, 0]))
    assert np.fft.rfftfreq(rate, 1 / rate)[spectrum.argmax()] == pytest.approx(440, abs=3)
    assert 0.8 < np.abs(audio).max() <= 0.9
    with pytest.raises(UserError, match="unknown synthesizer"):
        render_wav(piece, 120, synth="casio")


def test_eval_report(music_model):
    from aigc.eval.music import evaluate_run, estimate_key

    report = evaluate_run(music_model, n_samples=2, bars=2)
    lik = report["likelihood"]
    assert lik["nats_per_note"] > lik["nats_per_token"] > 0 and lik["notes"] > 0
    assert report["heldout"]["in_key_ratio"] > 0.85 and report["train"]["polyphony"] > 2.5
    assert 0 <= report["samples"]["pitch_class_distance"] <= 1
    assert (music_model / "eval" / "report.md").read_text().count("nats per note") == 1
    c_major = Piece("t", 0, "major", "4/4", 96, ["a"], [[i * 4, 0, p, 4] for i, p in enumerate([60, 64, 67, 72, 65, 69, 62, 67, 71, 60])])
    assert estimate_key(c_major) == (0, "major")
