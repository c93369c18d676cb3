"""Tokenizers trained with the ``tokenizers`` library and saved as ``tokenizer.json``.

Both kinds load with ``transformers.PreTrainedTokenizerFast`` / ``AutoTokenizer``:

- ``char``: one token per character seen in training (plus ``<unk>``); exact for small alphabets
  (Tiny Shakespeare's 65 characters) and a strong baseline for Chinese, where a character is a word piece.
- ``bpe``: byte-level BPE (GPT-2 style): no unknown tokens, any UTF-8 text round-trips.

Documents are separated by ``<|endoftext|>``, which also serves as BOS, EOS and padding.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Literal

from aigc.errors import UserError

EOS = "<|endoftext|>"
UNK = "<unk>"


def train_char(texts: Iterable[str], min_frequency: int = 1, max_vocab: int = 0):
    """A character-level tokenizer over the characters of ``texts`` (most frequent first if capped)."""
    from tokenizers import Tokenizer, decoders, models

    counts: Counter = Counter()
    for t in texts:
        counts.update(t)
    chars = [c for c, n in counts.most_common() if n >= min_frequency]
    if max_vocab:
        chars = chars[: max(0, max_vocab - 2)]
    chars.sort()
    vocab = {EOS: 0, UNK: 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    # A BPE model with no merges is exactly a character lookup; Fuse joins tokens without spaces on decode.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS])
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Byte-level BPE: the initial alphabet is all 256 bytes, so nothing is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise UserError(f"tokenizer.vocab_size for bpe must be > 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(texts: list[str], kind: Literal["char", "bpe"], vocab_size: int = 0):
    if kind == "char":
        return train_char(texts, max_vocab=vocab_size)
    if kind == "bpe":
        return train_bpe(texts, vocab_size=vocab_size or 4096)
    raise UserError(f"tokenizer.kind: got {kind!r}, expected 'char' or 'bpe'")


def to_hf(tok, model_max_length: int = 2048):
    """Wrap a ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with the special tokens set."""
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=model_max_length)
    if tok.token_to_id(UNK) is not None:
        kwargs["unk_token"] = UNK
    return PreTrainedTokenizerFast(**kwargs)


def save(tok, out_dir: str | Path, model_max_length: int = 2048) -> None:
    """Write tokenizer.json plus tokenizer_config.json, so AutoTokenizer.from_pretrained(out_dir) works."""
    to_hf(tok, model_max_length).save_pretrained(str(out_dir))


def load(path: str | Path):
    """Load a tokenizer saved by ``save`` (a folder) or a bare ``tokenizer.json``, as PreTrainedTokenizerFast."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(p), bos_token=EOS, eos_token=EOS, pad_token=EOS)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise UserError(f"{p}: no tokenizer.json found")
    return AutoTokenizer.from_pretrained(str(p))


# ---------------------------------------------------------------- coverage of new data by an existing tokenizer

class Coverage:
    """How well a tokenizer covers some texts: tokens, unknown tokens, and the characters it cannot encode."""

    def __init__(self, tokens: int, unknown: int, missing: Counter):
        self.tokens, self.unknown, self.missing = tokens, unknown, missing

    @property
    def rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    def to_dict(self, top: int = 20) -> dict:
        return {"tokens": self.tokens, "unknown_tokens": self.unknown, "unknown_token_rate": round(self.rate, 6),
                "missing_symbols": len(self.missing), "most_common_missing": "".join(c for c, _ in self.missing.most_common(top))}


def coverage(tok, texts: Iterable[str]) -> Coverage:
    """The share of ``texts``' tokens that ``tok`` maps to its unknown token, and which characters cause it.

    Byte-level tokenizers (GPT-2 style BPE, SmolLM2's) have no unknown token and always cover everything."""
    texts = list(texts)
    tokens = sum(len(ids) for start in range(0, len(texts), 1024)
                 for ids in tok(texts[start : start + 1024], add_special_tokens=False)["input_ids"])
    unk = tok.unk_token_id
    if unk is None or not texts:
        return Coverage(tokens, 0, Counter())
    chars = Counter(c for t in texts for c in t)
    missing = Counter({c: n for c, n in chars.items() if not c.isspace() and unk in tok(c, add_special_tokens=False)["input_ids"]})
    unknown = sum(1 for start in range(0, len(texts), 1024)
                  for ids in tok(texts[start : start + 1024], add_special_tokens=False)["input_ids"] for i in ids if i == unk)
    return Coverage(tokens, unknown, missing)


def extend(tok, symbols: Iterable[str]) -> int:
    """Add ``symbols`` (characters the tokenizer maps to unknown) as tokens of their own; returns how many were added.
    The model's embeddings must then grow to ``len(tok)`` rows (``models.lm.fit_vocabulary``)."""
    return tok.add_tokens(sorted(set(symbols)))
