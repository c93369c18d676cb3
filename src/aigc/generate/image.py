"""Image generation from a trained run: one inference-only pipeline for DCGAN, VAE and diffusion runs.

A run's ``model/`` folder holds ``aigc_image.json`` (kind, image size, conditioning, classes, caption
vocabulary) and the weights: ``generator.safetensors`` (DCGAN, the EMA generator),
``vae.safetensors`` (VAE), or ``unet/`` (diffusers format) + ``conditioner.safetensors`` +
``scheduler/`` (diffusion).

Sample i of a request with seed s draws its latent from seed s + i, so the same seed gives the same
image whatever n or batch size, and two seeds can be interpolated (spherical interpolation of the
latents; for diffusion, of the initial noise, decoded with the deterministic DDIM sampler).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aigc import threads
from aigc.errors import UserError
from aigc.run import ImageMeta, model_folder

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def grid(images: np.ndarray, ncol: int = 8, pad: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) uint8 into one image with ``pad`` pixels of grey between tiles."""
    n, h, w, c = images.shape
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return out


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, mode="L" if image.shape[2] == 1 else "RGB")


def upscale(image: np.ndarray, size: int, method: str = "lanczos") -> np.ndarray:
    """Resize one (H, W, C) uint8 image to (size, size, C): the delivery size (watermarking needs >= 256)."""
    from PIL import Image

    if image.shape[0] == size:
        return image
    resample = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
                "nearest": Image.Resampling.NEAREST}.get(method)
    if resample is None:
        raise UserError(f"unknown upscaling method {method!r} (lanczos, bicubic, nearest)")
    arr = np.asarray(to_pil(image).resize((size, size), resample), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def save_png(image: np.ndarray, path: Path, text: dict | None = None) -> None:
    from PIL import PngImagePlugin

    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    tmp = path.with_name(path.name + ".tmp")
    to_pil(image).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def save_gif(frames: list[np.ndarray], path: Path, duration_ms: int = 120) -> None:
    images = [to_pil(f) for f in frames]
    tmp = path.with_name(path.name + ".tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:] + images[-2:0:-1], duration=duration_ms, loop=0)
    tmp.replace(path)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two Gaussian draws (keeps the norm a Gaussian sample has)."""
    fa, fb = a.flatten(), b.flatten()
    omega = torch.arccos(torch.clamp(torch.dot(fa / fa.norm(), fb / fb.norm()), -1.0, 1.0))
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


class ImagePipeline:
    """Sample images from an in-memory model (during training) or a run's saved model (``from_run``), on the device
    the model is on. Latents and sampler noise are drawn from seeded CPU generators and then moved there, so a seed
    gives the same starting noise on every device."""

    def __init__(self, model: torch.nn.Module, meta: ImageMeta, scheduler_config: dict | None = None):
        self.model, self.meta, self.scheduler_config = model, meta, scheduler_config
        self.device = next(model.parameters()).device
        model.eval()

    @classmethod
    def from_run(cls, run: str | Path, device: str | torch.device = "cpu") -> ImagePipeline:
        from safetensors.torch import load_file

        meta = ImageMeta.load(run)
        folder = model_folder(run)
        n_cls, n_vocab = len(meta.classes), len(meta.vocab)
        scheduler_config = None
        if meta.kind == "dcgan":
            from aigc.models.dcgan import DCGANConfig, Generator

            model = Generator(DCGANConfig(**meta.config), meta.size, meta.channels, meta.condition, n_cls, n_vocab)
            model.load_state_dict(load_file(folder / "generator.safetensors"))
        elif meta.kind == "vae":
            from aigc.models.vae import VAE, VAEConfig

            model = VAE(VAEConfig(**meta.config), meta.size, meta.channels, meta.condition, n_cls, n_vocab)
            model.load_state_dict(load_file(folder / "vae.safetensors"))
        elif meta.kind == "ddpm":
            from diffusers import UNet2DModel

            from aigc.models.diffusion import DiffusionModel

            unet = UNet2DModel.from_pretrained(str(folder / "unet"))
            model = DiffusionModel(unet, meta.condition, n_cls, n_vocab)
            model.cond.load_state_dict(load_file(folder / "conditioner.safetensors"))
            scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        else:
            raise UserError(f"{run}: unknown image model kind {meta.kind!r}")
        from aigc import devices

        return cls(model.to(devices.as_device(device)), meta, scheduler_config)

    # ------------------------------------------------------------ conditions

    def conditions(self, n: int, classes: list[str] | None = None, captions: list[str] | None = None) -> tuple[torch.Tensor | None, list[str]]:
        """Condition ids for n samples and their readable labels.

        One class or caption is used for all n; a list of n gives one per sample; none given cycles
        through the classes (or the training captions) of a conditional model.
        """
        from aigc.models.conditioning import encode_captions

        meta = self.meta
        if meta.condition == "none":
            if classes or captions:
                raise UserError("this model is unconditional: it takes no class or caption")
            return None, [""] * n
        if meta.condition == "class":
            if captions:
                raise UserError(f"this model is class-conditional: pass a class ({', '.join(meta.classes)}), not a caption")
            names = classes or [meta.classes[i % len(meta.classes)] for i in range(n)]
            unknown = [c for c in names if c not in meta.classes]
            if unknown:
                raise UserError(f"unknown class {unknown[0]!r} (classes: {', '.join(meta.classes)})")
            names = _fit(names, n, "classes")
            return torch.tensor([meta.classes.index(c) for c in names], dtype=torch.long, device=self.device), names
        if classes:
            raise UserError("this model is caption-conditional: pass --caption TEXT, not a class")
        texts = _fit(captions or [meta.prompts[i % len(meta.prompts)] for i in range(n)], n, "captions")
        return encode_captions(texts, meta.vocab).to(self.device), texts

    # ------------------------------------------------------------ sampling

    def latent_shape(self) -> tuple[int, ...]:
        if self.meta.kind == "dcgan":
            return (self.model.nz,)
        if self.meta.kind == "vae":
            return (self.model.latent_dim,)
        return (self.meta.channels, self.meta.size, self.meta.size)

    def latents(self, seeds: list[int]) -> torch.Tensor:
        return torch.stack([torch.randn(self.latent_shape(), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(self.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, cond: torch.Tensor | None, steps: int | None = None, guidance: float | None = None,
               sampler: str | None = None, seed: int = 0) -> torch.Tensor:
        """Latents (B, ...) and conditions -> images (B, C, H, W) in [-1, 1]."""
        if self.meta.kind == "dcgan":
            return self.model(z, cond)
        if self.meta.kind == "vae":
            return self.model.generate(z, cond)
        return self._denoise(z, self.model.cond(cond), steps, guidance, sampler, seed)

    @torch.no_grad()
    def condition_vectors(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """Condition ids -> the (B, D) vectors the model consumes (None for an unconditional model)."""
        return None if cond is None else self.model.cond(cond)

    @torch.no_grad()
    def decode_vectors(self, z: torch.Tensor, c: torch.Tensor | None, steps: int | None = None,
                       guidance: float | None = None) -> torch.Tensor:
        """Like ``decode`` but from condition vectors, so conditions can be interpolated too (video)."""
        if self.meta.kind == "dcgan":
            return self.model.from_vector(z, c)
        if self.meta.kind == "vae":
            return self.model.decode(z, c)
        return self._denoise(z, c, steps, guidance, "ddim", 0)

    def _denoise(self, x: torch.Tensor, c: torch.Tensor | None, steps, guidance, sampler, seed) -> torch.Tensor:
        from diffusers import DDIMScheduler, DDPMScheduler

        cfg = self.meta.config
        steps = steps or cfg.get("sample_steps", 50)
        guidance = cfg.get("guidance_scale", 1.0) if guidance is None else guidance
        sampler = sampler or cfg.get("sampler", "ddim")
        if steps < 1 or steps > cfg.get("num_train_timesteps", 1000):
            raise UserError(f"steps must be between 1 and {cfg.get('num_train_timesteps', 1000)}, got {steps}")
        if guidance < 0:
            raise UserError(f"guidance scale must be >= 0, got {guidance}")
        if sampler not in ("ddim", "ddpm"):
            raise UserError(f"unknown sampler {sampler!r} (ddim, ddpm)")
        scheduler = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        null = self.model.cond.null_condition(x.shape[0])
        gen = torch.Generator().manual_seed(seed)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            threads.adapt()
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
            pred = self.model.guided(x, tt, c, null, guidance)
            kwargs = {"generator": gen} if sampler == "ddpm" else {"eta": 0.0}
            x = scheduler.step(pred, t, x, **kwargs).prev_sample
        return x.clamp(-1, 1)

    def generate(self, n: int = 8, seed: int = 0, classes: list[str] | None = None, captions: list[str] | None = None,
                 steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                 batch_size: int = 64, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
        """n images (n, H, W, C) uint8 and their condition labels; ``progress(done)`` hears each finished batch."""
        if n < 1:
            raise UserError(f"n must be >= 1, got {n}")
        cond, labels = self.conditions(n, classes, captions)
        out = []
        for start in range(0, n, batch_size):
            threads.adapt()
            stop = min(n, start + batch_size)
            z = self.latents(list(range(seed + start, seed + stop)))
            c = None if cond is None else cond[start:stop]
            out.append(to_uint8(self.decode(z, c, steps, guidance, sampler, seed + start)))
            if progress:
                progress(stop)
        return np.concatenate(out), labels

    def interpolate(self, seed_a: int, seed_b: int, frames: int = 8, classes: list[str] | None = None,
                    captions: list[str] | None = None, steps: int | None = None, guidance: float | None = None) -> np.ndarray:
        """Frames (frames, H, W, C) uint8 morphing seed_a's sample into seed_b's under one condition."""
        if frames < 2:
            raise UserError(f"interpolation needs at least 2 frames, got {frames}")
        cond, _ = self.conditions(1, classes[:1] if classes else None, captions[:1] if captions else None)
        za, zb = self.latents([seed_a, seed_b])
        z = torch.stack([slerp(za, zb, i / (frames - 1)) for i in range(frames)])
        c = None if cond is None else cond.expand(frames, *cond.shape[1:])
        # DDIM (deterministic) so the frames differ only by their noise, never by sampler randomness
        return to_uint8(self.decode(z, c, steps, guidance, "ddim"))


def _fit(values: list[str], n: int, what: str) -> list[str]:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"give one of the {what} or exactly n={n} of them, got {len(values)}")
    return values
