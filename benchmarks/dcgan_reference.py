"""The reference: a plain DCGAN in the style of the classic PyTorch DCGAN example (pytorch/examples, dcgan).

Fixed architecture (the example's, with one fewer stage per halving of the image side), batch norm,
BCE loss, Adam lr 2e-4 with beta1 0.5, batch 128, nz 100, ngf = ndf = 64, N(0, 0.02) initialisation;
unconditional, no spectral norm, no penalty, no label smoothing, no EMA.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn


def _stages(size: int) -> int:
    return int(math.log2(size // 4))


class Generator(nn.Module):
    def __init__(self, size: int, nc: int, nz: int = 100, ngf: int = 64):
        super().__init__()
        n = _stages(size)
        ch = ngf * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):  # (B, nz, 1, 1) -> (B, nc, size, size)
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self, size: int, nc: int, ndf: int = 64):
        super().__init__()
        n = _stages(size)
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)

    def forward(self, x):  # (B, nc, H, W) -> (B,)
        return self.main(x).view(-1)


def weights_init(m):
    name = m.__class__.__name__
    if name.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif name.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0)


def train(images: np.ndarray, seconds: float, seed: int = 0, batch: int = 128, nz: int = 100) -> tuple[Generator, dict]:
    """Train on (N, H, W, C) uint8 images for ``seconds``; return the generator and counters."""
    torch.manual_seed(seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    size, nc = images.shape[1], images.shape[3]
    netG, netD = Generator(size, nc, nz), Discriminator(size, nc)
    netG.apply(weights_init)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        real = x_all[torch.randint(0, len(x_all), (batch,))]
        netD.zero_grad()
        errD_real = criterion(netD(real), torch.ones(batch))
        errD_real.backward()
        fake = netG(torch.randn(batch, nz, 1, 1))
        errD_fake = criterion(netD(fake.detach()), torch.zeros(batch))
        errD_fake.backward()
        optD.step()
        netG.zero_grad()
        errG = criterion(netD(fake), torch.ones(batch))
        errG.backward()
        optG.step()
        steps += 1
    return netG, {"steps": steps, "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def sample(netG: Generator, n: int, seed: int = 0, nz: int = 100) -> np.ndarray:
    netG.eval()
    z = torch.randn(n, nz, 1, 1, generator=torch.Generator().manual_seed(seed))
    x = netG(z)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
