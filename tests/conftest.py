import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

AIGC = [sys.executable, "-m", "aigc.cli"]


@pytest.fixture(scope="session")
def pydoc_corpus(tmp_path_factory) -> Path:
    """The built-in English corpus, prepared once per session."""
    from aigc.data.text import prepare

    out = tmp_path_factory.mktemp("corpus") / "pydoc"
    prepare([], out, builtin=["pydoc"])
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, pydoc_corpus) -> Path:
    """A tiny character-level model trained for a few steps (shared by generate/eval tests)."""
    from aigc.config import load_config
    from aigc.train.lm import TextTrainConfig, prepare_run, train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(TextTrainConfig, Path(__file__).parents[1] / "src/aigc/configs/text/tiny.yaml",
                      {"data": {"path": str(pydoc_corpus)}, "train": {"max_steps": 40}})
    prepare_run(cfg, run)
    train(cfg, run)
    return run
