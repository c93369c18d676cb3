"""Music model training: a decoder transformer over REMI event tokens, trained from scratch.

One explicit loop, the text engine's recipe (AdamW, warmup + cosine, clipping, bf16 autocast where
the CPU has it, fixed validation batches, best-checkpoint keeping, early stopping, exact resume: the
batch and dropout noise of step ``s`` depend only on (seed, s)).

Windows: random crops of the token stream, as for text, except that a crop starting inside a piece
has the piece's header (key, time signature, tempo) put in front, so the key conditions every token and
not only a piece's first block (see ``get_batch``).

Augmentation: every training piece is encoded in each transposition of the dataset's range (default
-5..+6 semitones) that stays in the piano range, with its key token moved along, so the model sees all
keys and the key control works for any of them. Validation pieces are scored as written.

Run directory layout::

    config.yaml            resolved config (resume reads only this)
    dataset/manifest.json  the prepared dataset's manifest
    data/{train,val}.bin   token ids (uint16), pieces separated by EOS; data/{train,val}.jsonl the pieces
    model/                 best weights: config.json + model.safetensors + tokenizer + aigc_music.json
    checkpoints/last.pt    resume state
    metrics.jsonl  tb/  loss.png  samples/  summary.json
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from aigc import devices, distributed, threads
from aigc.config import save_yaml
from aigc.errors import UserError
from aigc.models.lm import LMConfig
from aigc.train import common
from aigc.train.lm import DataConfig, LoopConfig, make_optimizer

log = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    transpose: bool = True  # use the dataset's transposition range (manifest augment.transpose)


@dataclass
class MusicTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: LMConfig = field(default_factory=lambda: LMConfig(block_size=512))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        if self.train.epochs:
            raise UserError("train.epochs is for text sft and dpo runs (music samples windows: use train.max_steps)")


HEADER = 4  # <bos> Key TimeSig Tempo: the tokens every piece starts with


def get_batch(data: np.ndarray, starts: np.ndarray, block: int, batch: int, seed: int, step: int,
              micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows chosen by (seed, step, micro) only, each beginning with a piece's header.

    A window that starts inside a piece gets that piece's header put in front (those positions carry
    no loss: target -100), so every token is learnt knowing the key, time signature and tempo. Generation
    does the same when a long context is cut: it keeps the header and the newest tokens.
    ``starts`` holds the index of every piece's ``<bos>``.
    """
    rng = np.random.default_rng([seed, step, micro])
    xs, ys = [], []
    for s in rng.integers(0, len(data) - block - 1, size=batch):
        p = int(starts[np.searchsorted(starts, s, side="right") - 1])  # the piece the window starts in
        if s - p < HEADER:  # the header is (nearly) in the window already: start at it
            x, y = data[p: p + block], data[p + 1: p + block + 1]
        else:
            x = np.concatenate([data[p: p + HEADER], data[s + HEADER: s + block]])
            y = np.concatenate([np.full(HEADER, -100), data[s + HEADER + 1: s + block + 1]])
        xs.append(x.astype(np.int64))
        ys.append(y.astype(np.int64))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))  # (B, T) each


def encode_pieces(pieces, vocab, transpose: tuple[int, int] = (0, 0)) -> np.ndarray:
    """All pieces (and their transpositions in the inclusive range) as one uint16 id stream."""
    parts = []
    for piece in pieces:
        for k in range(transpose[0], transpose[1] + 1):
            shifted = piece.transposed(k)
            if shifted is not None:
                parts.append(np.asarray(vocab.encode(shifted), dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def prepare_run(cfg: MusicTrainConfig, run_dir: Path, overwrite: bool = False) -> None:
    """Create the run directory: config, manifest, tokenizer and the encoded (augmented) pieces."""
    from aigc.data.music import Vocab, load_prepared
    from aigc.data import store

    if not cfg.data.path:
        raise UserError("no training data: pass --data PREPARED_DIR (from `aigc data prepare --kind music`)")
    try:
        store.check_writable(run_dir, overwrite)
    except UserError:
        raise UserError(f"run directory {run_dir} already exists; use --resume to continue it or --overwrite to start over") from None
    train_pieces, val_pieces, manifest = load_prepared(cfg.data.path)
    if not val_pieces:
        raise UserError(f"{cfg.data.path}: the prepared dataset has no validation pieces; prepare it with --val-fraction > 0")
    vocab = Vocab()
    transpose = tuple(manifest["augment"]["transpose"]) if cfg.augment.transpose else (0, 0)
    with store.atomic_folder(run_dir, overwrite) as tmp:
        (tmp / "dataset").mkdir()
        (tmp / "dataset" / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        vocab.to_hf_tokenizer(cfg.model.block_size).save_pretrained(str(tmp / "tokenizer"))
        (tmp / "data").mkdir()
        for split, pieces, shift in (("train", train_pieces, transpose), ("val", val_pieces, (0, 0))):
            ids = encode_pieces(pieces, vocab, shift)
            ids.tofile(tmp / "data" / f"{split}.bin")
            shutil.copyfile(Path(cfg.data.path) / f"{split}.jsonl", tmp / "data" / f"{split}.jsonl")
            (tmp / "data" / f"{split}.json").write_text(json.dumps(
                {"dtype": "uint16", "tokens": int(len(ids)), "pieces": len(pieces), "transpose": list(shift),
                 "notes": sum(len(p.notes) for p in pieces)}))
        save_yaml(asdict(cfg), tmp / "config.yaml")


def run_meta(run_dir: Path):
    """Voices, time signature and tempo most common in the training pieces."""
    from aigc.data.music import Piece
    from aigc.run import MusicMeta

    pieces = [Piece(**json.loads(line)) for line in (run_dir / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    n_voices = Counter(len(p.voices) for p in pieces).most_common(1)[0][0]
    names = [Counter(p.voices[v] for p in pieces if len(p.voices) > v).most_common(1)[0][0] for v in range(n_voices)]
    return MusicMeta(voices=names, time_signature=Counter(p.time_signature for p in pieces).most_common(1)[0][0],
                     tempo=Counter(p.tempo for p in pieces).most_common(1)[0][0])


def save_model(model, tokenizer, meta, out: Path) -> None:
    """Write the HF folder and its aigc_music.json atomically (a temp folder swapped into place)."""
    from aigc.data import store

    with store.atomic_folder(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        meta.save(tmp)


def _load_ids(run_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(run_dir / "data" / f"{split}.bin", dtype=np.uint16)


def train(cfg: MusicTrainConfig, run_dir: str | Path, resume: bool = False,
          progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train (or resume) the music run in ``run_dir``; return the summary also written to summary.json."""
    from aigc.data import tokenizers
    from aigc.models.music import build

    run_dir = Path(run_dir)
    loop, world = cfg.train, distributed.current()
    threads.configure(loop.threads)
    device = distributed.place(devices.resolve(loop.device, "train.device"), world)
    precision = devices.resolve_precision(loop.precision, device)
    distributed.check_batch(loop.batch_size, world)
    tokenizer = tokenizers.load(run_dir / "tokenizer")
    train_ids, val_ids = _load_ids(run_dir, "train"), _load_ids(run_dir, "val")
    bos = tokenizer.bos_token_id
    train_starts, val_starts = np.flatnonzero(train_ids == bos), np.flatnonzero(val_ids == bos)
    block = cfg.model.block_size
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) < block + 2:
            raise UserError(f"the {split} split has {len(ids)} tokens, fewer than one block of {block}; "
                            f"use more scores or a smaller --model.block_size")
    model = build(cfg.model, len(tokenizer), tokenizer.eos_token_id, seed=loop.seed).to(device)
    net = distributed.wrap(model, world, device)  # what the training forward runs through (DDP in a distributed job)
    meta = run_meta(run_dir)
    optimizer = make_optimizer(model, loop)
    params = dict(model.named_parameters())

    metrics_path = run_dir / "metrics.jsonl"
    scaler = devices.grad_scaler(device, precision)
    parts = {"model": model, "optimizer": optimizer, "scaler": common.ScalerPart(scaler)}
    state, ckpt_path = common.resume(run_dir, resume, {"step": 0, "best_val": float("inf"), "bad_evals": 0, "elapsed": 0.0,
                                                        "stopped": ""}, parts)

    writer = common.summary_writer(run_dir, state["step"], world)

    def loss_of(x: torch.Tensor, y: torch.Tensor, module=net) -> torch.Tensor:
        """The mean loss over the global batch's targets (x, y: this rank's rows of it): the header positions carry
        none, so rows differ in how many targets they have, and each rank's sum is divided by the global count."""
        count = int((y != -100).sum())
        x, y = devices.to_device({"x": distributed.shard(x, world), "y": distributed.shard(y, world)}, device).values()
        with devices.autocast(device, precision):
            logits = module(input_ids=x).logits  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum") / max(1, count)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = [loss_of(*get_batch(val_ids, val_starts, block, loop.batch_size, loop.seed + 1, i), module=model).item()
                  for i in range(loop.eval_batches)]
        model.train()
        return distributed.sums([float(np.mean(losses))])[0]  # each rank's share of every batch's mean

    model.train()
    step = state["step"]
    budget = common.Budget(loop.max_steps, loop.max_seconds)
    t_start = time.perf_counter() - state["elapsed"]
    tokens_per_step = loop.batch_size * loop.grad_accum * block
    t_last, last_log_step = time.perf_counter(), step
    with common.StopSignals() as signals:
        while not budget.reason(step, state["elapsed"]):
            threads.adapt()
            done = budget.progress(step, state["elapsed"])  # the clock every rank agreed on
            lr = common.scheduled_lr(state, budget, step, done, loop.lr, loop.min_lr, loop.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            common.seed_step(loop.seed, step, world)
            total = 0.0
            for micro in range(loop.grad_accum):
                with common.no_sync(net, micro < loop.grad_accum - 1):
                    loss = loss_of(*get_batch(train_ids, train_starts, block, loop.batch_size, loop.seed, step, micro))
                    # DDP averages the ranks' gradients; each rank's loss is its share of the global mean
                    scaler.scale(loss * world.world_size / loop.grad_accum).backward()
                total += loss.item() / loop.grad_accum
            total = distributed.sums([total])[0]
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), loop.grad_clip if loop.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            now = time.perf_counter()
            state["elapsed"] = now - t_start
            record = {"step": step, "time_s": round(state["elapsed"], 3), "loss": round(total, 6), "lr": lr,
                      "grad_norm": round(float(grad_norm), 6)}
            if step % 10 == 0 or step == 1:
                record["tokens_per_s"] = round(tokens_per_step * (step - last_log_step) / max(1e-9, now - t_last))
                t_last, last_log_step = now, step
            previous, reason = common.end_of_step(state, budget, signals)
            cost = loop.eval_batches / (3 * loop.grad_accum)  # an evaluation's price in training steps
            if reason != "interrupted" and common.eval_due(state, step, loop.eval_interval, previous, cost, final=bool(reason)):
                val = evaluate()
                record["val_loss"] = round(val, 6)
                if val < state["best_val"] - loop.min_delta:
                    state["best_val"], state["bad_evals"] = val, 0
                    meta.step = step
                    if world.main:
                        save_model(model, tokenizer, meta, run_dir / "model")
                    record["best"] = True
                else:
                    state["bad_evals"] += 1
                    if loop.patience and state["bad_evals"] >= loop.patience:
                        reason = reason or "early_stop"
            state["stopped"] = reason
            if world.main:
                common.append_jsonl(metrics_path, record)
                writer.add_scalar("train/loss", total, step)
                writer.add_scalar("train/lr", lr, step)
                if "val_loss" in record:
                    writer.add_scalar("val/loss", record["val_loss"], step)
                    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name, ylabel="loss (nats/event token)")
            if step % loop.checkpoint_interval == 0 or reason:
                common.save_checkpoint(ckpt_path, state, parts)
            if progress:
                progress(step, state["progress"], record)
            if reason:
                break
    if not world.main:  # rank 0 writes the run directory's results
        return {"steps": step, "rank": world.rank, "stopped": state["stopped"] or budget.reason(step, state["elapsed"])}
    writer.close()
    if not (run_dir / "model").is_dir():
        meta.step = step
        save_model(model, tokenizer, meta, run_dir / "model")
    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name, ylabel="loss (nats/event token)")
    rates = [r["tokens_per_s"] for r in common.read_jsonl(metrics_path) if "tokens_per_s" in r][1:]
    summary = {
        "steps": step,
        "best_val_loss": state["best_val"],
        "elapsed_s": round(state["elapsed"], 2),
        "precision": precision,
        "device": str(device),
        "world_size": world.world_size,
        "block_size": block,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(len(train_ids)),
        "tokens_per_s": round(float(np.median(rates))) if rates else None,
        "threads": threads.current().to_dict(),
        "stopped": state["stopped"] or budget.reason(step, state["elapsed"]),
    }
    if loop.samples and summary["stopped"] != "interrupted":
        from aigc.generate.music import MusicParams, MusicPipeline

        pipe = MusicPipeline.from_run(run_dir, device=device)
        folder = run_dir / "samples"
        folder.mkdir(exist_ok=True)
        for i in range(loop.samples):
            result = pipe.generate(MusicParams(bars=4, seed=loop.seed + i, max_tokens=loop.sample_tokens * 4))
            result.write_midi(folder / f"sample-{i}.mid")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
