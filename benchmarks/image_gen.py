"""Image generation benchmark; prints ONE JSON object as its last line.

On built-in digits (16x16 grayscale, class-conditional) and shapes (32x32 RGB, caption-conditional):
train each model kind (dcgan, vae, ddpm, with the built-in configs <kind>-<dataset>.yaml) for
--seconds of wall time, then generate --n images and report FID, KID, precision, recall (in the
dataset's project-trained feature space), conditional accuracy (feature-network agreement; on shapes
the exact checker's shape+colour+position accuracy) and sampling images/s.

The same run trains the reference (benchmarks/dcgan_reference.py: the classic PyTorch DCGAN example,
unconditional) on digits for the same wall time and scores it the same way. Targets: best model's
FID <= 0.5x the reference's on digits; >= 90% conditional accuracy on shapes.

--pipeline DIR (a local Stable Diffusion-family pipeline, diffusers folder or single file; "tiny": tiny random
components built here, which checks only the code path) times text-to-image at --pipeline-size with
--pipeline-steps on the best device there is: "pipeline": {"seconds_per_image", ...}. --datasets none skips the rest.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATASETS = {"digits": {"size": 16, "mode": "gray"}, "shapes": {"size": 32, "mode": "rgb", "count": 5000}}


def pipeline_part(args, work: Path) -> dict:
    from aigc import devices
    from aigc.generate.sd import SDParams, SDPipeline

    path = args.pipeline
    if path == "tiny":
        sys.path.insert(0, str(HERE.parent))
        from tests.test_sd import build_tiny_pipeline

        path = build_tiny_pipeline(work / "tiny-sd")
    device = str(devices.resolve("auto"))
    t0 = time.perf_counter()
    sd = SDPipeline.load(path, device=device)
    load_s = time.perf_counter() - t0
    p = SDParams(prompt="a brass table lamp with a linen shade, product photo", negative_prompt="blurry",
                 width=args.pipeline_size, height=args.pipeline_size, steps=args.pipeline_steps, seed=0)
    sd.generate(SDParams(**{**p.__dict__, "steps": 2}))  # warm-up
    t0 = time.perf_counter()
    for i in range(args.pipeline_images):
        p.seed = i
        sd.generate(p)
    per = (time.perf_counter() - t0) / args.pipeline_images
    # LoRA: a few steps on images the pipeline drew, captioned with a trigger word (the first steps are warm-up)
    from aigc.train.sd_lora import LoraConfig
    from aigc.train.sd_lora import train as train_lora

    data = work / "lora-data"
    data.mkdir(exist_ok=True)
    for i, img in enumerate(sd.generate(SDParams(**{**p.__dict__, "n": 2, "steps": 2}))):
        img.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a brass lamp")
    steps = 12
    lora = train_lora(path, data, work / "lora-run", LoraConfig(trigger="sks", max_steps=steps, resolution=args.pipeline_size,
                                                               checkpoint_every=10**6, samples=0), device=device)
    rows = [json.loads(x) for x in (work / "lora-run" / "metrics.jsonl").read_text().splitlines()]
    per_step = (rows[-1]["elapsed_s"] - rows[1]["elapsed_s"]) / (len(rows) - 2)
    return {"path": str(args.pipeline), "class": type(sd.pipe).__name__, "device": device, "size": args.pipeline_size,
            "steps": args.pipeline_steps, "scheduler": p.scheduler, "load_s": round(load_s, 2),
            "seconds_per_image": round(per, 3), "lora_train_s_per_step": round(per_step, 3), "lora_steps": lora["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=240.0, help="training wall time per model")
    ap.add_argument("--datasets", default="digits,shapes")
    ap.add_argument("--models", default="dcgan,vae,ddpm")
    ap.add_argument("--n", type=int, default=1000, help="generated images scored per model")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="config override for every model, e.g. train.precision=bf16")
    ap.add_argument("--keep", type=Path, help="keep the run directories here")
    ap.add_argument("--pipeline", help="a local SD-family pipeline to time (or: tiny)")
    ap.add_argument("--pipeline-size", type=int, default=512)
    ap.add_argument("--pipeline-steps", type=int, default=25)
    ap.add_argument("--pipeline-images", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from aigc.config import load_config, parse_overrides
    from aigc.data.images import ImagePrepareOptions, load_prepared, prepare
    from aigc.eval.image import distribution_scores, evaluate_run, get_feature_net
    from aigc.train.image import ImageTrainConfig, prepare_run, train

    configs = Path(__import__("aigc").__file__).parent / "configs" / "image"
    work = Path(tempfile.mkdtemp(prefix="image-bench-"))
    os.environ.setdefault("AIGC_CACHE_DIR", str(work / "cache"))
    extra = parse_overrides([f"--{s}" for s in args.set])
    result = {"benchmark": "image_gen", "seconds": args.seconds, "n": args.n, "threads": torch.get_num_threads(), "datasets": {}}
    try:
        if args.pipeline:
            result["pipeline"] = pipeline_part(args, work)
            print(json.dumps({"pipeline": result["pipeline"]}), flush=True)
        for ds in [d for d in args.datasets.split(",") if d and d != "none"]:
            data = work / ds
            prepare([], data, ImagePrepareOptions(**DATASETS[ds]), builtin=[ds])
            _, info = get_feature_net(data)
            entry = {"feature_net_heldout_accuracy": info["heldout_accuracy"], "models": {}}
            for kind in args.models.split(","):
                run = (args.keep or work) / f"{kind}-{ds}"
                overrides = {"data": {"path": str(data)}, "train": {"max_seconds": args.seconds, "max_steps": 10**6}}
                for section, values in extra.items():
                    overrides.setdefault(section, {}).update(values)
                cfg = load_config(ImageTrainConfig, configs / f"{kind}-{ds}.yaml", overrides)
                prepare_run(cfg, run, overwrite=True)
                summary = train(cfg, run)
                report = evaluate_run(run, n=args.n)
                m = {"steps": summary["steps"], "train_s": summary["elapsed_s"], **report["scores"],
                     "sampling_images_per_s": report["images_per_s"], "floor_fid": report["real_floor"]["fid"],
                     "conditional_accuracy": report["conditional_accuracy"]}
                if "shapes_checker" in report:
                    m["shapes_checker"] = report["shapes_checker"]
                entry["models"][kind] = m
                print(json.dumps({ds: {kind: m}}), flush=True)
            if ds == "digits" and not args.no_reference:
                import dcgan_reference

                train_split, _, _ = load_prepared(data)
                net, _ = get_feature_net(data)
                gen, counters = dcgan_reference.train(train_split.images, args.seconds)
                t = time.perf_counter()
                fake = dcgan_reference.sample(gen, args.n)
                ref = {**counters, **distribution_scores(net, train_split.images, fake),
                       "sampling_images_per_s": round(args.n / (time.perf_counter() - t), 1)}
                entry["reference_dcgan"] = ref
                best = min(entry["models"].items(), key=lambda kv: kv[1]["fid"])
                entry["best_model"] = best[0]
                entry["fid_ratio_best_vs_reference"] = round(best[1]["fid"] / ref["fid"], 4)
                entry["target_fid_ratio_met"] = entry["fid_ratio_best_vs_reference"] <= 0.5
                print(json.dumps({ds: {"reference_dcgan": ref}}), flush=True)
            if ds == "shapes":
                accs = {k: v["shapes_checker"]["accuracy"] for k, v in entry["models"].items() if "shapes_checker" in v}
                if accs:
                    entry["best_model"] = max(accs, key=accs.get)
                    entry["best_conditional_accuracy"] = accs[entry["best_model"]]
                    entry["target_accuracy_met"] = accs[entry["best_model"]] >= 0.9
            result["datasets"][ds] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
