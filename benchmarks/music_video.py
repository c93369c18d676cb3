"""Music and video benchmark; prints ONE JSON object as its last line.

(1) Music: all built-in Bach chorales (music21's corpus) prepared with transposition -5..+6, the
    chorale-small config trained for --seconds; then, on the held-out chorales as written:
    NLL per event token, per note and per 16th-note step; statistics of --samples generated pieces
    of 8 bars (in-key ratio, pitch-class distance, polyphony, key adherence) next to the held-out
    pieces'; generation speed in seconds of music per second of sampling, and the built-in
    synthesizer's speed (audio seconds rendered per second).
(2) Video: a caption-conditional VAE trained for --image-seconds on built-in shapes renders a
    10-second 256x256 clip at 12 fps (3 scenes from the prompt, latent interpolation, the music model's
    soundtrack, H.264 + AAC); composition time by stage, and how often the frames' watermark can be
    read back from the encoded video in 4:2:0 (the default) and 4:4:4.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300, help="music training budget")
    ap.add_argument("--image-seconds", type=float, default=60, help="image (VAE) training budget for the video part")
    ap.add_argument("--count", type=int, default=0, help="chorales to use (0: all)")
    ap.add_argument("--samples", type=int, default=8, help="generated pieces for the statistics")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args()

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import av

    from aigc.config import load_config
    from aigc.data.images import ImagePrepareOptions
    from aigc.data.images import prepare as prepare_images
    from aigc.data.music import MusicPrepareOptions, prepare
    from aigc.eval.music import evaluate_run
    from aigc.generate.music import MusicParams, MusicPipeline, render_wav
    from aigc.generate.video import VideoParams, compose
    from aigc.govern import image_watermark
    from aigc.train.image import ImageTrainConfig
    from aigc.train.image import prepare_run as prepare_image_run
    from aigc.train.image import train as train_image
    from aigc.train.music import MusicTrainConfig, prepare_run, train

    work = args.work or Path(tempfile.mkdtemp(prefix="aigc-bench-mv-"))
    configs = Path(__file__).parents[1] / "src" / "aigc" / "configs"
    out: dict = {"benchmark": "music_video", "cpus": os.cpu_count()}

    t = time.perf_counter()
    manifest = prepare([], work / "chorales", MusicPrepareOptions(limit=args.count), builtin=["chorales"], overwrite=True)
    prep_s = time.perf_counter() - t
    cfg = load_config(MusicTrainConfig, configs / "music" / "chorale-small.yaml",
                      {"data": {"path": str(work / "chorales")}, "train": {"max_seconds": args.seconds, "samples": 0}})
    prepare_run(cfg, work / "music", overwrite=True)
    summary = train(cfg, work / "music")
    report = evaluate_run(work / "music", n_samples=args.samples, bars=8)
    lik, sa, ho = report["likelihood"], report["samples"], report["heldout"]
    pipe = MusicPipeline.from_run(work / "music")
    piece = pipe.generate(MusicParams(bars=16, seed=1))
    t = time.perf_counter()
    render_wav(piece.piece, piece.tempo, synth="builtin")
    synth_s = time.perf_counter() - t
    out["music"] = {
        "pieces": manifest["pieces"], "prepare_s": round(prep_s, 1), "train_tokens": summary["train_tokens"],
        "train_seconds": summary["elapsed_s"], "steps": summary["steps"], "parameters": summary["parameters"],
        "train_tokens_per_s": summary["tokens_per_s"], "best_val_loss": round(summary["best_val_loss"], 4),
        "heldout": {k: lik[k] for k in ("pieces", "notes", "nats_per_token", "nats_per_note", "bits_per_note", "nats_per_16th_step")},
        "coconet_nats_per_16th_frame": 0.57,
        "samples": {k: sa[k] for k in ("pieces", "notes_per_bar", "in_key_ratio", "pitch_class_distance", "polyphony",
                                       "mean_duration_quarters", "key_adherence")},
        "heldout_stats": {k: ho[k] for k in ("notes_per_bar", "in_key_ratio", "pitch_class_distance", "polyphony", "mean_duration_quarters")},
        "generation_music_s_per_s": sa["music_seconds_per_second"],
        "synth_audio_s_per_s": round(piece.seconds / synth_s, 1),
    }

    prepare_images([], work / "shapes", ImagePrepareOptions(size=32, count=3000), builtin=["shapes"], overwrite=True)
    icfg = load_config(ImageTrainConfig, configs / "image" / "vae-shapes.yaml",
                       {"data": {"path": str(work / "shapes")}, "train": {"max_seconds": args.image_seconds}})
    prepare_image_run(icfg, work / "vae", overwrite=True)
    train_image(icfg, work / "vae")
    prompt = "a large red circle at top left; then a small blue square at bottom right; then a green triangle in the center"
    video = {}
    for chroma in ("420", "444"):
        t = time.perf_counter()
        r = compose(work / "vae", work / f"video-{chroma}", VideoParams(prompt=prompt, seconds=10, fps=12, size=256, seed=3, chroma=chroma),
                    music_run=work / "music", overwrite=True)
        total = time.perf_counter() - t
        found = checked = 0
        with av.open(io.BytesIO(r.mp4)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i % 6 == 0:
                    checked += 1
                    found += image_watermark.extract(frame.to_image()).watermark_id == r.watermark_id
        video[chroma] = {"compose_s": round(total, 2), "stages": r.timings, "frames": r.frames, "mp4_bytes": len(r.mp4),
                         "watermark_frames_read": round(found / checked, 3), "frames_checked": checked}
    out["video"] = {"seconds": 10, "fps": 12, "size": 256, "scenes": 3, "image_model": "vae-shapes 32x32",
                    "yuv420p": video["420"], "yuv444p": video["444"],
                    "realtime_factor": round(10 / video["420"]["compose_s"], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
