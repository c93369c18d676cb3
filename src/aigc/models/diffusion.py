"""A small denoising diffusion model (DDPM, Ho et al. 2020) on diffusers' ``UNet2DModel``.

The UNet predicts the noise (or v) added at timestep t. Conditioning: the class or caption vector
from ``Conditioner`` (sized to the UNet's time-embedding width) is added to the time embedding
(``class_embed_type="identity"``). During training the condition is replaced by the learned null
condition with probability ``cond_drop``, so one network gives both the conditional and the
unconditional prediction, and sampling can use classifier-free guidance (Ho & Salimans 2022):
eps = eps_uncond + w * (eps_cond - eps_uncond).

Training uses ``DDPMScheduler`` (``add_noise``); sampling uses ``DDIMScheduler`` (deterministic,
few steps) or ``DDPMScheduler``, both built from the same saved scheduler config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from aigc.errors import UserError
from aigc.models.conditioning import Conditioner


@dataclass
class DiffusionConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = True  # self-attention at the lowest resolution
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    cond_drop: float = 0.1  # probability of training on the null condition (classifier-free guidance)
    ema: float = 0.999  # EMA decay of the weights that get saved and sampled; 0 disables
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = 50
    guidance_scale: float = 2.0

    def validate(self) -> None:
        if not self.block_out_channels or any(c < 1 or c % self.norm_num_groups for c in self.block_out_channels):
            raise UserError(f"ddpm.block_out_channels must be positive multiples of ddpm.norm_num_groups ({self.norm_num_groups})")
        if self.layers_per_block < 1 or self.num_train_timesteps < 2 or self.sample_steps < 1:
            raise UserError("ddpm.layers_per_block, ddpm.num_train_timesteps and ddpm.sample_steps must be positive")
        if not 0.0 <= self.cond_drop < 1.0 or not 0.0 <= self.ema < 1.0:
            raise UserError("ddpm.cond_drop and ddpm.ema must be in [0, 1)")


def build_unet(cfg: DiffusionConfig, size: int, channels: int, conditional: bool):
    from diffusers import UNet2DModel

    levels = len(cfg.block_out_channels)
    if size % 2 ** (levels - 1):
        raise UserError(f"image size {size} is not divisible by 2^{levels - 1} (one halving per extra UNet level)")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.block_out_channels[-1] // 2 if cfg.attention else None, add_attention=cfg.attention,
        class_embed_type="identity" if conditional else None,
    )


def build_scheduler(cfg: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=True)


class DiffusionModel(nn.Module):
    """UNet + conditioner; ``forward`` predicts the noise (or v) of x_t at timesteps t."""

    def __init__(self, unet, cond_kind: str = "none", num_classes: int = 0, vocab_size: int = 0):
        super().__init__()
        self.unet = unet
        self.cond = Conditioner(cond_kind, unet.config.block_out_channels[0] * 4, num_classes, vocab_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W); t: (B,) long; cond: (B,) or (B, L) -> (B, C, H, W)
        c = self.cond(cond, drop)
        return self.unet(x, t, class_labels=c).sample

    def guided(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None, null: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Classifier-free guided prediction from precomputed condition vectors (B, D)."""
        if c is None:
            return self.unet(x, t).sample
        if scale == 1.0:
            return self.unet(x, t, class_labels=c).sample
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([c, null])).sample
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)
