"""Instruction tuning of a pretrained causal LM: supervised fine-tuning (``task: sft``) on conversations and direct
preference optimisation (``task: dpo``) on chosen/rejected pairs, fully or with LoRA.

One explicit loop (``train``), with the pretraining loop's properties (train/lm.py): AdamW, warmup + cosine
schedule, gradient accumulation and clipping, bf16 autocast, evaluation on fixed validation rows, best-checkpoint
keeping, early stopping, TensorBoard and a loss plot, and exact resume after ``kill -9``: the rows of step ``s``
are a function of (seed, s) only (an epoch-by-epoch permutation), and the checkpoint holds the trainable weights,
the optimizer state and the counters.

- SFT: each conversation is encoded turn by turn with the model's chat template (data/chat_tokens.py); the loss is
  the mean over the supervised tokens (assistant turns and their end-of-turn token) of the batch. With
  ``chat.packing`` several examples share a row, kept apart by positions that restart per example.
- DPO: the sigmoid loss with ``dpo.beta`` (train/common.dpo_loss). The reference is the starting model, frozen:
  with LoRA the same model with its adapter disabled (no second copy in memory), otherwise a frozen copy, as TRL
  does. Logged as TRL logs it: rewards of the chosen and rejected answers, their margin and the preference accuracy.

Run directory: as train/lm.py's, with the encoded rows in ``data/{train,val}.jsonl`` (ids and labels, or pairs of
them), the held-out conversations in ``data/val.records.jsonl`` (what ``aigc eval text`` answers), and the chat
template saved in ``tokenizer_config.json``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aigc import devices, distributed, threads
from aigc.config import save_yaml
from aigc.data.chat_tokens import IGNORE, encode_chat, ensure_chat_template, pack, tool_call_text, tools_prompt
from aigc.errors import UserError
from aigc.train import common
from aigc.train.lm import ModelWriter, TextTrainConfig, checkpoint_parts, decoder_layers, make_model, make_optimizer

log = logging.getLogger(__name__)

DATA_KIND = {"sft": "chat", "dpo": "preference"}


# ---------------------------------------------------------------- data

def _texts(records: list[dict]) -> list[str]:
    """What training tokenises: every turn, tool calls as the model writes them and the tools as the prompt lists them."""
    out = [m["content"] for r in records for key in ("messages", "prompt", "chosen", "rejected") for m in r.get(key, [])]
    out += [tool_call_text(m["tool_calls"]) for r in records for m in r.get("messages", []) if m.get("tool_calls")]
    out += [tools_prompt(r["tools"]) for r in records if r.get("tools")]
    return out


def encode_sft(tokenizer, records: list[dict], cfg: TextTrainConfig, block: int) -> tuple[list[dict], dict]:
    """Rows of ids and labels (packed to ``block`` or one example each) and what encoding dropped or cut."""
    encoded, stats = [], {"examples": len(records), "no_supervised_tokens": 0, "truncated": 0}
    for r in records:
        e = encode_chat(tokenizer, r["messages"], train_on_prompt=cfg.chat.train_on_prompt, mask_history=cfg.chat.mask_history,
                        tools=r.get("tools"))
        if len(e.input_ids) > block:
            stats["truncated"] += 1
            e.input_ids, e.labels = e.input_ids[:block], e.labels[:block]
        if all(label == IGNORE for label in e.labels[1:]):  # nothing left to learn from (the first token is never predicted)
            stats["no_supervised_tokens"] += 1
            continue
        encoded.append(e)
    if cfg.chat.packing:
        rows = [{"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids, "length": r.length}
                for r in pack(encoded, block, tokenizer.pad_token_id)]
    else:
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    stats.update(kept=len(encoded), rows=len(rows), tokens=sum(len(e.input_ids) for e in encoded),
                 supervised_tokens=sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in encoded))
    return rows, stats


def _answer(tokenizer, prompt: list[dict], answer: list[dict], block: int) -> tuple[list[int], list[int]]:
    """Ids of prompt + answer, labelled on the answer only (its end-of-turn token included), cut to ``block``."""
    start = len(encode_chat(tokenizer, prompt, add_generation_prompt=True).input_ids)
    e = encode_chat(tokenizer, prompt + answer, train_on_prompt=True)
    labels = [IGNORE] * start + e.labels[start:]
    return e.input_ids[:block], labels[:block]


def encode_dpo(tokenizer, records: list[dict], block: int) -> tuple[list[dict], dict]:
    rows, stats = [], {"examples": len(records), "no_supervised_tokens": 0, "truncated": 0}
    for r in records:
        pair = {}
        for side in ("chosen", "rejected"):
            ids, labels = _answer(tokenizer, r["prompt"], r[side], block + 1)
            if len(ids) > block:
                stats["truncated"] += 1
                ids, labels = ids[:block], labels[:block]
            pair[side] = {"input_ids": ids, "labels": labels}
        if any(all(x == IGNORE for x in pair[s]["labels"]) for s in pair):
            stats["no_supervised_tokens"] += 1
            continue
        rows.append(pair)
    stats.update(kept=len(rows), rows=len(rows),
                 tokens=sum(len(p[s]["input_ids"]) for p in rows for s in p))
    return rows, stats


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def prepare_run(cfg: TextTrainConfig, run_dir: Path, overwrite: bool = False) -> None:
    """Create the run directory: config, dataset manifest (with the tokenizer's coverage of it), the tokenizer with
    its chat template, and the encoded rows. Built in a temp folder and renamed into place."""
    from aigc.data import chat as chat_data
    from aigc.data import store
    from aigc.models.lm import load_pretrained_tokenizer

    if not cfg.data.path:
        raise UserError(f"no training data: pass --data PREPARED_DIR (from `aigc data prepare --kind {DATA_KIND[cfg.task]}`)")
    try:
        store.check_writable(run_dir, overwrite)
    except UserError:
        raise UserError(f"run directory {run_dir} already exists; use --resume to continue it or --overwrite to start over") from None
    train_records, val_records, manifest = chat_data.load_prepared(cfg.data.path, DATA_KIND[cfg.task])
    if not val_records:
        raise UserError(f"{cfg.data.path}: the prepared dataset has no validation records; prepare it with --val-fraction > 0")
    tokenizer = load_pretrained_tokenizer(cfg.init.path)
    template = ensure_chat_template(tokenizer)
    tokenizer.model_max_length = max(tokenizer.model_max_length, cfg.model.block_size)
    manifest = {**manifest, "tokenizer_coverage": common.fit_tokenizer(tokenizer, _texts(train_records), cfg.tokenizer)}
    block = cfg.model.block_size
    encode = (lambda recs: encode_sft(tokenizer, recs, cfg, block)) if cfg.task == "sft" else (lambda recs: encode_dpo(tokenizer, recs, block))
    with store.atomic_folder(run_dir, overwrite) as tmp:
        (tmp / "dataset").mkdir()
        (tmp / "dataset" / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        tokenizer.save_pretrained(str(tmp / "tokenizer"), save_jinja_files=False)
        (tmp / "data").mkdir()
        for split, records in (("train", train_records), ("val", val_records)):
            rows, stats = encode(records)
            if not rows:
                raise UserError(f"{cfg.data.path}: no {split} example has a supervised token left within "
                                f"--model.block_size={block}; raise it or check the data")
            _write_jsonl(tmp / "data" / f"{split}.jsonl", rows)
            (tmp / "data" / f"{split}.json").write_text(json.dumps({"task": cfg.task, "chat_template": template, **stats}))
        _write_jsonl(tmp / "data" / "val.records.jsonl", val_records)
        save_yaml(asdict(cfg), tmp / "config.yaml")


# ---------------------------------------------------------------- batches

def sft_batch(rows: list[dict], pad_id: int) -> dict:
    """Tensors of a batch of SFT rows: packed rows carry position ids and need no mask; others are right-padded."""
    if "position_ids" in rows[0]:
        out = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
        return {**out, "tokens": sum(r["length"] for r in rows)}
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    labels = torch.full((len(rows), n), IGNORE)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[b, :k], labels[b, :k], mask[b, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "tokens": int(mask.sum())}


def dpo_batch(pairs: list[dict], pad_id: int) -> dict:
    """The chosen answers then the rejected ones, as one right-padded batch of 2B rows (one forward pass for both)."""
    return sft_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def _parts(model):
    """(the decoder stack, the output layer) of a causal LM, a LoRA-wrapped one included (its adapters sit inside)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def supervised_logits(model, batch: dict, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at the positions whose next token is supervised (N, V), those tokens (N,), their row (N,)).

    The output layer runs only where a loss is taken: with a 49k vocabulary it is a large part of a step, and most
    positions of a conversation are the prompt."""
    decoder, head = _parts(model)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "tokens")}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE  # (B, T-1)
    with devices.autocast(targets.device, precision):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, C)
        logits = head(hidden[:, :-1][keep])  # (N, V)
    rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[keep]
    return logits.float(), targets[keep], rows


class SupervisedLM(torch.nn.Module):
    """``supervised_logits`` as a module's forward: what DistributedDataParallel wraps, since DDP averages the
    gradients of what ran through its own forward."""

    def __init__(self, model, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, batch: dict):
        return supervised_logits(self.model, batch, self.precision)


def _logits(model, batch: dict, precision: str):
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, SupervisedLM)):
        return model(batch)  # a SupervisedLM (inside DDP, or itself the FSDP2 root)
    return supervised_logits(model, batch, precision)


def supervised_count(rows: list[dict]) -> int:
    """How many supervised next tokens ``rows`` hold (as ``supervised_logits`` counts them)."""
    return sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows)


def sft_loss(model, batch: dict, precision: str, count: int = 0) -> tuple[torch.Tensor, int]:
    """(the cross-entropy summed over the batch's supervised tokens, divided by ``count``: by default how many there
    were, the mean; in a distributed job the global batch's count, so the ranks' losses add up to its mean),
    and how many there were."""
    logits, targets, _ = _logits(model, batch, precision)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / max(1, count or len(targets)), len(targets)


def answer_logprobs(model, batch: dict, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probabilities of each row's answer, its token count): (2B,), (2B,)."""
    logits, targets, rows = _logits(model, batch, precision)
    picked = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    n, device = batch["labels"].shape[0], picked.device
    return (torch.zeros(n, device=device).index_add(0, rows, picked),
            torch.zeros(n, dtype=torch.long, device=device).index_add(0, rows, torch.ones_like(rows)))


def reference_logprobs(model, reference, batch: dict, precision: str, net=None) -> torch.Tensor:
    """The frozen starting model's log-probabilities: the LoRA model with its adapter off (through ``net`` when the
    model is sharded), or the frozen copy."""
    with torch.no_grad(), (model.disable_adapter() if reference is None else nullcontext()):
        return answer_logprobs(reference if reference is not None else net if net is not None else model, batch, precision)[0]


def preference_stats(model, reference, batch: dict, beta: float, precision: str, net=None,
                     sharded: bool = False) -> tuple[common.DPOStats, torch.Tensor]:
    """The DPO loss of a batch and, per pair, whether the policy's mean per-token log-probability prefers the chosen
    answer (a preference that needs no reference, so a model can be scored before any DPO). ``net``: what the
    policy's forward runs through when it trains (DDP in a distributed job; with ``sharded``, the FSDP2 root, which
    every forward must go through)."""
    logp, n = answer_logprobs(net if net is not None else model, batch, precision)
    ref = reference_logprobs(model, reference, batch, precision, net if sharded else None)
    half = logp.shape[0] // 2
    stats = common.dpo_loss(logp[:half], logp[half:], ref[:half], ref[half:], beta)
    mean = logp.detach() / n.clamp(min=1)
    return stats, mean[:half] > mean[half:]


# ---------------------------------------------------------------- the loop

def train(cfg: TextTrainConfig, run_dir: str | Path, resume: bool = False,
          progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train (or resume) the SFT or DPO run in ``run_dir``; return the summary also written to summary.json."""
    from aigc.data import tokenizers

    run_dir = Path(run_dir)
    loop, dpo, world = cfg.train, cfg.task == "dpo", distributed.current()
    threads.configure(loop.threads)
    device = distributed.place(devices.resolve(loop.device, "train.device"), world)
    precision = devices.resolve_precision(loop.precision, device)
    distributed.check_batch(loop.batch_size, world)
    tokenizer = tokenizers.load(run_dir / "tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows, val_rows = common.read_jsonl(run_dir / "data" / "train.jsonl"), common.read_jsonl(run_dir / "data" / "val.jsonl")
    val_rows = val_rows[: loop.eval_batches * loop.batch_size]

    model = make_model(cfg, tokenizer).to(device)
    context = getattr(model.config, "max_position_embeddings", cfg.model.block_size)
    if cfg.model.block_size > context:
        raise UserError(f"--model.block_size={cfg.model.block_size} is longer than the model's context of {context} tokens")
    reference = None
    fsdp = loop.fsdp
    if dpo and not cfg.lora.enabled:
        if fsdp:
            raise UserError("train.fsdp with DPO needs LoRA (lora.enabled=true): the frozen reference of a full DPO would be "
                            "a whole copy of the model in every process")
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if fsdp:  # sharded: every forward, the reference's included, goes through the root
        net = distributed.fsdp2(SupervisedLM(model, precision), decoder_layers(model), world)
    else:
        net = distributed.wrap(SupervisedLM(model, precision), world, device) if world.active else model
    scorer = net if fsdp else model  # what evaluation runs through
    optimizer = make_optimizer(model, loop)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    metrics_path = run_dir / "metrics.jsonl"
    state = {"step": 0, "best_val": float("inf"), "bad_evals": 0, "elapsed": 0.0, "stopped": "", "fsdp": fsdp}
    scaler = devices.grad_scaler(device, precision)
    parts = checkpoint_parts(net, trainable, optimizer, scaler, fsdp)
    state, ckpt_path = common.resume(run_dir, resume, state, parts)

    writer = common.summary_writer(run_dir, state["step"], world)
    collate = dpo_batch if dpo else sft_batch
    local_val = val_rows[world.rank :: world.world_size]  # each rank scores its share of the held-out rows

    def make_batch(rows: list[dict], pad_id: int) -> dict:
        return devices.to_device(collate(rows, pad_id), device)

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        out: dict = {}
        if dpo:
            loss_sum, correct, wins, pairs = 0.0, 0, 0, 0
            for i in range(0, len(local_val), loop.batch_size):
                stats, prefers = preference_stats(model, reference, make_batch(local_val[i : i + loop.batch_size], pad),
                                                  cfg.dpo.beta, precision, net=scorer if fsdp else None, sharded=fsdp)
                loss_sum += float(stats.loss) * len(prefers)
                correct, wins, pairs = correct + int((stats.margins > 0).sum()), wins + int(prefers.sum()), pairs + len(prefers)
            loss_sum, correct, wins, pairs = distributed.sums([loss_sum, correct, wins, pairs])
            out = {"val_loss": loss_sum / pairs, "val_reward_accuracy": correct / pairs, "val_preference_accuracy": wins / pairs}
        else:
            total, count = 0.0, 0
            for i in range(0, len(local_val), loop.batch_size):
                loss, n = sft_loss(scorer, make_batch(local_val[i : i + loop.batch_size], pad), precision)
                total, count = total + float(loss) * n, count + n
            total, count = distributed.sums([total, count])
            out = {"val_loss": total / max(1, count)}
        model.train()
        return out

    write_model = ModelWriter(net, model, tokenizer, run_dir, cfg, fsdp, world)

    if "start" not in state:  # the held-out scores of the starting model, once per run: what tuning is measured against
        state["start"] = {k: round(v, 6) for k, v in evaluate().items()}
    model.train()
    step = state["step"]
    max_steps = loop.max_steps
    if loop.epochs:  # passes over the training rows, capped by train.max_steps
        max_steps = min(max_steps, max(1, math.ceil(loop.epochs * len(train_rows) / (loop.batch_size * loop.grad_accum))))
    budget = common.Budget(max_steps, loop.max_seconds)
    t_start = time.perf_counter() - state["elapsed"]
    t_last, tokens_since = time.perf_counter(), 0
    with common.StopSignals() as signals:
        while not budget.reason(step, state["elapsed"]):
            threads.adapt()
            done = budget.progress(step, state["elapsed"])  # the clock every rank agreed on
            lr = common.scheduled_lr(state, budget, step, done, loop.lr, loop.min_lr, loop.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            common.seed_step(loop.seed, step, world)  # dropout noise is a function of the step (and the rank) too
            total, extra = 0.0, {}
            for micro in range(loop.grad_accum):
                picked = common.epoch_order(len(train_rows), loop.batch_size, loop.seed, (step * loop.grad_accum + micro) * loop.batch_size)
                rows = [train_rows[i] for i in picked]  # the global batch; this rank trains on its share
                batch = make_batch(distributed.shard(rows, world), pad)
                tokens_since += batch["tokens"]
                with common.no_sync(net, micro < loop.grad_accum - 1):  # DDP averages gradients once, at the last micro-step
                    if dpo:  # the mean over pairs: equal shares, so the ranks' mean is the batch's
                        stats, _ = preference_stats(model, reference, batch, cfg.dpo.beta, precision, net=net, sharded=fsdp)
                        loss, share = stats.loss, stats.loss
                        for key, value in (("rewards_chosen", stats.chosen_rewards.mean()), ("rewards_rejected", stats.rejected_rewards.mean()),
                                           ("reward_margin", stats.margins.mean()), ("reward_accuracy", stats.accuracy)):
                            extra[key] = extra.get(key, 0.0) + float(value) / loop.grad_accum
                    else:  # the mean over the global batch's supervised tokens: this rank's share of it
                        share, _ = sft_loss(net, batch, precision, count=supervised_count(rows))
                        loss = share * world.world_size  # DDP averages over the ranks
                    scaler.scale(loss / loop.grad_accum).backward()
                total += share.item() / loop.grad_accum
            total = (distributed.mean if dpo else distributed.sums)([total])[0]
            extra = dict(zip(extra, distributed.mean(list(extra.values()))))
            scaler.unscale_(optimizer)  # clipping sees the true gradients (a no-op unless fp16)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), loop.grad_clip if loop.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            now = time.perf_counter()
            state["elapsed"] = now - t_start
            record = {"step": step, "time_s": round(state["elapsed"], 3), "loss": round(total, 6), "lr": lr,
                      "grad_norm": round(float(grad_norm), 6), "epoch": round(step * loop.grad_accum * loop.batch_size / len(train_rows), 4),
                      **{k: round(v, 6) for k, v in extra.items()}}
            if step % 10 == 0 or step == 1:  # (the same steps on every rank: the sum is a collective)
                record["tokens_per_s"] = round(distributed.sums([tokens_since])[0] / max(1e-9, now - t_last))
                t_last, tokens_since = now, 0
            previous, reason = common.end_of_step(state, budget, signals)
            cost = len(val_rows) / (3 * loop.batch_size * loop.grad_accum)  # an evaluation's price in training steps
            if reason != "interrupted" and common.eval_due(state, step, loop.eval_interval, previous, cost, final=bool(reason)):
                scores = evaluate()
                record.update({k: round(v, 6) for k, v in scores.items()})
                if scores["val_loss"] < state["best_val"] - loop.min_delta:
                    state["best_val"], state["bad_evals"] = scores["val_loss"], 0
                    write_model()
                    record["best"] = True
                else:
                    state["bad_evals"] += 1
                    if loop.patience and state["bad_evals"] >= loop.patience:
                        reason = reason or "early_stop"
            state["stopped"] = reason
            if world.main:
                common.append_jsonl(metrics_path, record)
                for key in ("loss", "lr", *extra):
                    writer.add_scalar(f"train/{key}", record[key], step)
                for key in [k for k in record if k.startswith("val_")]:
                    writer.add_scalar(f"val/{key[4:]}", record[key], step)
                if "val_loss" in record:
                    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name)
            if step % loop.checkpoint_interval == 0 or reason:
                common.save_checkpoint(ckpt_path, state, parts)
            if progress:
                progress(step, state["progress"], record)
            if reason:
                break
    if not write_model.written:
        write_model()
    if not world.main:  # rank 0 writes the run directory's results
        return {"task": cfg.task, "steps": step, "rank": world.rank, "stopped": state["stopped"] or budget.reason(step, state["elapsed"])}
    writer.close()
    common.plot_loss(metrics_path, run_dir / "loss.png", title=run_dir.name)
    records = common.read_jsonl(metrics_path)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # step 1 is warm-up
    last_eval = next((r for r in reversed(records) if "val_loss" in r), {})
    data = json.loads((run_dir / "data" / "train.json").read_text())
    manifest = json.loads((run_dir / "dataset" / "manifest.json").read_text(encoding="utf-8"))
    summary = {
        "task": cfg.task,
        "steps": step,
        "best_val_loss": state["best_val"],
        "elapsed_s": round(state["elapsed"], 2),
        "precision": precision,
        "device": str(device),
        "world_size": world.world_size,
        "strategy": "fsdp2" if fsdp else "ddp" if world.active else "single",
        "block_size": cfg.model.block_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "tokens_per_s": round(float(np.median(rates))) if rates else None,
        "epochs": round(step * loop.grad_accum * loop.batch_size / len(train_rows), 3),
        "data": data,
        "tokenizer_coverage": manifest.get("tokenizer_coverage"),
        "start": state["start"],
        "threads": threads.current().to_dict(),
        "stopped": state["stopped"] or budget.reason(step, state["elapsed"]),
        **{k: v for k, v in last_eval.items() if k.startswith("val_") and k != "val_loss"},
    }
    if loop.samples and summary["stopped"] != "interrupted":
        _write_samples(run_dir, loop, device)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def _write_samples(run_dir: Path, loop, device) -> None:
    """Answers to the first held-out prompts, with the run's chat template."""
    from aigc.generate.text import SamplingParams, TextGenerator

    records = common.read_jsonl(run_dir / "data" / "val.records.jsonl")[: loop.samples]
    prompts = [r["messages"][:-1] if "messages" in r else r["prompt"] for r in records]
    gen = TextGenerator.from_path(run_dir, device=device)
    outs = gen.chat(prompts, SamplingParams(max_new_tokens=loop.sample_tokens, temperature=0.0, seed=loop.seed))
    parts = [f"{p[-1]['content']}\n>>>\n{o.text}" for p, o in zip(prompts, outs)]
    (run_dir / "samples.txt").write_text("\n\n----\n\n".join(parts) + "\n", encoding="utf-8")
