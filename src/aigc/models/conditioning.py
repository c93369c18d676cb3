"""Conditioning shared by the image models: class labels or captions to one vector per image.

- ``class``: an embedding table with one extra row, the "no condition" row used for
  classifier-free guidance and conditioning dropout.
- ``caption``: a word vocabulary built from the training captions (lower-cased words; each CJK
  character is a word), embedded and mean-pooled, then an MLP. Small, trained with the model, and
  exact for the compositional captions of vertical data ("a small red circle at top left"). A caption
  with words the model never saw is refused with the list of known words rather than silently
  ignoring them.
- ``none``: unconditional; the encoder returns None.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from aigc.errors import UserError

_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)
MAX_WORDS = 32


def words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def build_vocab(captions: list[str]) -> list[str]:
    """Sorted distinct words; index 0 is reserved for padding."""
    return ["<pad>"] + sorted({w for c in captions for w in words(c)})


def encode_captions(captions: list[str], vocab: list[str]) -> torch.Tensor:
    """(B, L) word ids, 0-padded; raises UserError on unknown words."""
    index = {w: i for i, w in enumerate(vocab)}
    rows, unknown = [], set()
    for c in captions:
        ws = words(c)
        if not ws:
            raise UserError(f"caption {c!r} has no words")
        unknown.update(w for w in ws if w not in index)
        rows.append([index.get(w, 0) for w in ws][:MAX_WORDS])
    if unknown:
        known = ", ".join(vocab[1:41]) + (" ..." if len(vocab) > 41 else "")
        raise UserError(f"the model never saw these caption words: {', '.join(sorted(unknown))} (known words: {known})")
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


class Conditioner(nn.Module):
    """Condition ids -> (B, dim); ``drop`` (B,) bool swaps in the learned null condition."""

    def __init__(self, kind: str, dim: int, num_classes: int = 0, vocab_size: int = 0):
        super().__init__()
        self.kind, self.dim = kind, dim
        if kind == "class":
            if num_classes < 1:
                raise UserError("class conditioning needs a dataset with classes (class sub-folders)")
            self.table = nn.Embedding(num_classes + 1, dim)  # last row: no condition
            self.num_classes = num_classes
        elif kind == "caption":
            if vocab_size < 2:
                raise UserError("caption conditioning needs a dataset with captions (captions.jsonl)")
            self.words = nn.Embedding(vocab_size, dim, padding_idx=0)
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.null = nn.Parameter(torch.zeros(dim))
        elif kind != "none":
            raise UserError(f"unknown condition kind {kind!r} (none, class, caption)")

    def forward(self, cond: torch.Tensor | None, drop: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.kind == "none":
            return None
        if self.kind == "class":
            ids = cond if drop is None else torch.where(drop, torch.full_like(cond, self.num_classes), cond)
            return self.table(ids)  # (B, dim)
        mask = (cond > 0).unsqueeze(-1).float()  # (B, L, 1)
        pooled = (self.words(cond) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, dim)
        out = self.mlp(pooled)
        if drop is not None:
            out = torch.where(drop.unsqueeze(-1), self.null.expand_as(out), out)
        return out

    def null_condition(self, batch: int) -> torch.Tensor | None:
        """The unconditional vector, (B, dim), for classifier-free guidance."""
        if self.kind == "class":
            return self.table(torch.full((batch,), self.num_classes, dtype=torch.long, device=self.table.weight.device))
        if self.kind == "caption":
            return self.null.expand(batch, -1)
        return None
