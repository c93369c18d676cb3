"""Functions every training loop shares: checkpoints, the LR schedule, metrics, precision, plots.

Plain functions on purpose: each loop stays readable on its own (see DESIGN.md, conventions 2).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aigc import distributed
from aigc.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Budget:
    """What ends a run, steps or seconds (whichever comes first), and how far along it is (0..1).

    With a time budget the schedule runs on time: progress is the larger of the step and time
    fractions, so the cosine reaches its floor when the budget does, and the loop stops at the first
    step boundary past it. The progress never jumps back, so a progress bar over it does not either.
    """

    max_steps: int
    max_seconds: float = 0.0

    def progress(self, step: int, elapsed: float) -> float:
        done = step / self.max_steps
        if self.max_seconds:
            done = max(done, elapsed / self.max_seconds)
        return min(1.0, done)

    def reason(self, step: int, elapsed: float) -> str:
        """"steps" or "budget" once the run is over, else ""."""
        if step >= self.max_steps:
            return "steps"
        if self.max_seconds and elapsed >= self.max_seconds:
            return "budget"
        return ""


STOP_REASONS = {"steps": "reached train.max_steps", "budget": "used the train.max_seconds budget",
                "early_stop": "early stop: no improvement in train.patience evaluations", "interrupted": "interrupted"}


def cosine_lr(step: int, progress: float, lr: float, min_lr: float, warmup: int, warmup_end: float) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at progress 1.

    ``warmup_end`` is the progress at which warmup ended (``warmup / max_steps`` for a run counted
    in steps), so the decay spans exactly what is left of the run.
    """
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1e-9, 1.0 - warmup_end)
    done = min(1.0, max(0.0, (progress - warmup_end) / span))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * done)) * (lr - min_lr)


def scheduled_lr(state: dict, budget: Budget, step: int, progress: float, lr: float, min_lr: float, warmup: int) -> float:
    """The rate of the step about to run. Counted in steps, warmup ends at ``warmup / max_steps`` (so a run
    extended on resume follows the longer schedule exactly); on a time budget, where it ends is known only
    then, and is kept in ``state`` (saved with checkpoints)."""
    if not budget.max_seconds:
        return cosine_lr(step, progress, lr, min_lr, warmup, min(1.0, warmup / budget.max_steps))
    if step >= warmup and "warmup_end" not in state:
        state["warmup_end"] = progress
    return cosine_lr(step, progress, lr, min_lr, warmup, state.get("warmup_end", 0.0))


def end_of_step(state: dict, budget: Budget, signals: "StopSignals") -> tuple[float, str]:
    """After a step: the progress before it, and what ends the run now ("" while it goes on). The new
    progress is kept in ``state`` (checkpoints carry it). In a distributed job the clock is the slowest rank's and
    a signal on any rank stops all, so every rank takes the same decision (and the same learning rate next)."""
    state["elapsed"], interrupted = distributed.agree(state["elapsed"], bool(signals.received))
    previous = state.get("progress", 0.0)
    state["progress"] = budget.progress(state["step"], state["elapsed"])
    return previous, "interrupted" if interrupted else budget.reason(state["step"], state["elapsed"])


def eval_due(state: dict, step: int, interval: int, previous: float, cost: float, final: bool = False) -> bool:
    """Whether to evaluate after this step: at the end, every ``interval`` steps, and when the run passes
    another tenth of itself with no evaluation in the last tenth, so a short or time-budgeted run still
    draws a validation curve of about ten points. Those extra evaluations stop where all evaluations
    would cost more than a tenth of the steps run (``cost``: one evaluation's price in training steps,
    about eval_batches / 3 as a forward pass is a third of a training step); counted in steps, not
    seconds, so where they fall is the same in a resumed run. Records the evaluation in ``state``."""
    done = state["progress"]
    extra = (int(done * 10) > int(previous * 10) and done - state.get("eval_progress", 0.0) >= 0.1 - 1e-9
             and (state.get("evals", 0) + 1) * cost <= 0.1 * step)
    due = final or step % interval == 0 or extra
    if due:
        state["eval_progress"], state["evals"] = done, state.get("evals", 0) + 1
    return due


def seed_step(seed: int, step: int, world: "distributed.World") -> None:
    """Seed torch's generator for one step (its dropout noise): a function of (seed, step, rank) only, so a resumed
    run draws the same noise, and the ranks of a distributed job different noise for their different rows."""
    torch.manual_seed(seed * 1_000_003 + step + world.rank * 7_919_000_003)


def no_sync(net: torch.nn.Module, skip: bool):
    """DDP's ``no_sync`` while ``skip`` (the micro-steps before the last of an accumulated step: their gradients are
    averaged with the last one's, in one exchange); nothing to skip for a single process."""
    from contextlib import nullcontext

    return net.no_sync() if skip and hasattr(net, "no_sync") else nullcontext()


def summary_writer(run_dir: Path, step: int, world: "distributed.World"):
    """The run's TensorBoard writer (rank 0's; None on the others), cutting what a resumed run logged after ``step``."""
    if not world.main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if step else None)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while a loop runs: the loop finishes its step, writes a checkpoint
    and returns with ``stopped: "interrupted"``; a second signal stops at once (KeyboardInterrupt).

    Handlers can only be installed in the main thread; elsewhere the signals keep their defaults.
    """

    def __init__(self):
        self.received = ""
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


@dataclass
class DPOStats:
    loss: torch.Tensor  # mean over the batch
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log ref) of the chosen answer
    rejected_rewards: torch.Tensor
    margins: torch.Tensor  # chosen - rejected rewards
    accuracy: float  # share of pairs whose chosen reward is the higher one


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> DPOStats:
    """Direct preference optimisation, the sigmoid loss (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((log pi(yw) -
    log ref(yw)) - (log pi(yl) - log ref(yl)))), with the rewards and the preference accuracy TRL logs."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margins = chosen - rejected
    return DPOStats(-torch.nn.functional.logsigmoid(margins).mean(), chosen.detach(), rejected.detach(), margins.detach(),
                    float((margins > 0).float().mean()))


def epoch_order(n: int, batch: int, seed: int, start: int) -> list[int]:
    """Indices ``start .. start + batch`` of an endless walk through ``n`` examples, a fresh permutation of them each
    epoch: every example is seen once per epoch, and the walk depends only on (seed, position), so a resumed run
    reads the same examples at the same step."""
    out = []
    for i in range(start, start + batch):
        epoch, k = divmod(i, n)
        out.append(int(_permutation(n, seed, epoch)[k]))
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int):
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(n)


def fit_tokenizer(tokenizer, texts: list[str], settings) -> dict:
    """The base tokenizer's coverage of a fine-tune's data (``settings``: the run's tokenizer section); refuses when
    too much of it would become the unknown token, unless ``settings.extend`` adds the missing characters."""
    from aigc.data import tokenizers

    cov = tokenizers.coverage(tokenizer, texts)
    report = cov.to_dict()
    if cov.rate > settings.max_unknown_rate and not settings.extend:
        raise UserError(f"{cov.rate:.1%} of the training tokens are unknown to the base model's tokenizer "
                        f"({len(cov.missing)} characters it cannot encode, such as {report['most_common_missing'][:10]!r}): "
                        "the model would learn to predict <unk>. Add them with --tokenizer.extend=true "
                        f"(or allow it with --tokenizer.max_unknown_rate={cov.rate:.2f})")
    if settings.extend and cov.missing:
        report["added_tokens"] = tokenizers.extend(tokenizer, cov.missing)
        report["unknown_token_rate_after"] = round(tokenizers.coverage(tokenizer, texts).rate, 6)
        log.info("tokenizer extended with %d characters", report["added_tokens"])
    return report


def to_cpu(obj: Any) -> Any:
    """A state dict (nested dicts and lists of tensors) with every tensor on the CPU: checkpoints do not depend on
    the device they were written from."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")  # no copy when it is there already: torch.save writes it at once
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file and a rename, so a kill mid-write never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resume(run_dir: Path, resume: bool, state: dict, parts: dict) -> tuple[dict, Path]:
    """(the loop's state, its checkpoint path). Resuming from ``checkpoints/last.pt``: every part (a module
    or an optimizer, by its key in the checkpoint) gets its saved state, the counters come back, and the
    metrics log is cut at the checkpoint's step; otherwise (a fresh start, or a run killed before its first
    checkpoint) ``state`` is returned as given and the metrics log starts empty."""
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    ckpt_path.parent.mkdir(exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    world = distributed.current()
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        distributed.check_resume(ckpt["state"], world)
        if ckpt["state"].get("fsdp", False) != state.get("fsdp", False):
            raise UserError(f"this run was trained with train.fsdp={ckpt['state'].get('fsdp', False)}; resume it the same way")
        for key, part in parts.items():
            if key not in ckpt and isinstance(part, ScalerPart):  # a checkpoint from before the loop had a scaler
                continue
            part.load_state_dict(ckpt[key])
        state = ckpt["state"]
        state["stopped"] = ""  # the budget comes from the config, which --train.* may have extended
        if world.main:
            truncate_metrics(metrics_path, state["step"])
        log.info("resumed from step %d", state["step"])
    else:
        state = {**state, "world_size": world.world_size}
        if world.main:
            metrics_path.unlink(missing_ok=True)
    return state, ckpt_path


class ScalerPart:
    """The fp16 gradient scaler as a checkpoint part: empty, and ignored, when it is off (bf16, fp32), so a run may
    resume on another device."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        if saved and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved)


def save_checkpoint(path: Path, state: dict, parts: dict) -> None:
    """What ``resume`` reads: each part's state under its key, and the counters (rank 0 writes, for all)."""
    main = distributed.current().main
    # a part whose state is sharded over the ranks (FSDP2) is gathered by all of them; the others only on rank 0
    states = {key: part.state_dict() for key, part in parts.items() if main or getattr(part, "collective", False)}
    if main:
        atomic_torch_save({**{key: to_cpu(v) for key, v in states.items()}, "state": dict(state)}, path)


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill: everything after it is dropped on resume anyway
            break
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint being resumed, so the log reads as one clean run."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def log_axis(values: list[float]) -> bool:
    """A log y-axis when the positive values span more than a decade (an ELBO falling from 3000 to
    40 is a flat line after its first steps on a linear axis)."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return len(positive) == len(values) and len(positive) > 1 and max(positive) / min(positive) > 10


def plot_loss(metrics_path: Path, out_png: Path, title: str = "", ylabel: str = "loss (nats/token)",
              series: tuple[tuple[str, str], ...] = (("loss", "train"),)) -> None:
    """Training series and the validation loss against step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    shown = [v for _, v in val]
    for key, label in series:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=0.8, alpha=0.8)
            shown += [v for _, v in points]
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3, linewidth=1.5)
    if log_axis(shown):
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
