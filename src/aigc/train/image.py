"""Image training: the config, the run directory, and what the three loops (gan, vae, diffusion) share.

``train`` hands the run to the loop of its model kind (``train/gan.py``, ``train/vae.py``,
``train/diffusion.py``); each is one explicit loop with the text engine's conventions: the batch and
the noise of step s depend only on (seed, s), checkpoints are atomic, so a run killed with ``kill -9``
and resumed logs what an uninterrupted run logs.

Run directory layout::

    config.yaml            resolved config (resume reads only this)
    dataset/manifest.json  the prepared dataset's manifest
    data/                  the prepared arrays (train/val .npz + .jsonl), copied so the run stands alone
    model/                 aigc_image.json + weights (see generate/image.py), rewritten at each checkpoint
    checkpoints/last.pt    resume state
    samples/step-NNNNNN.png a sample grid every train.sample_interval steps; samples.png is the last
    metrics.jsonl  tb/  loss.png  summary.json
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from aigc import devices, distributed, threads
from aigc.config import save_yaml
from aigc.errors import UserError
from aigc.models.dcgan import DCGANConfig
from aigc.models.diffusion import DiffusionConfig
from aigc.models.vae import VAEConfig


@dataclass
class ImageDataConfig:
    path: str = ""  # a folder written by `aigc data prepare --kind image`


@dataclass
class ImageModelConfig:
    kind: Literal["dcgan", "vae", "ddpm"] = "ddpm"
    # auto: caption if the dataset has captions, else class if it has classes, else none
    condition: Literal["auto", "none", "class", "caption"] = "auto"


@dataclass
class ImageLoopConfig:
    batch_size: int = 64
    lr: float = 2e-4
    min_lr: float = 2e-5  # cosine floor (VAE, diffusion); GANs keep a constant rate
    warmup_steps: int = 100
    max_steps: int = 5000
    max_seconds: float = 0.0  # wall-clock budget; 0 = none. With one, the LR schedule runs on time and ends with it.
    grad_clip: float = 1.0  # VAE and diffusion; 0 disables
    eval_interval: int = 250  # validation loss (VAE, diffusion)
    eval_batches: int = 4
    sample_interval: int = 500  # sample grid PNG
    samples: int = 64  # images in a grid
    checkpoint_interval: int = 250
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"  # auto: bf16 where the device has it (fp16 on older GPUs)
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; a resume may change it
    threads: int = 0  # torch intra-op threads; 0 = follow the free CPU (aigc/threads.py)
    seed: int = 1337

    def validate(self) -> None:
        for name in ("batch_size", "max_steps", "eval_interval", "eval_batches", "sample_interval", "checkpoint_interval", "samples"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr (got {self.lr}, {self.min_lr})")
        if self.warmup_steps < 0 or self.max_seconds < 0:
            raise UserError("train.warmup_steps and train.max_seconds must be >= 0")
        devices.check(self.device, "train.device")


@dataclass
class ImageTrainConfig:
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    dcgan: DCGANConfig = field(default_factory=DCGANConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    ddpm: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: ImageLoopConfig = field(default_factory=ImageLoopConfig)


# ---------------------------------------------------------------- data

@dataclass
class ImageData:
    images: torch.Tensor  # (N, H, W, C) uint8
    cond: torch.Tensor | None  # (N,) class ids or (N, L) caption word ids
    hflip: bool


def resolve_condition(requested: str, manifest: dict) -> str:
    if requested == "auto":
        return "caption" if manifest.get("captions") else "class" if manifest.get("classes") else "none"
    if requested == "class" and not manifest.get("classes"):
        raise UserError("model.condition=class needs a dataset with classes (class sub-folders)")
    if requested == "caption" and not manifest.get("captions"):
        raise UserError("model.condition=caption needs a dataset with captions (captions.jsonl)")
    return requested


def load_run_data(run_dir: Path, split: str, condition: str, vocab: list[str]) -> ImageData:
    from aigc.data.images import load_prepared
    from aigc.models.conditioning import encode_captions

    train, val, manifest = load_prepared(run_dir / "data")
    part = train if split == "train" else val
    cond = None
    if condition == "class":
        cond = torch.from_numpy(part.labels)
    elif condition == "caption":
        cond = encode_captions(part.captions, vocab)
    return ImageData(torch.from_numpy(part.images), cond, bool(manifest.get("augment", {}).get("hflip")))


def get_batch(data: ImageData, batch: int, seed: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (B, C, H, W) in [-1, 1] and their conditions, chosen (and flipped) by (seed, step, micro) only."""
    rng = np.random.default_rng([seed, step, micro])
    idx = torch.from_numpy(rng.integers(0, len(data.images), size=batch))
    x = data.images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if data.hflip:
        flip = torch.from_numpy(rng.random(batch) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x, (None if data.cond is None else data.cond[idx])


def local(world: "distributed.World", device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """This rank's rows of a step's global tensors (images, conditions, noise: all drawn for the whole batch, on the
    CPU, as one process would), moved to the device."""
    return [None if t is None else distributed.shard(t, world).to(device, non_blocking=True) for t in tensors]


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The torch RNG of one step: latents, noise and timesteps are a function of (seed, step). A CPU generator on
    every device, so a run draws the same noise on a GPU as on a CPU."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + micro)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the weights (buffers copied). The decay ramps up as (1 + step) / (10 + step) until it
    reaches ``decay``, so short runs are not dominated by their random initial weights."""
    decay = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


# ---------------------------------------------------------------- run directory

def prepare_run(cfg: ImageTrainConfig, run_dir: Path, overwrite: bool = False) -> None:
    """Create the run directory (atomically): config, dataset manifest and a copy of the data."""
    from aigc.data.images import load_prepared
    from aigc.data import store
    from aigc.models.conditioning import build_vocab

    if not cfg.data.path:
        raise UserError("no training data: pass --data PREPARED_DIR (or set data.path)")
    try:
        store.check_writable(run_dir, overwrite)
    except UserError:
        raise UserError(f"run directory {run_dir} already exists; use --resume to continue it or --overwrite to start over") from None
    train, val, manifest = load_prepared(cfg.data.path)
    if len(val.images) == 0:
        raise UserError(f"{cfg.data.path}: the prepared dataset has no validation images; prepare it with --val-fraction > 0")
    condition = resolve_condition(cfg.model.condition, manifest)
    size = manifest["size"]
    if cfg.model.kind in ("dcgan", "vae"):
        from aigc.models.dcgan import n_layers

        n_layers(size)
    vocab = build_vocab([c for c in train.captions if c]) if condition == "caption" else []
    with store.atomic_folder(run_dir, overwrite) as tmp:
        (tmp / "dataset").mkdir()
        (tmp / "dataset" / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "data").mkdir()
        for name in ("manifest.json", "train.npz", "val.npz", "train.jsonl", "val.jsonl"):
            shutil.copy2(Path(cfg.data.path) / name, tmp / "data" / name)
        resolved = asdict(cfg)
        resolved["model"]["condition"] = condition
        save_yaml(resolved, tmp / "config.yaml")
        (tmp / "data" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")


def run_meta(cfg: ImageTrainConfig, run_dir: Path, step: int):
    """What the pipeline needs to rebuild the model, from the run's copy of the data."""
    from aigc.run import ImageMeta

    manifest = json.loads((run_dir / "data" / "manifest.json").read_text(encoding="utf-8"))
    vocab = json.loads((run_dir / "data" / "vocab.json").read_text(encoding="utf-8"))
    prompts: list[str] = []
    if cfg.model.condition == "caption":
        seen = {}
        for line in (run_dir / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines():
            seen.setdefault(json.loads(line)["caption"], None)
        prompts = list(seen)[:1000]
    section = {"dcgan": cfg.dcgan, "vae": cfg.vae, "ddpm": cfg.ddpm}[cfg.model.kind]
    return ImageMeta(kind=cfg.model.kind, size=manifest["size"], channels=manifest["channels"], condition=cfg.model.condition,
                     classes=manifest["classes"], vocab=vocab, prompts=prompts, config=asdict(section), step=step)


def save_model(run_dir: Path, meta, weights: dict[str, torch.nn.Module], unet=None, scheduler=None) -> None:
    """Write model/ atomically: aigc_image.json, each module as NAME.safetensors, a diffusers UNet + scheduler."""
    from safetensors.torch import save_file

    from aigc.data import store

    with store.atomic_folder(run_dir / "model", overwrite=True) as tmp:
        meta.save(tmp)
        for name, module in weights.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        if unet is not None:
            unet.save_pretrained(str(tmp / "unet"))
            scheduler.save_pretrained(str(tmp / "scheduler"))


def sample_grid(pipeline, run_dir: Path, step: int, n: int, seed: int, writer=None) -> None:
    """A grid of n samples (fixed seeds and conditions, so grids compare across steps) to samples/."""
    from aigc.generate.image import grid, save_png

    images, _ = pipeline.generate(n=n, seed=seed)
    tiles = grid(images, ncol=int(np.ceil(np.sqrt(n))))
    (run_dir / "samples").mkdir(exist_ok=True)
    save_png(tiles, run_dir / "samples" / f"step-{step:06d}.png")
    save_png(tiles, run_dir / "samples.png")
    if writer is not None:
        writer.add_image("samples", tiles, step, dataformats="HWC")


def train(cfg: ImageTrainConfig, run_dir: Path, resume: bool = False,
          progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train (or resume) the run's model with the loop of its kind; return the summary."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text(encoding="utf-8"))
    cfg.model.condition = resolve_condition(cfg.model.condition, manifest)
    threads.configure(cfg.train.threads)
    if cfg.model.kind == "dcgan":
        from aigc.train.gan import fit
    elif cfg.model.kind == "vae":
        from aigc.train.vae import fit
    else:
        from aigc.train.diffusion import fit
    summary = fit(cfg, run_dir, resume=resume, progress=progress)
    summary["threads"] = threads.current().to_dict()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
