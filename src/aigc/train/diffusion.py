"""The diffusion training loop: DDPM noise-prediction loss, conditioning dropout for guidance, EMA.

Each step: images x0 and conditions, timesteps t ~ U{0..T-1}, noise e ~ N(0, I), x_t from the
scheduler's ``add_noise``; loss = MSE(model(x_t, t, c), e) (or v for v-prediction). With
probability ``cond_drop`` a sample's condition is replaced by the null condition. AdamW, warmup +
cosine, gradient clipping; the EMA weights are what is saved, evaluated and sampled. The validation
loss uses fixed images, timesteps and noise, so evaluations compare across steps.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from aigc import devices, distributed, threads
from aigc.models.diffusion import DiffusionModel, build_scheduler, build_unet
from aigc.train import common
from aigc.train.image import (ImageTrainConfig, ema_update, get_batch, load_run_data, local, run_meta, sample_grid,
                              save_model, step_generator)



def fit(cfg: ImageTrainConfig, run_dir: Path, resume: bool = False, progress: Callable | None = None) -> dict:
    from aigc.generate.image import ImagePipeline

    loop, dcfg, world = cfg.train, cfg.ddpm, distributed.current()
    device = distributed.place(devices.resolve(loop.device, "train.device"), world)
    precision = devices.resolve_precision(loop.precision, device)
    distributed.check_batch(loop.batch_size, world)
    meta = run_meta(cfg, run_dir, 0)
    train_data = load_run_data(run_dir, "train", meta.condition, meta.vocab)
    val_data = load_run_data(run_dir, "val", meta.condition, meta.vocab)

    torch.manual_seed(loop.seed)
    model = DiffusionModel(build_unet(dcfg, meta.size, meta.channels, meta.condition != "none"),
                           meta.condition, len(meta.classes), len(meta.vocab)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    net = distributed.wrap(model, world, device)
    scheduler = build_scheduler(dcfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=0.0)
    scaler = devices.grad_scaler(device, precision)

    metrics_path = run_dir / "metrics.jsonl"
    parts = {"model": model, "ema": ema, "optimizer": optimizer, "scaler": common.ScalerPart(scaler)}
    state, ckpt_path = common.resume(run_dir, resume, {"step": 0, "elapsed": 0.0, "stopped": "", "best_val": float("inf")}, parts)
    writer = common.summary_writer(run_dir, state["step"], world)

    def loss_on(module, x0, cond, gen, drop_p):
        b = x0.shape[0]  # timesteps, noise and condition dropout are drawn for the global batch, as one process draws them
        t = torch.randint(0, dcfg.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = (torch.rand(b, generator=gen) < drop_p) if cond is not None else None
        x0, cond, t, noise, drop = local(world, device, x0, cond, t, noise, drop)
        xt = scheduler.add_noise(x0, noise, t)
        target = noise if dcfg.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        with devices.autocast(device, precision):
            pred = module(xt, t, cond, drop)
        return F.mse_loss(pred.float(), target)

    @torch.no_grad()
    def evaluate() -> float:
        losses = []
        for i in range(loop.eval_batches):
            x0, cond = get_batch(val_data, loop.batch_size, loop.seed + 1, i)
            losses.append(loss_on(ema, x0, cond, step_generator(loop.seed + 1, i), 0.0).item())
        return distributed.mean([sum(losses) / len(losses)])[0]

    def save(step: int) -> None:
        meta.step = step
        save_model(run_dir, meta, {"conditioner": ema.cond}, unet=ema.unet, scheduler=scheduler)

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
            x0, cond = get_batch(train_data, loop.batch_size, loop.seed, step)
            loss = loss_on(net, x0, cond, step_generator(loop.seed, step), dcfg.cond_drop)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip if loop.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, model, dcfg.ema, step)
            step += 1
            now = time.perf_counter()
            state["step"], state["elapsed"] = step, now - t_start
            record = {"step": step, "time_s": round(state["elapsed"], 3), "loss": round(distributed.mean([loss.item()])[0], 6), "lr": lr,
                      "grad_norm": round(float(grad_norm), 4)}
            if step % 10 == 0 or step == 1:
                record["images_per_s"] = round(loop.batch_size * (step - last_step) / max(1e-9, now - t_last), 1)
                t_last, last_step = now, step
            previous, reason = common.end_of_step(state, budget, signals)
            state["stopped"] = reason
            finished = bool(reason)
            if reason != "interrupted" and common.eval_due(state, step, loop.eval_interval, previous, loop.eval_batches / 3, final=finished):
                record["val_loss"] = round(evaluate(), 6)
                state["best_val"] = min(state["best_val"], record["val_loss"])
            if world.main:  # rank 0 writes the run directory
                common.append_jsonl(metrics_path, record)
                writer.add_scalar("train/loss", record["loss"], step)
                writer.add_scalar("train/lr", lr, step)
                if "val_loss" in record:
                    writer.add_scalar("val/loss", record["val_loss"], step)
                if step % loop.checkpoint_interval == 0 or finished:
                    save(step)
                    common.save_checkpoint(ckpt_path, state, parts)
                    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name)
                if reason != "interrupted" and (step % loop.sample_interval == 0 or finished):
                    sample_grid(ImagePipeline(ema, meta, dict(scheduler.config)), run_dir, step, loop.samples, loop.seed, writer)
            if progress:
                progress(step, state["progress"], record)
            if finished:
                break
    if not world.main:
        return {"kind": "ddpm", "steps": step, "rank": world.rank, "stopped": state["stopped"] or budget.reason(step, state["elapsed"])}
    writer.close()
    rates = [r["images_per_s"] for r in common.read_jsonl(metrics_path) if "images_per_s" in r][1:]
    return {"kind": "ddpm", "steps": step, "elapsed_s": round(state["elapsed"], 2),
            "stopped": state["stopped"] or budget.reason(step, state["elapsed"]), "best_val_loss": state["best_val"],
            "precision": precision, "device": str(device), "world_size": world.world_size, "condition": meta.condition, "parameters": sum(p.numel() for p in model.parameters()),
            "images_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None}
