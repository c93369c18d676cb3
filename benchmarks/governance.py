"""Governance benchmark; prints ONE JSON object as its last line.

(1) Text watermark on the project's own models: a char-small model trained for --train-seconds on
    Tiny Shakespeare and another on Tang poems (or --shakespeare-run / --tang-run). For each:
    - false-positive rate at z >= 4 on human text: --windows windows of 200 tokens from held-out text
      (the last 10% of Tiny Shakespeare; Tang poems the model did not train on), each scored with
      --keys different tenant keys; also the mean and spread of z (should be ~N(0, 1));
    - true-positive rate at 50, 100 and 200 generated tokens: --samples watermarked samples from
      held-out prompts (EOS ignored so every sample reaches 200 tokens), scored on the first L tokens;
    - quality cost: perplexity of the generated tokens under the same model without the bias, for
      watermarked vs unwatermarked samples from the same prompts and seeds.
(2) Image watermark: built-in shapes rendered at 32x32 and upscaled (like served images) to 256 and
    512, each given a random 32-bit payload; coded-bit accuracy and exact payload recovery (after error
    correction and the CRC) on the clean file, after JPEG quality 75, after resizing to half and back
    (the issue's two attacks), and, to show the limits, after JPEG 50, a quarter-size round trip and a
    10% crop scaled back; false matches on unmarked images.
(2b) Audio watermark: Bach chorales from music21's corpus rendered by the built-in synthesizer (44.1 kHz stereo)
    and sentences spoken by eSpeak NG (22.05 kHz mono, English and Chinese; skipped when espeak-ng is missing), each
    cut to --audio-seconds and given a random 32-bit payload: the mark's SNR, then coded-bit accuracy and payload
    recovery on the clean file, after MP3 and AAC at 128 kbit/s, after resampling to 16 kHz and back, and after
    white noise at 30 dB SNR; false matches on --unmarked-clips unmarked clips (other chorale and speech excerpts).
(3) Moderation: precision and recall of the built-in rules (counting blocks, and blocks or flags) and of the classifier (MiniLM embeddings +
    logistic regression, trained on the train split) on the test split of the built-in labelled set,
    per language.
(4) C2PA: sign and verify time of a 256x256 PNG; states of a signed, a tampered and a stripped file.

Needs ../shared/data (benchmark data beside the project) for part 1.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def cli(*args: str, env=None) -> None:
    subprocess.run([sys.executable, "-m", "aigc.cli", *args], check=True, env=env, capture_output=True, text=True)


def train(name: str, source: list[str], seconds: float, work: Path) -> Path:
    corpus, run = work / f"{name}-corpus", work / f"{name}-run"
    cli("data", "prepare", *source, "--out", str(corpus), "--overwrite")
    cli("train", "text", "char-small", "--data", str(corpus), "--run", str(run), "--overwrite", f"--train.max_seconds={seconds}")
    return run


def windows(ids: list[int], length: int, count: int, rng: random.Random) -> list[list[int]]:
    starts = [rng.randrange(0, len(ids) - length) for _ in range(count)]
    return [ids[s : s + length] for s in starts]


def nll_of_continuations(model, prompts: list[list[int]], conts: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            if not c:
                continue
            x = torch.tensor([p + c])
            logits = model(input_ids=x).logits[0, len(p) - 1 : -1].float()
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(c), reduction="sum").item()
            count += len(c)
    return total / max(1, count)


def text_part(run: Path, human_ids: list[int], args, rng: random.Random) -> dict:
    from aigc.generate.text import SamplingParams, TextGenerator
    from aigc.govern import text_watermark as tw

    gen = TextGenerator.from_path(run)
    tok = gen.tokenizer
    vocab = len(tok)
    keys = [rng.randrange(2**32) for _ in range(args.keys)]
    # (a) human text
    zs = []
    hits = []
    for w in windows(human_ids, 200, args.windows, rng):
        for k in keys:
            d = tw.detect(w, k, vocab)
            zs.append(d.z)
            hits.append(d.detected)
    zs_arr = np.array(zs)
    human = {"windows": args.windows, "keys": args.keys, "scores": len(zs), "tokens_per_window": 200,
             "false_positive_rate": float(np.mean(hits)), "z_mean": round(float(zs_arr.mean()), 3),
             "z_std": round(float(zs_arr.std()), 3), "z_max": round(float(zs_arr.max()), 3)}
    # (b) generated text, watermarked and not, from the same held-out prompts and seeds
    prompts = [w[:32] for w in windows(human_ids, 32, args.samples, rng)]
    key = keys[0]
    outs: dict[str, list[list[int]]] = {"watermarked": [], "plain": []}
    t0 = time.perf_counter()
    for mode in outs:
        for i, p in enumerate(prompts):
            params = SamplingParams(max_new_tokens=200, temperature=1.0, seed=1000 + i, ignore_eos=True,
                                    watermark=tw.Watermark(key) if mode == "watermarked" else None)
            text = gen.generate([tok.decode(p)], params)[0].text
            outs[mode].append(tok(text, add_special_tokens=False)["input_ids"])
    gen_s = time.perf_counter() - t0
    tpr = {}
    for L in (50, 100, 200):
        d_wm = [tw.detect(ids[:L], key, vocab) for ids in outs["watermarked"]]
        d_plain = [tw.detect(ids[:L], key, vocab) for ids in outs["plain"]]
        tpr[str(L)] = {"true_positive_rate": float(np.mean([d.detected for d in d_wm])),
                       "z_median": round(float(np.median([d.z for d in d_wm])), 3),
                       "scored_median": int(np.median([d.scored for d in d_wm])),
                       "unwatermarked_false_positive_rate": float(np.mean([d.detected for d in d_plain])),
                       "unwatermarked_z_max": round(float(max(d.z for d in d_plain)), 3)}
    model = gen.model
    nll_wm = nll_of_continuations(model, prompts, outs["watermarked"])
    nll_plain = nll_of_continuations(model, prompts, outs["plain"])
    return {"vocab": vocab, "context_tokens": tw.context_width(vocab), "gamma": tw.GAMMA, "delta": tw.DELTA,
            "threshold_z": tw.Z_THRESHOLD, "human_text": human, "generated": {"samples": args.samples, "by_length": tpr},
            "quality": {"ppl_plain": round(math.exp(nll_plain), 3), "ppl_watermarked": round(math.exp(nll_wm), 3),
                        "ppl_rise_pct": round(100 * (math.exp(nll_wm - nll_plain) - 1), 2)},
            "generation_s": round(gen_s, 2)}


def image_part(args, rng: random.Random) -> dict:
    from PIL import Image

    from aigc.data import shapes
    from aigc.generate.image import to_pil, upscale
    from aigc.govern import image_watermark as iw

    images, _ = shapes.generate(args.images, 32, seed=3)
    out = {}
    for side in (256, 512):
        acc = {"clean": [], "jpeg75": [], "resize_half_and_back": [], "jpeg50": [], "resize_quarter_and_back": [],
               "crop_10pct_and_back": []}
        ok = {k: [] for k in acc}
        false_matches = 0
        t_embed = t_extract = 0.0
        for img in images:
            base = to_pil(upscale(img, side))
            wm_id = rng.randrange(2**32)
            t0 = time.perf_counter()
            marked = iw.embed(base, wm_id)
            t_embed += time.perf_counter() - t0
            def jpeg(q):
                buf = io.BytesIO()
                marked.save(buf, "JPEG", quality=q)
                return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

            def resized(f):
                return marked.resize((side // f, side // f), Image.Resampling.BILINEAR).resize((side, side), Image.Resampling.BILINEAR)
            m = side // 20  # 5% off each edge, then scaled back to the original size
            variants = {"clean": marked, "jpeg75": jpeg(75), "resize_half_and_back": resized(2), "jpeg50": jpeg(50),
                        "resize_quarter_and_back": resized(4),
                        "crop_10pct_and_back": marked.crop((m, m, side - m, side - m)).resize((side, side), Image.Resampling.BILINEAR)}
            for name, v in variants.items():
                acc[name].append(iw.bit_accuracy(v, wm_id))
                t0 = time.perf_counter()
                got = iw.extract(v)
                t_extract += time.perf_counter() - t0
                ok[name].append(got.found and got.watermark_id == wm_id)
            false_matches += iw.extract(base).found
        n = len(images)
        out[str(side)] = {"images": n, **{name: {"bit_accuracy": round(float(np.mean(acc[name])), 4),
                                                 "payload_recovered": round(float(np.mean(ok[name])), 4)} for name in acc},
                          "false_matches_on_unmarked": false_matches, "embed_ms": round(1000 * t_embed / n, 1),
                          "extract_ms": round(1000 * t_extract / (len(acc) * n), 1)}
    return out


SENTENCES = {
    "en": ["The harbor lamp is made of brass and has a linen shade with a soft dimmer switch.",
           "Lesson four: read the passage aloud, then answer the three questions about the story.",
           "Our autumn collection brings warm colours, soft wool and simple lines to every room.",
           "Please listen carefully and repeat each word after the speaker, slowly and clearly.",
           "This week only, every order over fifty euros ships free to anywhere in Europe."],
    "zh": ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "欢迎来到我们的新店，今天所有的茶具都打八折。",
           "请大声朗读课文，然后回答下面的三个问题。", "这款台灯采用黄铜制作，配有亚麻灯罩和调光开关。"],
}


def audio_clips(count: int, seconds: float, offset: int) -> list[tuple[np.ndarray, int, str]]:
    """``count`` clips of ``seconds``: chorale renders and (where eSpeak NG is installed) speech, alternating."""
    import shutil

    from aigc.data.audio import read_wav
    from aigc.data.music import builtin_chorale_paths, read_score
    from aigc.generate.music import SAMPLE_RATE, synthesize

    paths = builtin_chorale_paths()
    voices = [(lang, text) for lang, texts in SENTENCES.items() for text in texts]
    speak = shutil.which("espeak-ng")
    clips = []
    i = offset
    while len(clips) < count:
        i += 1
        if speak and i % 2:
            lang, text = voices[i % len(voices)]
            speed = 130 + 10 * (i % 5)
            wav = subprocess.run([speak, "-v", "cmn" if lang == "zh" else "en-us", "-s", str(speed), "--stdout",
                                  " ".join([text] * 4)], capture_output=True, check=True).stdout
            audio, rate = read_wav(wav)
            kind = f"speech-{lang}"
        else:
            piece = read_score(paths[i % len(paths)])
            audio, rate, kind = synthesize(piece, 70 + 10 * (i % 5)), SAMPLE_RATE, "music"
        start = int((i % 3) * rate)  # a different excerpt of the same source each time round
        clip = audio[start: start + int(seconds * rate)]
        if len(clip) >= int(seconds * rate) * 0.9:
            clips.append((clip, rate, kind))
    return clips


def audio_part(args, rng: random.Random) -> dict:
    from aigc.data import audio as aio
    from aigc.govern import audio_watermark as aw

    key = bytes(rng.randrange(256) for _ in range(32))
    clips = audio_clips(args.audio_clips, args.audio_seconds, 0)
    attacks = {
        "clean": lambda a, r: (a, r),
        "mp3_128k": lambda a, r: aio.decode(aio.encode(a, r, "mp3", 128_000)),
        "aac_128k": lambda a, r: aio.decode(aio.encode(a, r, "m4a", 128_000)),
        "resample_16k": lambda a, r: (aw._resample(aw._resample(a.astype(np.float64), r, 16000), 16000, r), r),
        "noise_30db": lambda a, r: (a + np.random.default_rng(len(a)).normal(
            0, np.sqrt(np.mean(a.astype(np.float64) ** 2) / 1000), a.shape), r),
    }
    acc = {k: [] for k in attacks}
    ok = {k: [] for k in attacks}
    snr, kinds, t_embed, t_extract = [], {}, 0.0, 0.0
    for audio, rate, kind in clips:
        kinds[kind] = kinds.get(kind, 0) + 1
        wm_id = rng.randrange(2**32)
        t0 = time.perf_counter()
        marked = aw.embed(audio, rate, wm_id, key)
        t_embed += time.perf_counter() - t0
        snr.append(aw.snr_db(audio, marked))
        for name, attack in attacks.items():
            a, r = attack(marked, rate)
            soft, _, _ = aw.soft_bits(a, r, key)
            acc[name].append(float(((soft > 0.5).astype(int) == aw.encode_payload(wm_id)).mean()))
            t0 = time.perf_counter()
            got = aw.extract(a, r, key)
            t_extract += time.perf_counter() - t0
            ok[name].append(got.found and got.watermark_id == wm_id)
    unmarked = audio_clips(args.unmarked_clips, args.audio_seconds, 10_000)
    false_matches = sum(aw.extract(a, r, key).found for a, r, _ in unmarked)
    n = len(clips)
    return {"clips": n, "kinds": kinds, "seconds": args.audio_seconds,
            "snr_db": {"mean": round(float(np.mean(snr)), 2), "min": round(float(np.min(snr)), 2)},
            **{name: {"bit_accuracy": round(float(np.mean(acc[name])), 4), "payload_recovered": round(float(np.mean(ok[name])), 4)}
               for name in attacks},
            "unmarked_clips": len(unmarked), "false_matches_on_unmarked": false_matches,
            "embed_ms": round(1000 * t_embed / n, 1), "extract_ms": round(1000 * t_extract / (n * len(attacks)), 1),
            "targets_met": bool(min(np.mean(acc[k]) for k in attacks) >= 0.99 and min(np.mean(ok[k]) for k in attacks) >= 0.98
                                and false_matches == 0 and np.min(snr) >= 35)}


def moderation_part() -> dict:
    from aigc.cli import BUILTIN_MODERATION
    from aigc.govern import moderation as m

    rows = m.read_labelled(BUILTIN_MODERATION)
    train_rows = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    pol = m.default_policy()
    t0 = time.perf_counter()
    clf = m.Classifier.train([r["text"] for r in train_rows], [r["label"] for r in train_rows])
    train_s = time.perf_counter() - t0
    scores = clf.score([r["text"] for r in test])
    out = {"train_examples": len(train_rows), "test_examples": len(test), "classifier_train_s": round(train_s, 1)}
    for lang in ("all", "en", "zh"):
        sub = [(r, s) for r, s in zip(test, scores) if lang == "all" or r["lang"] == lang]
        labels = [r["label"] for r, _ in sub]
        actions = [pol.check(r["text"], "input").action for r, _ in sub]
        out[lang] = {"rules_block": m.precision_recall(labels, [int(a == "block") for a in actions]),
                     "rules_block_or_flag": m.precision_recall(labels, [int(a in ("block", "flag")) for a in actions]),
                     "classifier": m.precision_recall(labels, [int(s >= 0.5) for _, s in sub])}
    return out


def c2pa_part(work: Path) -> dict:
    from PIL import Image

    from aigc.govern.c2pa import Provenance

    prov = Provenance.from_home(work / "home")
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (30, 120, 200)).save(buf, "PNG")
    t0 = time.perf_counter()
    signed = prov.sign(buf.getvalue(), "image/png", prov.manifest("bench.png", "bench", "v1"))
    sign_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    state = prov.verify(signed).state
    verify_ms = 1000 * (time.perf_counter() - t0)
    img = Image.open(io.BytesIO(signed))
    img.load()
    px = img.copy()
    px.putpixel((5, 5), (0, 0, 0))
    stripped = io.BytesIO()
    px.save(stripped, "PNG")
    # tampered: same container (manifest kept), pixel data changed
    raw = bytearray(signed)
    idat = raw.find(b"IDAT")
    raw[idat + 20] ^= 0x55
    return {"sign_ms": round(sign_ms, 1), "verify_ms": round(verify_ms, 1), "signed": state,
            "tampered": prov.verify(bytes(raw)).state, "stripped": prov.verify(stripped.getvalue()).state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seconds", type=float, default=300, help="training budget per text model")
    ap.add_argument("--shakespeare-run", type=Path, help="reuse a char model trained on Tiny Shakespeare")
    ap.add_argument("--tang-run", type=Path, help="reuse a char model trained on Tang poems")
    ap.add_argument("--windows", type=int, default=200, help="human text windows per corpus")
    ap.add_argument("--keys", type=int, default=5, help="tenant keys each window is scored with")
    ap.add_argument("--samples", type=int, default=100, help="generated samples per model")
    ap.add_argument("--images", type=int, default=50, help="images per size")
    ap.add_argument("--audio-clips", type=int, default=60, help="marked audio clips (music and speech)")
    ap.add_argument("--audio-seconds", type=float, default=8.0, help="length of each audio clip")
    ap.add_argument("--unmarked-clips", type=int, default=500, help="unmarked clips read for false matches")
    ap.add_argument("--parts", default="text,image,audio,moderation,c2pa")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    rng = random.Random(0)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    result: dict = {"benchmark": "governance", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["AIGC_HOME"] = str(work / "home")
        if "text" in parts:
            if not DATA.is_dir():
                raise SystemExit(f"{DATA} not found: the text part needs the benchmark data")
            from transformers import AutoTokenizer

            text = (DATA / "tinyshakespeare" / "input.txt").read_text()
            cut = int(len(text) * 0.9)
            poems = [json.loads(line)["text"] for line in (DATA / "tang-poems" / "tang.jsonl").read_text().splitlines()]
            if args.shakespeare_run is None:
                (work / "shakespeare-train.txt").write_text(text[:cut])
                args.shakespeare_run = train("shakespeare", [str(work / "shakespeare-train.txt")], args.train_seconds, work)
            if args.tang_run is None:
                (work / "tang-train.jsonl").write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n"
                                                               for p in poems[: int(len(poems) * 0.9)]))
                args.tang_run = train("tang", [str(work / "tang-train.jsonl"), "--field", "text"], args.train_seconds, work)
            held_poems = "\n".join(poems[int(len(poems) * 0.98):])  # poems after the 90% training cut
            result["text_watermark"] = {}
            for name, run, human in (("tinyshakespeare", args.shakespeare_run, text[cut:]), ("tang_poems", args.tang_run, held_poems)):
                folder = run / "model" if (run / "model").is_dir() else run
                ids = AutoTokenizer.from_pretrained(str(folder))(human, add_special_tokens=False)["input_ids"]
                result["text_watermark"][name] = text_part(run, ids, args, rng)
        if "image" in parts:
            result["image_watermark"] = image_part(args, rng)
        if "audio" in parts:
            result["audio_watermark"] = audio_part(args, rng)
            print(json.dumps({"audio_watermark": result["audio_watermark"]}), flush=True)
        if "moderation" in parts:
            result["moderation"] = moderation_part()
        if "c2pa" in parts:
            result["c2pa"] = c2pa_part(work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
