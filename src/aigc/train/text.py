"""``aigc train text``: one config, two loops. ``task: pretrain`` is next-token prediction on documents
(train/lm.py); ``task: sft`` and ``task: dpo`` tune a pretrained model on conversations or preference pairs
(train/chat.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from aigc.train import chat, lm
from aigc.train.lm import TextTrainConfig

__all__ = ["TextTrainConfig", "prepare_run", "train"]


def prepare_run(cfg: TextTrainConfig, run_dir: Path, overwrite: bool = False) -> None:
    return (lm if cfg.task == "pretrain" else chat).prepare_run(cfg, run_dir, overwrite)


def train(cfg: TextTrainConfig, run_dir: str | Path, resume: bool = False,
          progress: Callable[[int, int, dict], None] | None = None) -> dict:
    return (lm if cfg.task == "pretrain" else chat).train(cfg, run_dir, resume, progress)
