"""LoRA fine-tuning of a Stable Diffusion-family pipeline on a folder of brand images (``aigc train image lora-sd``).

Data: a folder of images, each with its caption beside it (``NAME.txt``, the kohya/diffusers convention) or in a
``metadata.jsonl`` (``{"file_name": ..., "text": ...}``); images without one are captioned ``a photo of TRIGGER``
(DreamBooth style: ``--lora.trigger``), and ``--lora.trigger`` is put in front of every caption that lacks it.
Images are bucketed by aspect ratio: each is resized and centre-cropped to the bucket (sides multiples of 64, about
``resolution`` squared pixels) nearest its own ratio, and a batch is drawn from one bucket.

Training: the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) get LoRA adapters (peft),
everything else is frozen; the loss is the pipeline's own objective (noise, or velocity for v-prediction models) at a
uniformly drawn timestep. bf16/fp16 autocast on a GPU, gradient checkpointing on request, a checkpoint every
``checkpoint_every`` steps with the optimizer and every random state (``--resume`` continues exactly where it
stopped), metrics in ``metrics.jsonl``, and sample images at the end. The adapter is saved as
``model/pytorch_lora_weights.safetensors`` in the layout diffusers' ``load_lora_weights`` reads.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aigc.errors import UserError
from aigc.run import SDMeta

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ADAPTER = "pytorch_lora_weights.safetensors"


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: int = 8
    trigger: str = ""
    lr: float = 1e-4
    batch_size: int = 1
    max_steps: int = 500
    max_seconds: float = 0.0  # 0: no time budget
    resolution: int = 512
    precision: str = "auto"  # auto (bf16 on GPU), fp32, bf16, fp16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    seed: int = 0
    samples: int = 2  # images drawn with the trained adapter at the end (0: none)

    def validate(self) -> None:
        if not 1 <= self.rank <= 256:
            raise UserError(f"lora.rank must be between 1 and 256, got {self.rank}")
        if self.resolution % 64 or not 64 <= self.resolution <= 2048:
            raise UserError(f"lora.resolution must be a multiple of 64 between 64 and 2048, got {self.resolution}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"lora.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("lora.max_steps and lora.batch_size must be >= 1 and lora.lr > 0")


def load_examples(folder: Path, trigger: str) -> list[tuple[Path, str]]:
    """(image, caption) pairs of ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: not a folder of images")
    captions = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    captions[row["file_name"]] = str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    out = []
    for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        side = img.with_suffix(".txt")
        text = captions.get(img.name) or (side.read_text(encoding="utf-8").strip() if side.is_file() else "")
        if not text:
            if not trigger:
                raise UserError(f"{img.name} has no caption ({side.name} or metadata.jsonl): give one, or --lora.trigger WORD")
            text = f"a photo of {trigger}"
        elif trigger and trigger not in text:
            text = f"{trigger}, {text}"
        out.append((img, text))
    if not out:
        raise UserError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def bucket_for(w: int, h: int, resolution: int) -> tuple[int, int]:
    """The (width, height), multiples of 64 with about resolution^2 pixels, whose ratio is nearest w:h."""
    area, best = resolution * resolution, None
    for bw in range(max(64, resolution // 2 // 64 * 64), resolution * 2 + 1, 64):
        bh = max(64, round(area / bw / 64) * 64)
        score = abs(math.log((bw / bh) / (w / h)))
        if best is None or score < best[0]:
            best = (score, bw, bh)
    return best[1], best[2]


def _load_image(path: Path, size: tuple[int, int]):
    import torch
    from PIL import Image, ImageOps

    try:
        img = Image.open(path).convert("RGB")
    except OSError as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None
    img = ImageOps.fit(img, size, Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x


def train(init_path: str | Path, data: str | Path, run: str | Path, cfg: LoraConfig, config: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, device: str = "auto") -> dict:
    import torch
    from peft import LoraConfig as PeftLora
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from aigc import devices
    from aigc.data import store
    from aigc.generate.sd import SDPipeline, inspect
    from aigc.train.sd import import_pipeline

    cfg.validate()
    run = Path(run)
    ckpt = run / "checkpoints" / "last.pt"
    if resume:
        if not ckpt.is_file():
            raise UserError(f"{run}: nothing to resume (no checkpoints/last.pt); start it without --resume")
        saved = json.loads((run / "lora.json").read_text(encoding="utf-8"))
        init_path, data, config = saved["init_path"], saved["data"], saved["config"]
        cfg = LoraConfig(**{**saved["lora"], "max_steps": cfg.max_steps, "max_seconds": cfg.max_seconds})
    else:
        inspect(Path(init_path))
        store.check_writable(run, overwrite)
    examples = load_examples(Path(data), cfg.trigger)
    dev = devices.resolve(device)
    sd = SDPipeline.load(init_path, device=str(dev), dtype="fp32", config=config)  # before the run is written: it loads
    if not resume:
        import_pipeline(init_path, run, config, overwrite=overwrite,
                        defaults={"width": cfg.resolution, "height": cfg.resolution}, loaded=sd)
        (run / "lora.json").write_text(json.dumps({"init_path": str(Path(init_path).resolve()), "data": str(Path(data).resolve()),
                                                   "config": str(config) if config else None, "lora": asdict(cfg)}, indent=2),
                                       encoding="utf-8")
    pipe = sd.pipe
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the adapter's initial weights, and the VAE's latent samples after them
    unet.add_adapter(PeftLora(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the forward process the UNet was trained on
    prediction = noise_sched.config.get("prediction_type", "epsilon")
    amp = {"auto": torch.bfloat16 if dev.type == "cuda" else None, "fp32": None, "bf16": torch.bfloat16,
           "fp16": torch.float16}[cfg.precision]
    buckets: dict[tuple[int, int], list[int]] = {}
    from PIL import Image

    for i, (path, _) in enumerate(examples):
        with Image.open(path) as im:
            buckets.setdefault(bucket_for(*im.size, cfg.resolution), []).append(i)
    step, rng = 0, random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if resume:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(unet, state["lora"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch"])
    t_start, metrics = time.perf_counter(), (run / "metrics.jsonl").open("a", encoding="utf-8")
    keys = sorted(buckets)
    pixels: dict = {}  # each image read and fitted to its bucket once
    scaler = torch.amp.GradScaler(enabled=amp is torch.float16 and dev.type == "cuda")
    last_loss = float("nan")
    try:
        while step < cfg.max_steps and not (cfg.max_seconds and time.perf_counter() - t_start > cfg.max_seconds):
            key = keys[rng.randrange(len(keys))]
            idx = [buckets[key][rng.randrange(len(buckets[key]))] for _ in range(cfg.batch_size)]
            for i in idx:
                if (i, key) not in pixels:
                    pixels[(i, key)] = _load_image(examples[i][0], key)
            x = torch.stack([pixels[(i, key)] for i in idx]).to(dev)
            ids = tokenizer([examples[i][1] for i in idx], padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(dev)
            with torch.no_grad():
                latents = vae.encode(x).latent_dist.sample(generator=None) * vae.config.scaling_factor
                cond = text_encoder(ids)[0]
            noise = torch.randn(latents.shape, generator=gen).to(dev)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(dev)
            noisy = noise_sched.add_noise(latents, noise, t)
            target = noise_sched.get_velocity(latents, noise, t) if prediction == "v_prediction" else noise
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                pred = unet(noisy, t, cond).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            last_loss = float(loss.detach())
            metrics.write(json.dumps({"step": step, "loss": round(last_loss, 6), "bucket": f"{key[0]}x{key[1]}",
                                      "elapsed_s": round(time.perf_counter() - t_start, 3)}) + "\n")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                _checkpoint(ckpt, unet, opt, step, rng, gen, get_peft_model_state_dict)
    finally:
        metrics.close()
    _checkpoint(ckpt, unet, opt, step, rng, gen, get_peft_model_state_dict)
    _save_adapter(pipe, unet, run)
    meta = SDMeta.load(run)
    meta.lora, meta.trigger, meta.step = ADAPTER, cfg.trigger, step
    meta.save(run / "model")
    samples = []
    if cfg.samples:
        from aigc.generate.sd import SDParams

        prompt = examples[0][1]
        imgs = sd.generate(SDParams(prompt=prompt, n=cfg.samples, steps=meta.steps, width=cfg.resolution,
                                    height=cfg.resolution, seed=cfg.seed, scheduler=meta.scheduler))
        for i, img in enumerate(imgs):
            img.save(run / f"sample-{i}.png")
            samples.append(str(run / f"sample-{i}.png"))
    return {"run": str(run), "kind": "lora-sd", "steps": step, "loss": round(last_loss, 6), "images": len(examples),
            "buckets": [f"{w}x{h}" for w, h in keys], "adapter": str(run / "model" / ADAPTER), "samples": samples,
            "elapsed_s": round(time.perf_counter() - t_start, 2)}


def _checkpoint(path: Path, unet, opt, step: int, rng: random.Random, gen, state_dict_of) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"lora": state_dict_of(unet, save_embedding_layers=False), "opt": opt.state_dict(), "step": step, "rng": rng.getstate(),
                "gen": gen.get_state(), "torch": torch.get_rng_state()}, tmp)
    tmp.replace(path)


def _save_adapter(pipe, unet, run: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, save_embedding_layers=False))
    type(pipe).save_lora_weights(str(run / "model"), unet_lora_layers=layers, safe_serialization=True)
