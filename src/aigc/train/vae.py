"""The VAE training loop: negative ELBO with a linearly annealed KL weight.

loss = SSE(x, x_hat) / (2 sigma^2) + beta * min(1, step / kl_warmup_steps) * KL, per image, in nats.
AdamW, warmup + cosine, clipping. The validation loss is the full negative ELBO (beta at its final
value) on fixed images with fixed reparameterisation noise, per image.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from aigc import devices, distributed, threads
from aigc.models.vae import VAE, kl_divergence
from aigc.train import common
from aigc.train.image import (ImageTrainConfig, get_batch, load_run_data, local, run_meta, sample_grid, save_model,
                              step_generator)


def fit(cfg: ImageTrainConfig, run_dir: Path, resume: bool = False, progress: Callable | None = None) -> dict:
    from aigc.generate.image import ImagePipeline

    loop, vcfg, world = cfg.train, cfg.vae, distributed.current()
    device = distributed.place(devices.resolve(loop.device, "train.device"), world)
    precision = devices.resolve_precision(loop.precision, device)
    distributed.check_batch(loop.batch_size, world)
    meta = run_meta(cfg, run_dir, 0)
    train_data = load_run_data(run_dir, "train", meta.condition, meta.vocab)
    val_data = load_run_data(run_dir, "val", meta.condition, meta.vocab)

    torch.manual_seed(loop.seed)
    model = VAE(vcfg, meta.size, meta.channels, meta.condition, len(meta.classes), len(meta.vocab)).to(device)
    if isinstance(getattr(model.cond, "null", None), torch.nn.Parameter):
        # the learned null condition is for diffusion's guidance: a VAE never uses it (and DDP wants every trained
        # parameter used in each step)
        model.cond.null.requires_grad_(False)
    net = distributed.wrap(model, world, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=0.0)
    scaler = devices.grad_scaler(device, precision)

    metrics_path = run_dir / "metrics.jsonl"
    parts = {"model": model, "optimizer": optimizer, "scaler": common.ScalerPart(scaler)}
    state, ckpt_path = common.resume(run_dir, resume, {"step": 0, "elapsed": 0.0, "stopped": "", "best_val": float("inf")}, parts)
    writer = common.summary_writer(run_dir, state["step"], world)
    inv_two_var = 1.0 / (2 * vcfg.sigma**2)

    def losses(x, cond, gen, beta, module=net):
        noise = torch.randn(x.shape[0], vcfg.latent_dim, generator=gen)  # for the global batch, as one process draws it
        x, cond, noise = local(world, device, x, cond, noise)
        with devices.autocast(device, precision):
            recon, mu, logvar = module(x, cond, noise)
        rec = (recon.float() - x).pow(2).flatten(1).sum(1).mul(inv_two_var).mean()
        kl = kl_divergence(mu.float(), logvar.float()).mean()
        return rec + beta * kl, rec, kl

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        out = []
        for i in range(loop.eval_batches):
            x, cond = get_batch(val_data, loop.batch_size, loop.seed + 1, i)
            out.append(losses(x, cond, step_generator(loop.seed + 1, i), vcfg.beta, model)[0].item())
        model.train()
        return distributed.mean([sum(out) / len(out)])[0]

    def save(step: int) -> None:
        meta.step = step
        save_model(run_dir, meta, {"vae": model})

    model.train()
    step = state["step"]
    t_start = time.perf_counter() - state["elapsed"]
    t_last, last_step = time.perf_counter(), step
    budget = common.Budget(loop.max_steps, loop.max_seconds)
    with common.StopSignals() as signals:
        while not budget.reason(step, state["elapsed"]):
            threads.adapt()
            done = budget.progress(step, state["elapsed"])  # the clock every rank agreed on
            lr = common.scheduled_lr(state, budget, step, done, loop.lr, loop.min_lr, loop.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            beta = vcfg.beta * (min(1.0, step / vcfg.kl_warmup_steps) if vcfg.kl_warmup_steps else 1.0)
            x, cond = get_batch(train_data, loop.batch_size, loop.seed, step)
            loss, rec, kl = losses(x, cond, step_generator(loop.seed, step), beta)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip if loop.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_v, rec_v, kl_v = distributed.mean([loss.item(), rec.item(), kl.item()])
            step += 1
            now = time.perf_counter()
            state["step"], state["elapsed"] = step, now - t_start
            record = {"step": step, "time_s": round(state["elapsed"], 3), "loss": round(loss_v, 4), "recon": round(rec_v, 4),
                      "kl": round(kl_v, 4),
                      "beta": round(beta, 6), "lr": lr, "grad_norm": round(float(grad_norm), 4)}
            if step % 10 == 0 or step == 1:
                record["images_per_s"] = round(loop.batch_size * (step - last_step) / max(1e-9, now - t_last), 1)
                t_last, last_step = now, step
            previous, reason = common.end_of_step(state, budget, signals)
            state["stopped"] = reason
            finished = bool(reason)
            if reason != "interrupted" and common.eval_due(state, step, loop.eval_interval, previous, loop.eval_batches / 3, final=finished):
                record["val_loss"] = round(evaluate(), 4)
                state["best_val"] = min(state["best_val"], record["val_loss"])
            if world.main:  # rank 0 writes the run directory
                common.append_jsonl(metrics_path, record)
                for key in ("loss", "recon", "kl", "val_loss"):
                    if key in record:
                        writer.add_scalar(f"{'val/loss' if key == 'val_loss' else 'train/' + key}", record[key], step)
                if step % loop.checkpoint_interval == 0 or finished:
                    save(step)
                    common.save_checkpoint(ckpt_path, state, parts)
                    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name, ylabel="negative ELBO (nats/image)")
                if reason != "interrupted" and (step % loop.sample_interval == 0 or finished):
                    sample_grid(ImagePipeline(model, meta), run_dir, step, loop.samples, loop.seed, writer)
                    model.train()
            if progress:
                progress(step, state["progress"], record)
            if finished:
                break
    if not world.main:
        return {"kind": "vae", "steps": step, "rank": world.rank, "stopped": state["stopped"] or budget.reason(step, state["elapsed"])}
    writer.close()
    rates = [r["images_per_s"] for r in common.read_jsonl(metrics_path) if "images_per_s" in r][1:]
    return {"kind": "vae", "steps": step, "elapsed_s": round(state["elapsed"], 2),
            "stopped": state["stopped"] or budget.reason(step, state["elapsed"]), "best_val_loss": state["best_val"],
            "precision": precision, "device": str(device), "world_size": world.world_size, "condition": meta.condition, "parameters": sum(p.numel() for p in model.parameters()),
            "images_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None}
