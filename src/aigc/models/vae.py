"""A convolutional (conditional) VAE (Kingma & Welling 2014; Sohn et al. 2015 for the conditional form).

Encoder: L strided convolutions (/2 each, GroupNorm + SiLU) down to 4x4, flatten, concatenate the
condition vector, then two linear heads for the posterior mean and log-variance (latent_dim each).
Decoder: [z ; c] -> linear -> (width, 4, 4) -> L transposed convolutions (x2 each) -> tanh.

Loss per image: sum of squared errors / (2 sigma^2) + beta * KL(q(z|x,c) || N(0, I)), with beta
annealed linearly from 0 over ``kl_warmup_steps`` (Bowman et al. 2016) so the decoder learns to use
z before the KL term pulls the posterior to the prior.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aigc.errors import UserError
from aigc.models.conditioning import Conditioner
from aigc.models.dcgan import n_layers


@dataclass
class VAEConfig:
    latent_dim: int = 32
    width: int = 32  # channels after the first convolution; doubled at each one after
    beta: float = 1.0
    kl_warmup_steps: int = 500
    sigma: float = 0.1  # decoder likelihood scale, in [-1, 1] pixel units: smaller trades samples' sharpness for KL

    def validate(self) -> None:
        if self.latent_dim < 1 or self.width < 1:
            raise UserError("vae.latent_dim and vae.width must be >= 1")
        if self.beta < 0 or self.kl_warmup_steps < 0 or self.sigma <= 0:
            raise UserError("vae.beta and vae.kl_warmup_steps must be >= 0 and vae.sigma > 0")


def _groups(ch: int) -> int:
    return 8 if ch % 8 == 0 else 1


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig, size: int, channels: int, cond_kind: str = "none", num_classes: int = 0, vocab_size: int = 0):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        layers = n_layers(size)
        width = cfg.width
        down = [nn.Conv2d(channels, width, 4, 2, 1), nn.SiLU()]
        for _ in range(layers - 1):
            down += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(_groups(width * 2), width * 2), nn.SiLU()]
            width *= 2
        self.encoder = nn.Sequential(*down, nn.Flatten())  # (B, width * 16)
        self.cond = Conditioner(cond_kind, 64, num_classes, vocab_size)
        cdim = 64 if cond_kind != "none" else 0
        self.mu = nn.Linear(width * 16 + cdim, cfg.latent_dim)
        self.logvar = nn.Linear(width * 16 + cdim, cfg.latent_dim)
        self.start = nn.Sequential(nn.Linear(cfg.latent_dim + cdim, width * 16), nn.Unflatten(1, (width, 4, 4)), nn.SiLU())
        up = []
        for _ in range(layers - 1):
            up += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.GroupNorm(_groups(width // 2), width // 2), nn.SiLU()]
            width //= 2
        up += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.decoder = nn.Sequential(*up)

    def encode(self, x: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # (B, width * 16)
        if c is not None:
            h = torch.cat([h, c], dim=1)
        return self.mu(h), self.logvar(h).clamp(-12.0, 8.0)  # (B, latent) each

    def decode(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = z if c is None else torch.cat([z, c], dim=1)
        return self.decoder(self.start(h))  # (B, C, H, W)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, mean and log-variance; ``noise`` (B, latent) is the reparameterisation draw."""
        c = self.cond(cond)
        mu, logvar = self.encode(x, c)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decode(z, c), mu, logvar

    def generate(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(z, self.cond(cond))


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
