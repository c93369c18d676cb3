"""Functions every training loop shares: checkpoints, the LR schedule, metrics, precision, plots.

Plain functions on purpose: each loop stays readable on its own (see DESIGN.md, conventions 2).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``total`` (flat after it)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 dot products (AVX-512 BF16 or AMX), so autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file and a rename, so a kill mid-write never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def plot_loss(metrics_path: Path, out_png: Path, title: str = "", ylabel: str = "loss (nats/token)",
              series: tuple[tuple[str, str], ...] = (("loss", "train"),)) -> None:
    """Training series and the validation loss against step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in series:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=0.8, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
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
