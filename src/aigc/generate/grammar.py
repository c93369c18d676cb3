"""Grammar-constrained decoding for JSON: the sampler may only draw tokens that keep the text a prefix of a valid
JSON object, and the end-of-text token only once the object is complete, so even a small model's output parses
(``response_format: {"type": "json_object"}``). The music engine's event grammar is the precedent.

Two parts:

- ``step(state, ch)``: a pushdown automaton over characters. A state is an immutable tuple (a mode and the stack of
  open containers), so trying a character never disturbs the state it started from;
- ``TokenMask``: which tokens of a vocabulary may come next in a state. Token texts are walked through a trie of the
  vocabulary, pruning at the first character the automaton refuses. Inside a string almost every token is allowed,
  so that state has a fast path: the tokens without a quote, a backslash or a control character are allowed as a
  block, and only the others are walked. Masks are cached per state (strings and arrays revisit the same states).

Whitespace between tokens is allowed but capped (``MAX_WS`` in a row), so a model cannot idle in it forever.
Tokens whose text is not whole characters (a byte-level piece of a multi-byte character) are not allowed: they
could not be checked character by character.
"""
from __future__ import annotations

import torch

MAX_WS = 2  # whitespace characters in a row outside strings
WS = " \n\t\r"
DIGITS = "0123456789"
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

# modes
VALUE, FIRST_KEY, KEY, COLON, AFTER, FIRST_ITEM, STRING, ESCAPE, UNICODE, LITERAL, NUMBER, DONE = range(12)
# number sub-states: after '-', after a leading 0, in the integer, after '.', in the fraction, after 'e', after the
# exponent's sign, in the exponent
N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
NUMBER_ENDS = (N_ZERO, N_INT, N_FRAC, N_EXP)


def start(top: str = "object") -> tuple:
    """The state before the first character: ``object`` (what json_object asks for) or any ``value``."""
    return (VALUE, (), 0, "{" if top == "object" else "")


def complete(state: tuple) -> bool:
    """Whether the text so far is a whole JSON text (then the end of text may come)."""
    mode, stack = state[0], state[1]
    return not stack and (mode == DONE or (mode == NUMBER and state[3] in NUMBER_ENDS))


def _after_value(stack: tuple, ws: int = 0) -> tuple:
    return (AFTER, stack, ws, "") if stack else (DONE, (), ws, "")


def step(state: tuple, ch: str) -> tuple | None:
    """The state after ``ch``, or None when ``ch`` cannot continue valid JSON from ``state``."""
    mode, stack, ws, extra = state
    if mode == STRING:
        if ch == '"':
            return (COLON, stack, 0, "") if extra == "key" else _after_value(stack)
        if ch == "\\":
            return (ESCAPE, stack, 0, extra)
        return None if ch < " " else state
    if mode == ESCAPE:
        if ch in '"\\/bfnrt':
            return (STRING, stack, 0, extra)
        return (UNICODE, stack, 4, extra) if ch == "u" else None
    if mode == UNICODE:
        if ch not in "0123456789abcdefABCDEF":
            return None
        return (UNICODE, stack, ws - 1, extra) if ws > 1 else (STRING, stack, 0, extra)
    if mode == LITERAL:
        if ch != extra[0]:
            return None
        return (LITERAL, stack, 0, extra[1:]) if len(extra) > 1 else _after_value(stack)
    if mode == NUMBER:
        nxt = _number(extra, ch)
        if nxt is not None:
            return (NUMBER, stack, 0, nxt)
        if extra not in NUMBER_ENDS:
            return None
        return step(_after_value(stack), ch)  # the number ended: the character belongs to what follows
    if ch in WS:
        return None if ws >= MAX_WS or (mode == DONE) else (mode, stack, ws + 1, extra)
    if mode == VALUE or mode == FIRST_ITEM:
        if mode == FIRST_ITEM and ch == "]":
            return _after_value(stack[:-1])
        if extra and ch != extra:  # the top level must be an object
            return None
        if ch == "{":
            return (FIRST_KEY, stack + ("o",), 0, "")
        if ch == "[":
            return (FIRST_ITEM, stack + ("a",), 0, "")
        if ch == '"':
            return (STRING, stack, 0, "value")
        if ch in LITERALS:
            return (LITERAL, stack, 0, LITERALS[ch])
        if ch == "-":
            return (NUMBER, stack, 0, N_SIGN)
        if ch in DIGITS:
            return (NUMBER, stack, 0, N_ZERO if ch == "0" else N_INT)
        return None
    if mode == FIRST_KEY or mode == KEY:
        if ch == '"':
            return (STRING, stack, 0, "key")
        return _after_value(stack[:-1]) if ch == "}" and mode == FIRST_KEY else None
    if mode == COLON:
        return (VALUE, stack, 0, "") if ch == ":" else None
    if mode == AFTER:
        top = stack[-1]
        if ch == ",":
            return (KEY, stack, 0, "") if top == "o" else (VALUE, stack, 0, "")
        if (ch == "}" and top == "o") or (ch == "]" and top == "a"):
            return _after_value(stack[:-1])
        return None
    return None  # DONE: nothing but the end of text


def _number(sub: int, ch: str) -> int | None:
    if ch in DIGITS:
        return {N_SIGN: N_ZERO if ch == "0" else N_INT, N_INT: N_INT, N_DOT: N_FRAC, N_FRAC: N_FRAC, N_E: N_EXP,
                N_ESIGN: N_EXP, N_EXP: N_EXP}.get(sub)
    if ch == "." and sub in (N_ZERO, N_INT):
        return N_DOT
    if ch in "eE" and sub in (N_ZERO, N_INT, N_FRAC):
        return N_E
    if ch in "+-" and sub == N_E:
        return N_ESIGN
    return None


def walk(state: tuple | None, text: str) -> tuple | None:
    for ch in text:
        if state is None:
            return None
        state = step(state, ch)
    return state


class TokenMask:
    """The allowed next tokens of a vocabulary in each automaton state (see the module's docstring)."""

    def __init__(self, pieces: list[str], eos: int | None):
        self.pieces, self.eos, self.n = pieces, eos, len(pieces)
        self.trie: dict = {}
        self.plain = torch.zeros(self.n, dtype=torch.bool)  # tokens a string takes as they are
        self.special: list[int] = []  # tokens of whole characters that hold a quote, a backslash or a control character
        for tok, piece in enumerate(pieces):
            if not piece or "\ufffd" in piece or tok == eos:
                continue
            node = self.trie
            for ch in piece:
                node = node.setdefault(ch, {})
            node.setdefault(None, []).append(tok)
            if any(c in '"\\' or c < " " for c in piece):
                self.special.append(tok)
            else:
                self.plain[tok] = True
        self.cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "TokenMask":
        """One per tokenizer (built once: every token decoded alone)."""
        cached = getattr(tokenizer, "_aigc_json_mask", None)
        if cached is None:
            pieces = [tokenizer.decode([t]) for t in range(len(tokenizer))]
            cached = cls(pieces, tokenizer.eos_token_id)
            tokenizer._aigc_json_mask = cached
        return cached

    def allowed(self, state: tuple) -> torch.Tensor:
        """(V,) bool: the tokens that may come next; at a complete text, the end of text alone."""
        key = state
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        mask = torch.zeros(self.n, dtype=torch.bool)
        if complete(state) and self.eos is not None:
            mask[self.eos] = True
            if state[0] == DONE:  # nothing can follow a closed object
                self.cache[key] = mask
                return mask
        if state[0] == STRING:
            mask |= self.plain
            for tok in self.special:
                if walk(state, self.pieces[tok]) is not None:
                    mask[tok] = True
        else:
            self._dfs(self.trie, state, mask)
        if len(self.cache) < 50_000:
            self.cache[key] = mask
        return mask

    def _dfs(self, node: dict, state: tuple, mask: torch.Tensor) -> None:
        for ch, child in node.items():
            if ch is None:
                continue
            nxt = step(state, ch)
            if nxt is None:
                continue
            for tok in child.get(None, ()):
                mask[tok] = True
            if len(child) > (1 if None in child else 0):
                self._dfs(child, nxt, mask)
