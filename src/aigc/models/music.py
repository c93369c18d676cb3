"""The music model: a Llama-architecture decoder over REMI event tokens (``aigc.data.music``).

The same ``transformers`` model class as the text engine, so a run's ``model/`` folder is a standard
Hugging Face checkpoint (``config.json`` + ``model.safetensors`` + a word-level ``tokenizer.json``
over the event names) that ``AutoModelForCausalLM`` loads with no project code. ``aigc_music.json``
beside it (``aigc.run.MusicMeta``) records what the tokens mean: the grid, the voices the model was trained with and the
defaults used when generating.
"""
from __future__ import annotations


from aigc.models.lm import LMConfig

def build(cfg: LMConfig, vocab_size: int, eos_token_id: int, seed: int = 0):
    """A freshly initialised LlamaForCausalLM over the event vocabulary."""
    from aigc.models import lm

    return lm.build(cfg, vocab_size, eos_token_id, seed=seed)
