"""The DCGAN training loop: alternating discriminator and generator updates.

Per step: ``d_steps`` discriminator updates on a real batch and a fresh fake batch (hinge or
non-saturating BCE loss, optional one-sided label smoothing, optional R1 or WGAN-GP penalty), then
one generator update on the same conditions; the generator's EMA is updated after it. Adam with
GAN betas at a constant learning rate (after a short warmup). Fake images of the generator update
are drawn from fresh latents, all from the step's seeded generator, so resume is exact.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from aigc import devices, distributed, threads
from aigc.errors import UserError
from aigc.models.dcgan import Discriminator, Generator, init_weights
from aigc.train import common
from aigc.train.image import (ImageTrainConfig, ema_update, get_batch, load_run_data, run_meta, sample_grid,
                              save_model, step_generator)


def d_loss_fn(kind: str, real: torch.Tensor, fake: torch.Tensor, smoothing: float) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, 1.0 - smoothing))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def g_loss_fn(kind: str, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))  # non-saturating


def gradient_penalty(kind: str, D, real: torch.Tensor, fake: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): ||grad D(real)||^2 / 2; WGAN-GP (Gulrajani et al. 2017): (||grad D(mix)|| - 1)^2."""
    if kind == "r1":
        x = real.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x, cond).sum(), x, create_graph=True)
        return 0.5 * grad.pow(2).flatten(1).sum(1).mean()
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=gen).to(real.device)
    x = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x, cond).sum(), x, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


DISTRIBUTED_REFUSAL = ("the dcgan loop trains in one process in this version (its two networks and gradient penalty "
                       "are not set up for DDP): drop --nproc; the vae and ddpm loops train on several")


def fit(cfg: ImageTrainConfig, run_dir: Path, resume: bool = False, progress: Callable | None = None) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    from aigc.generate.image import ImagePipeline

    loop, gcfg = cfg.train, cfg.dcgan
    if distributed.current().active:
        raise UserError(DISTRIBUTED_REFUSAL)
    device = devices.resolve(loop.device, "train.device")
    precision = devices.resolve_precision(loop.precision, device)
    if precision == "fp16":
        raise UserError("the dcgan loop trains in bf16 or fp32 (two optimisers, no gradient scaler): set --train.precision")
    meta = run_meta(cfg, run_dir, 0)
    data = load_run_data(run_dir, "train", meta.condition, meta.vocab)

    torch.manual_seed(loop.seed)
    args = (gcfg, meta.size, meta.channels, meta.condition, len(meta.classes), len(meta.vocab))
    G, D = Generator(*args).to(device), Discriminator(*args).to(device)
    init_weights(G)
    init_weights(D)
    G_ema = copy.deepcopy(G).requires_grad_(False).eval()
    opt_g = torch.optim.Adam(G.parameters(), lr=loop.lr, betas=(gcfg.beta1, gcfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=gcfg.d_lr or loop.lr, betas=(gcfg.beta1, gcfg.beta2))

    metrics_path = run_dir / "metrics.jsonl"
    parts = {"G": G, "D": D, "G_ema": G_ema, "opt_g": opt_g, "opt_d": opt_d}
    state, ckpt_path = common.resume(run_dir, resume, {"step": 0, "elapsed": 0.0, "stopped": ""}, parts)
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=state["step"] + 1 if state["step"] else None)
    autocast = devices.autocast(device, precision)

    def save(step: int) -> None:
        meta.step = step
        save_model(run_dir, meta, {"generator": G_ema if gcfg.ema else G})

    G.train()
    D.train()
    step = state["step"]
    t_start = time.perf_counter() - state["elapsed"]
    t_last, last_step = time.perf_counter(), step
    budget = common.Budget(loop.max_steps, loop.max_seconds)
    with common.StopSignals() as signals:
        while not budget.reason(step, state["elapsed"]):
            threads.adapt()
            warm = min(1.0, (step + 1) / loop.warmup_steps) if loop.warmup_steps else 1.0
            for group in opt_g.param_groups:
                group["lr"] = loop.lr * warm
            for group in opt_d.param_groups:
                group["lr"] = (gcfg.d_lr or loop.lr) * warm
            gen = step_generator(loop.seed, step)
            for k in range(gcfg.d_steps):
                real, cond = get_batch(data, loop.batch_size, loop.seed, step, k)
                z = torch.randn(loop.batch_size, gcfg.nz, generator=gen)  # CPU generator: the same noise on every device
                real, cond, z = (None if t is None else t.to(device) for t in (real, cond, z))
                with autocast:
                    with torch.no_grad():
                        fake = G(z, cond)
                    d_real, d_fake = D(real, cond).float(), D(fake.float(), cond).float()
                loss_d = d_loss_fn(gcfg.loss, d_real, d_fake, gcfg.label_smoothing)
                penalty = torch.zeros((), device=device)
                if gcfg.gradient_penalty != "none":
                    penalty = gradient_penalty(gcfg.gradient_penalty, D, real, fake, cond, gen)
                    loss_d = loss_d + gcfg.gp_weight * penalty
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            z = torch.randn(loop.batch_size, gcfg.nz, generator=gen).to(device)
            with autocast:
                loss_g = g_loss_fn(gcfg.loss, D(G(z, cond), cond).float())
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if gcfg.ema:
                ema_update(G_ema, G, gcfg.ema, step)
            step += 1
            now = time.perf_counter()
            state["step"], state["elapsed"] = step, now - t_start
            record = {"step": step, "time_s": round(state["elapsed"], 3), "loss_d": round(loss_d.item(), 5), "loss_g": round(loss_g.item(), 5),
                      "d_real": round(d_real.mean().item(), 4), "d_fake": round(d_fake.mean().item(), 4),
                      "lr": loop.lr * warm}
            if gcfg.gradient_penalty != "none":
                record["penalty"] = round(penalty.item(), 5)
            if step % 10 == 0 or step == 1:
                record["images_per_s"] = round(loop.batch_size * (step - last_step) / max(1e-9, now - t_last), 1)
                t_last, last_step = now, step
            _, reason = common.end_of_step(state, budget, signals)
            state["stopped"] = reason
            finished = bool(reason)
            common.append_jsonl(metrics_path, record)
            for key in ("loss_d", "loss_g", "d_real", "d_fake"):
                writer.add_scalar(f"train/{key}", record[key], step)
            if step % loop.checkpoint_interval == 0 or finished:
                save(step)
                common.save_checkpoint(ckpt_path, state, parts)
                common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name, ylabel="loss",
                                 series=(("loss_d", "discriminator"), ("loss_g", "generator")))
            if reason != "interrupted" and (step % loop.sample_interval == 0 or finished):
                sample_grid(ImagePipeline(G_ema if gcfg.ema else copy.deepcopy(G), meta), run_dir, step, loop.samples, loop.seed, writer)
            if progress:
                progress(step, state["progress"], record)
            if finished:
                break
    writer.close()
    rates = [r["images_per_s"] for r in common.read_jsonl(metrics_path) if "images_per_s" in r][1:]
    return {"kind": "dcgan", "steps": step, "elapsed_s": round(state["elapsed"], 2),
            "stopped": state["stopped"] or budget.reason(step, state["elapsed"]), "precision": precision, "device": str(device),
            "condition": meta.condition, "parameters": sum(p.numel() for p in G.parameters()),
            "images_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None}
