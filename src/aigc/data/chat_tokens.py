"""Conversations as token ids with a loss mask, the same way in training and in serving.

- ``ensure_chat_template(tokenizer)``: the model's own template when it has one (SmolLM2's ChatML),
  otherwise ``BUILTIN_TEMPLATE``, set on the tokenizer so it is saved with the checkpoint
  (``tokenizer_config.json`` ``chat_template``) and used by everything that loads the model.
- ``encode_chat``: the template is rendered for each growing prefix of the conversation and each new
  piece of text is tokenised on its own, so every token belongs to exactly one turn (the mask is never
  guessed from markers in the rendered text). The loss is on assistant turns, their end-of-turn text
  included (the model must learn to stop); ``train_on_prompt`` also trains on the rest, ``mask_history``
  only on the last assistant turn, and a message with ``weight: 0`` is never trained on. With
  ``add_generation_prompt`` the same function gives a server's prompt ids, identical to training's.
- ``pack``: several examples per row (first fit, longest first), each with positions restarting at 0, so the model's attention
  keeps them apart (transformers builds a block-diagonal causal mask from such position ids when no
  attention mask is given); an example's first token and the padding are labelled -100, so the loss
  of a packed row is the sum of its examples' losses computed one by one.
"""
from __future__ import annotations

from dataclasses import dataclass

from aigc.errors import UserError

IGNORE = -100
# For models without a template of their own: plain-text role headers, and the end-of-text token after
# each assistant turn, which is what a generator stops at.
BUILTIN_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> str:
    """The tokenizer's chat template, after setting the built-in one where it had none; returns which: own or builtin."""
    if getattr(tokenizer, "chat_template", None):
        return "own"
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no end-of-text token: a chat model could not learn to stop")
    tokenizer.chat_template = BUILTIN_TEMPLATE
    return "builtin"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, messages: list[dict], *, train_on_prompt: bool = False, mask_history: bool = False,
                add_generation_prompt: bool = False) -> Encoded:
    """Token ids and labels of a conversation (see the module's docstring)."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text rendered so far

    def add(text: str, train: bool, where: str) -> None:
        nonlocal done
        if not text.startswith(done):
            raise UserError(f"the chat template is not prefix-stable at {where}: rendering more turns changed the text "
                            "before them, so turns cannot be told apart; use a template that only appends")
        piece = tokenizer.encode(text[len(done):], add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE] * len(piece))
        done = text

    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            add(_render(tokenizer, messages[:k], True), train_on_prompt, f"the header of turn {k + 1}")
            trained = m.get("weight", 1) == 1 and (not mask_history or k == last)
            add(_render(tokenizer, messages[: k + 1], False), trained, f"turn {k + 1}")
        else:
            add(_render(tokenizer, messages[: k + 1], False), train_on_prompt, f"turn {k + 1}")
    if add_generation_prompt:
        add(_render(tokenizer, messages, True), False, "the generation prompt")
    return Encoded(ids, labels)


@dataclass
class Packed:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    examples: int
    length: int = 0  # tokens before the padding


def pack(encoded: list[Encoded], block: int, pad_id: int) -> list[Packed]:
    """Rows of ``block`` tokens, each holding whole examples (first fit, longest first: rows end up nearly full, so
    little of a step is spent on padding); an example longer than ``block`` is cut to it. Positions restart per
    example; padding has label IGNORE and positions that keep counting."""
    rows: list[Packed] = []
    for k in sorted(range(len(encoded)), key=lambda k: -len(encoded[k].input_ids)):
        ids, labels = encoded[k].input_ids[:block], encoded[k].labels[:block]
        row = next((r for r in rows if len(r.input_ids) + len(ids) <= block), None)
        if row is None:
            row = Packed([], [], [], 0)
            rows.append(row)
        row.input_ids += ids
        row.labels += [IGNORE] + labels[1:]  # nothing predicts an example's first token from the one before it
        row.position_ids += list(range(len(ids)))
        row.examples += 1
    for r in rows:
        r.length = len(r.input_ids)
        n = block - len(r.input_ids)
        start = r.position_ids[-1] + 1
        r.input_ids += [pad_id] * n
        r.labels += [IGNORE] * n
        r.position_ids += list(range(start, start + n))  # one run with the last example: no extra "sequence"
    return rows
