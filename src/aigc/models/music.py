"""The music model: a Llama-architecture decoder over REMI event tokens (``aigc.data.music``).

The same ``transformers`` model class as the text engine, so a run's ``model/`` folder is a standard
Hugging Face checkpoint (``config.json`` + ``model.safetensors`` + a word-level ``tokenizer.json``
over the event names) that ``AutoModelForCausalLM`` loads with no project code. ``aigc_music.json``
beside it records what the tokens mean: the grid, the voices the model was trained with and the
defaults used when generating.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aigc.errors import UserError
from aigc.models.lm import LMConfig

META = "aigc_music.json"


@dataclass
class MusicMeta:
    format: int = 1
    ticks_per_quarter: int = 4
    voices: list[str] = field(default_factory=list)  # names of voices 0..n-1 (the most common part names)
    time_signature: str = "4/4"  # the most common one in training
    tempo: int = 96
    program: int = 52  # General MIDI program used for rendering (52: choir aahs)
    step: int = 0

    def save(self, folder: Path) -> None:
        (folder / META).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> MusicMeta:
        path = folder / META
        if not path.is_file():
            raise UserError(f"{folder.parent if folder.name == 'model' else folder}: not a music run (no model/{META}); "
                            "train one with `aigc train music`")
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def build(cfg: LMConfig, vocab_size: int, eos_token_id: int, seed: int = 0):
    """A freshly initialised LlamaForCausalLM over the event vocabulary."""
    from aigc.models import lm

    return lm.build(cfg, vocab_size, eos_token_id, seed=seed)
