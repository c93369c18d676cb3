"""DCGAN (Radford et al. 2016) with the usual stabilisers, unconditional or class/caption-conditional.

Generator: [z ; c] -> linear -> (ngf*2^(L-1), 4, 4) -> L transposed convolutions (x2 each) -> tanh,
with batch norm and ReLU between, L = log2(size / 4). The condition vector is concatenated to z.

Discriminator: L strided convolutions (/2 each) with LeakyReLU down to 4x4, sum-pooled features h,
then ``linear(h) + <embed(c), h>`` (the projection discriminator, Miyato & Koyama 2018).
Stabilisers: spectral norm on every D layer (Miyato et al. 2018), or a gradient penalty (R1 on real
images, or WGAN-GP), one-sided label smoothing, and an EMA of the generator's weights (the EMA is
what gets saved and sampled). Batch norm in D only when neither spectral norm nor a penalty is on
(penalties are per-sample and batch norm mixes samples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from aigc.errors import UserError
from aigc.models.conditioning import Conditioner


@dataclass
class DCGANConfig:
    nz: int = 64  # latent size
    ngf: int = 64  # generator width at the last layer
    ndf: int = 64  # discriminator width at the first layer
    loss: Literal["bce", "hinge"] = "hinge"
    spectral_norm: bool = True
    gradient_penalty: Literal["none", "r1", "wgan-gp"] = "none"
    gp_weight: float = 10.0
    label_smoothing: float = 0.0  # bce only: real targets are 1 - s (one-sided, Salimans et al. 2016)
    ema: float = 0.999  # generator EMA decay; 0 disables
    d_lr: float = 0.0  # discriminator learning rate; 0 = train.lr
    beta1: float = 0.0
    beta2: float = 0.9
    d_steps: int = 1  # discriminator updates per generator update

    def validate(self) -> None:
        if self.nz < 1 or self.ngf < 1 or self.ndf < 1 or self.d_steps < 1:
            raise UserError("dcgan.nz, dcgan.ngf, dcgan.ndf and dcgan.d_steps must be >= 1")
        if not 0.0 <= self.label_smoothing < 0.5 or not 0.0 <= self.ema < 1.0:
            raise UserError("dcgan.label_smoothing must be in [0, 0.5) and dcgan.ema in [0, 1)")
        if self.label_smoothing and self.loss != "bce":
            raise UserError("dcgan.label_smoothing applies to loss: bce only")


def n_layers(size: int) -> int:
    layers = int(round(math.log2(size / 4)))
    if size < 8 or 4 * 2**layers != size:
        raise UserError(f"DCGAN needs an image size of 8, 16, 32, 64, ... (a power of two >= 8), got {size}")
    return layers


class Generator(nn.Module):
    def __init__(self, cfg: DCGANConfig, size: int, channels: int, cond_kind: str = "none", num_classes: int = 0, vocab_size: int = 0):
        super().__init__()
        self.nz = cfg.nz
        layers = n_layers(size)
        width = cfg.ngf * 2 ** (layers - 1)
        self.cond = Conditioner(cond_kind, cfg.nz, num_classes, vocab_size)
        in_dim = cfg.nz * (2 if cond_kind != "none" else 1)
        self.start = nn.Sequential(nn.Linear(in_dim, width * 16, bias=False), nn.Unflatten(1, (width, 4, 4)),
                                   nn.BatchNorm2d(width), nn.ReLU(True))
        ups = []
        for _ in range(layers - 1):
            ups += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        ups += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.ups = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # z: (B, nz); cond: (B,) class ids or (B, L) caption word ids -> (B, C, H, W) in [-1, 1]
        return self.from_vector(z, self.cond(cond))

    def from_vector(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        # z: (B, nz); c: (B, nz) condition vectors or None -> (B, C, H, W)
        h = z if c is None else torch.cat([z, c], dim=1)
        return self.ups(self.start(h))


class Discriminator(nn.Module):
    def __init__(self, cfg: DCGANConfig, size: int, channels: int, cond_kind: str = "none", num_classes: int = 0, vocab_size: int = 0):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        use_bn = not cfg.spectral_norm and cfg.gradient_penalty == "none"
        layers = n_layers(size)
        width = cfg.ndf
        blocks = [sn(nn.Conv2d(channels, width, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        for _ in range(layers - 1):
            blocks += [sn(nn.Conv2d(width, width * 2, 4, 2, 1, bias=not use_bn))]
            if use_bn:
                blocks += [nn.BatchNorm2d(width * 2)]
            blocks += [nn.LeakyReLU(0.2, True)]
            width *= 2
        self.features = nn.Sequential(*blocks)
        self.out = sn(nn.Linear(width, 1))
        self.cond = Conditioner(cond_kind, width, num_classes, vocab_size)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W) -> logits (B,)
        h = self.features(x).sum(dim=(2, 3))  # (B, width)
        logit = self.out(h).squeeze(1)
        c = self.cond(cond)
        if c is not None:
            logit = logit + (c * h).sum(dim=1)
        return logit


def init_weights(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: N(0, 0.02) weights, BN scale N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
