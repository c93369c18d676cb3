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

from aigc.data.chat_tokens import TOOL_CLOSE, TOOL_OPEN

MAX_WS = 2  # whitespace characters in a row outside strings
MAX_NUMBER = 24  # characters of a number in a schema's instance (a small model could write digits until max_tokens)
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


class Json:
    """Any JSON text (``top="object"``: an object), as a grammar the token mask can use."""

    def __init__(self, top: str = "object"):
        self.key = ("json", top)
        self.top = top

    def start(self) -> tuple:
        return start(self.top)

    def step(self, state: tuple, ch: str) -> tuple | None:
        return step(state, ch)

    def complete(self, state: tuple) -> bool:
        return complete(state)

    def free_string(self, state: tuple) -> int | None:
        """Inside a string that takes any plain text: how many more characters it may take (None: not in one)."""
        return 1 << 30 if state[0] == STRING else None

    def closed(self, state: tuple) -> bool:
        """Nothing but the end of text can follow."""
        return state[0] == DONE

    def free(self, state: tuple) -> bool:
        """Plain text from here on (never, for JSON; see Tools)."""
        return False

    def free_prefix(self, state: tuple) -> str | None:
        """For the token mask (see Tools): None, every token is constrained."""
        return None

    end = (DONE, (), 0, "")  # a state from which only the end of text can come


JSON_OBJECT = Json("object")


def walk_with(grammar, state: tuple | None, text: str) -> tuple | None:
    for ch in text:
        if state is None:
            return None
        state = grammar.step(state, ch)
    return state


class TokenMask:
    """The allowed next tokens of a vocabulary in each state of a grammar (see the module's docstring)."""

    def __init__(self, pieces: list[str], eos: int | None):
        self.pieces, self.eos, self.n = pieces, eos, len(pieces)
        self.trie: dict = {}
        self.lengths = torch.tensor([len(p) for p in pieces])
        self.plain = torch.zeros(self.n, dtype=torch.bool)  # tokens a string takes as they are
        self.special: list[int] = []  # tokens of whole characters that hold a quote, a backslash or a control character
        self.valid = torch.zeros(self.n, dtype=torch.bool)  # tokens of whole characters (what free text may take)
        for tok, piece in enumerate(pieces):
            if not piece or "\ufffd" in piece or tok == eos:
                continue
            self.valid[tok] = True
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

    def allowed(self, state: tuple, grammar=JSON_OBJECT) -> torch.Tensor:
        """(V,) bool: the tokens that may come next under ``grammar``; the end of text once the text is complete."""
        key = (grammar.key, state)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        mask = torch.zeros(self.n, dtype=torch.bool)
        if grammar.complete(state) and self.eos is not None:
            mask[self.eos] = True
            if grammar.closed(state):  # nothing can follow
                self._keep(key, mask)
                return mask
        lead = grammar.free_prefix(state)
        room = grammar.free_string(state)
        if lead is not None:  # free text, except for tokens that begin with all of ``lead``: those are walked past it
            mask |= self.valid
            node, inner = self.trie, state
            for ch in lead:
                node, inner = node.get(ch), inner and grammar.step(inner, ch)
                if node is None:
                    break
            else:
                for tok in self._below(node):
                    mask[tok] = False
                if inner is not None:
                    self._dfs(node, inner, mask, grammar.step)
        elif room is not None:  # inside a plain string: the quote-free tokens that fit, as a block; the others walked
            mask |= self.plain & (self.lengths <= room)
            for tok in self.special:
                if walk_with(grammar, state, self.pieces[tok]) is not None:
                    mask[tok] = True
        else:
            self._dfs(self.trie, state, mask, grammar.step)
        self._keep(key, mask)
        return mask

    def _keep(self, key, mask) -> None:
        if len(self.cache) >= 50_000:
            self.cache.clear()
        self.cache[key] = mask

    def _below(self, node: dict) -> list[int]:
        """The tokens that go through ``node`` and continue past it."""
        out = []
        for ch, child in node.items():
            if ch is not None:
                out += child.get(None, [])
                out += self._below(child)
        return out

    def _dfs(self, node: dict, state: tuple, mask: torch.Tensor, step_fn) -> None:
        for ch, child in node.items():
            if ch is None:
                continue
            nxt = step_fn(state, ch)
            if nxt is None:
                continue
            for tok in child.get(None, ()):
                mask[tok] = True
            if len(child) > (1 if None in child else 0):
                self._dfs(child, nxt, mask, step_fn)


# ---------------------------------------------------------------- JSON schema

class SchemaError(ValueError):
    """A schema this grammar cannot enforce (the message names the keyword)."""


class Schema:
    """Instances of a JSON schema, as a grammar: the subset structured outputs use (OpenAI's ``strict`` mode and
    pydantic's schemas). Objects with ``properties`` (written in the schema's order; ``required`` ones always,
    others optional; no other keys), arrays with ``items``, ``minItems``/``maxItems``, strings with ``enum``,
    ``minLength``/``maxLength``, ``integer``, ``number``, ``boolean``, ``null``, ``const``, ``enum``, type lists
    (``["string", "null"]``), ``anyOf`` of alternatives that begin differently (``Optional[X]``), local ``$ref``
    to ``$defs``/``definitions``, and ``{}`` (any JSON value). Keywords that do not constrain the text (``title``,
    ``description``, ``default``, ``format``, ``examples``, ``additionalProperties: false``) are accepted. Strings are
    written without ``\\u`` escapes and numbers are at most ``MAX_NUMBER`` characters: both keep a small model from
    spending its budget inside one value. An ``object`` without ``properties`` is any object.

    A state is a tuple of frames (innermost last); nodes are compiled once and named by their index."""

    IGNORED = {"title", "description", "default", "examples", "$schema", "$id", "format", "$defs", "definitions", "strict",
               "additionalProperties", "type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf",
               "minItems", "maxItems", "minLength", "maxLength", "$ref", "$comment", "discriminator"}

    max_ws = 0  # no whitespace between tokens: a compact answer (small models would spend their budget idling in spaces)

    def __init__(self, schema: dict):
        import json as _json

        self.root_schema = schema
        self.nodes: list[tuple] = []
        self._ids: dict[int, int] = {}
        self.root = self._compile(schema, 0)
        self.key = ("schema", _json.dumps(schema, sort_keys=True))

    # ------------------------------------------------------------ compiling

    def _resolve(self, ref: str) -> dict:
        if not ref.startswith("#/"):
            raise SchemaError(f"$ref {ref!r}: only local references (#/$defs/...) are supported")
        node = self.root_schema
        for part in ref[2:].split("/"):
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"$ref {ref!r} does not resolve")
            node = node[part]
        return node

    def _compile(self, s: dict, depth: int) -> int:
        import json as _json

        if depth > 32:
            raise SchemaError("the schema nests deeper than 32 levels (a recursive $ref?)")
        if not isinstance(s, dict):
            raise SchemaError(f"a schema must be an object, got {s!r}")
        if id(s) in self._ids:
            return self._ids[id(s)]
        unknown = sorted(set(s) - self.IGNORED - {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern",
                                                   "multipleOf", "uniqueItems", "nullable"})
        if unknown:
            raise SchemaError(f"schema keyword {unknown[0]!r} is not supported in structured output")
        for kw in ("pattern", "multipleOf", "uniqueItems"):
            if kw in s:
                raise SchemaError(f"schema keyword {kw!r} is not supported in structured output")
        index = len(self.nodes)
        self.nodes.append(())
        self._ids[id(s)] = index
        if "$ref" in s:
            target = self._compile(self._resolve(s["$ref"]), depth + 1)
            self.nodes[index] = ("alt", (target,))
            return index
        if "const" in s:
            self.nodes[index] = ("lit", (_json.dumps(s["const"], ensure_ascii=False),))
            return index
        if "enum" in s:
            texts = tuple(_json.dumps(v, ensure_ascii=False) for v in s["enum"])
            if not texts:
                raise SchemaError("enum is empty")
            self.nodes[index] = ("lit", texts)
            return index
        alts = s.get("anyOf") or s.get("oneOf")
        if alts is not None:
            self.nodes[index] = ("alt", tuple(self._compile(a, depth + 1) for a in alts))
            return index
        kind = s.get("type")
        if isinstance(kind, list):
            self.nodes[index] = ("alt", tuple(self._compile({**s, "type": k}, depth + 1) for k in kind))
            return index
        if s.get("nullable") and kind:
            self.nodes[index] = ("alt", (self._compile({**s, "nullable": False}, depth + 1), self._compile({"type": "null"}, depth + 1)))
            return index
        if kind == "object" and "properties" not in s and not s.get("required"):  # any object (parameters left open)
            self.nodes[index] = ("anyobject",)
        elif kind == "object" or (kind is None and "properties" in s):
            props = s.get("properties", {})
            required = set(s.get("required", []))
            missing = required - set(props)
            if missing:
                raise SchemaError(f"required property {sorted(missing)[0]!r} has no schema in properties")
            fields = tuple((_json.dumps(k, ensure_ascii=False)[1:], self._compile(v, depth + 1), k in required)
                           for k, v in props.items())
            self.nodes[index] = ("object", fields)
        elif kind == "array":
            item = self._compile(s.get("items", {}), depth + 1)
            lo, hi = int(s.get("minItems", 0)), s.get("maxItems")
            self.nodes[index] = ("array", item, lo, None if hi is None else int(hi))
        elif kind == "string":
            lo, hi = int(s.get("minLength", 0)), s.get("maxLength")
            self.nodes[index] = ("string", lo, None if hi is None else int(hi))
        elif kind in ("integer", "number"):
            self.nodes[index] = ("number", kind == "integer")
        elif kind == "boolean":
            self.nodes[index] = ("lit", ("true", "false"))
        elif kind == "null":
            self.nodes[index] = ("lit", ("null",))
        elif kind is None:
            self.nodes[index] = ("any",)
        else:
            raise SchemaError(f"type {kind!r} is not a JSON schema type")
        return index

    # ------------------------------------------------------------ the automaton

    def start(self) -> tuple:
        return (("val", self.root, 0),)

    def complete(self, state: tuple) -> bool:
        if state == (("done",),):
            return True
        if len(state) == 1 and state[0][0] == "num" and state[0][3] in NUMBER_ENDS:
            return True
        return len(state) == 1 and state[0][0] == "json" and complete(state[0][1])

    def closed(self, state: tuple) -> bool:
        return state == (("done",),)

    def free(self, state: tuple) -> bool:
        return False

    def free_prefix(self, state: tuple) -> str | None:
        return None

    end = (("done",),)

    def free_string(self, state: tuple) -> int | None:
        top = state[-1]
        if top[0] == "str" and top[3] == 0:
            hi = self.nodes[top[1]][2]
            return (1 << 30) if hi is None else hi - top[2]
        if top[0] == "json" and top[1][0] == STRING:
            return 1 << 30
        return None

    def _done(self, stack: tuple) -> tuple:
        """A value ended: its container moves on."""
        if not stack:
            return (("done",),)
        top = stack[-1]
        if top[0] == "obj":
            return stack[:-1] + (("obj", top[1], top[2], "after", 0, ()),)
        return stack[:-1] + (("arr", top[1], top[2] + 1, "after", 0),)  # an array

    def _key_candidates(self, node: int, start: int) -> tuple:
        """(field index, its key's remaining text with the closing quote) for each field that may come next."""
        out = []
        for i, (key, _, required) in enumerate(self.nodes[node][1][start:], start):
            out.append((i, key))
            if required:
                break
        return tuple(out)

    def _can_close(self, node: int, start: int) -> bool:
        return all(not required for _, _, required in self.nodes[node][1][start:])

    def _begin(self, stack: tuple, node: int, ch: str) -> tuple | None:
        """The state after ``ch``, the first character of a value of ``node``."""
        n = self.nodes[node]
        kind = n[0]
        if kind == "alt":
            for alt in n[1]:  # the first alternative this character can begin (Optional[X]: X or null)
                nxt = self._begin(stack, alt, ch)
                if nxt is not None:
                    return nxt
            return None
        if kind in ("any", "anyobject"):
            js = step(start("value" if kind == "any" else "object"), ch)
            return None if js is None else stack + (("json", js),)
        if kind == "lit":
            cands = tuple(t[1:] for t in n[1] if t[0] == ch)
            if not cands:
                return None
            if "" in cands and len(cands) == 1:
                return self._done(stack)
            return stack + (("lit", cands),)
        if kind == "number":
            if ch == "-":
                return stack + (("num", node, 0, N_SIGN),)
            if ch in DIGITS:
                return stack + (("num", node, 0, N_ZERO if ch == "0" else N_INT),)
            return None
        if kind == "string":
            return stack + (("str", node, 0, 0),) if ch == '"' else None
        if kind == "object":
            return stack + (("obj", node, 0, "open", 0, ()),) if ch == "{" else None
        if kind == "array":
            return stack + (("arr", node, 0, "open", 0),) if ch == "[" else None
        return None

    def step(self, state: tuple, ch: str) -> tuple | None:
        stack, top = state[:-1], state[-1]
        kind = top[0]
        if kind == "done":
            return None
        if kind == "val":
            if ch in WS:
                return None if top[2] >= self.max_ws else stack + (("val", top[1], top[2] + 1),)
            return self._begin(stack, top[1], ch)
        if kind == "json":
            js = step(top[1], ch)
            if js is not None:
                return stack + (("json", js),)
            if complete(top[1]):  # the embedded value ended: the character belongs to what follows
                return self.step(self._done(stack), ch)
            return None
        if kind == "lit":
            cands = tuple(c[1:] for c in top[1] if c and c[0] == ch)
            if not cands:  # a literal that is whole already (the 1 of enum [1, 12]) ends here
                return self.step(self._done(stack), ch) if "" in top[1] else None
            if cands == ("",):
                return self._done(stack)
            return stack + (("lit", cands),)
        if kind == "num":  # ("num", node, characters so far, number sub-state)
            integer = self.nodes[top[1]][1]
            nxt = _number(top[3], ch)
            if nxt is not None and not (integer and nxt in (N_DOT, N_E)) and top[2] + 1 < MAX_NUMBER:
                return stack + (("num", top[1], top[2] + 1, nxt),)
            if top[3] not in NUMBER_ENDS:
                return None
            return self.step(self._done(stack), ch)
        if kind == "str":
            node, length, esc = top[1], top[2], top[3]
            _, lo, hi = self.nodes[node]
            if esc == 1:
                if ch in '"\\/bfnrt':
                    return stack + (("str", node, length + 1, 0),)
                # (no \u escapes: any character but a control one can be written as itself, and a small model that
                # wanders into \uXXXX spends six tokens on one character)
                return None
            if ch == '"':
                return self._done(stack) if length >= lo else None
            if ch < " " or (hi is not None and length >= hi):
                return None
            if ch == "\\":
                return stack + (("str", node, length, 1),)
            # an unbounded string forgets its length past its minimum: the state (and the mask's cache) stays the same
            return stack + (("str", node, length + 1 if hi is not None or length < lo else length, 0),)
        if kind == "obj":
            _, node, nxt_field, phase, ws, cands = top
            if phase == "key":
                left = tuple((i, k[1:]) for i, k in cands if k and k[0] == ch)
                if not left:
                    return None
                done = [i for i, k in left if k == ""]
                if done:
                    return stack + (("obj", node, done[0], "colon", 0, ()),)
                return stack + (("obj", node, nxt_field, "key", 0, left),)
            if ch in WS:
                return None if ws >= self.max_ws else stack + (("obj", node, nxt_field, phase, ws + 1, cands),)
            if phase == "colon":
                field = self.nodes[node][1][nxt_field]
                return stack + (("obj", node, nxt_field + 1, "value", 0, ()), ("val", field[1], 0)) if ch == ":" else None
            if phase in ("open", "after"):
                if ch == "}" and self._can_close(node, nxt_field):
                    return self._done(stack)
                if phase == "after":
                    if ch != ",":
                        return None
                    return stack + (("obj", node, nxt_field, "comma", 0, ()),) if self._key_candidates(node, nxt_field) else None
                if ch == '"' and self._key_candidates(node, nxt_field):
                    return stack + (("obj", node, nxt_field, "key", 0, self._key_candidates(node, nxt_field)),)
                return None
            if phase == "comma":
                if ch == '"':
                    return stack + (("obj", node, nxt_field, "key", 0, self._key_candidates(node, nxt_field)),)
                return None
            return None
        if kind == "arr":
            _, node, count, phase, ws = top
            _, item, lo, hi = self.nodes[node]
            if ch in WS:
                return None if ws >= self.max_ws else stack + (("arr", node, count, phase, ws + 1),)
            if ch == "]" and count >= lo and (phase == "after" or count == 0):
                return self._done(stack)
            if phase == "after":
                if ch != "," or (hi is not None and count >= hi):
                    return None
                return stack + (("arr", node, count, "comma", 0), ("val", item, 0))
            if phase == "open":
                if hi == 0:
                    return None
                return self._begin(stack + (("arr", node, count, "comma", 0),), item, ch)
            return None
        return None


# ---------------------------------------------------------------- tool calls

# The Hermes format, as data/chat_tokens.py's tool_call_text writes it (and training teaches it)
TOOL_HEAD = '{"name": "'
TOOL_MID = ', "arguments": '
TOOL_END = "}" + TOOL_CLOSE
TOOL_NEXT = "\n" + TOOL_OPEN  # a parallel call follows the one before


class Tools:
    """Tool calls in the Hermes format as a grammar: ``<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>``,
    where NAME is one of the offered functions and ARGS an instance of that function's parameter schema (compact,
    like structured output). ``required`` (tool_choice ``required`` or a named function): the answer is one call, or
    several in a row with ``parallel``. ``auto``: the answer is free text, unless it begins with the opening tag; from
    there on the call is constrained like ``required``, so a call the model starts always parses.

    States: ``("open", k)`` (k characters of the opening tag matched), ``("free",)`` (auto: plain text),
    ``("head", k)``, ``("name", candidates)``, ``("mid", k, name)``, ``("args", name, schema state)``, ``("close", k)``
    and ``("after", k)`` (after a call: the end of text, or another call). A second call's states are the first's, so
    the token mask's cache serves both."""

    def __init__(self, functions: dict[str, Schema], mode: str = "required", parallel: bool = True):
        import json as _json

        if not functions:
            raise SchemaError("no functions to call")
        if mode not in ("auto", "required"):
            raise ValueError(f"mode is auto or required, got {mode!r}")
        self.functions, self.mode, self.parallel = functions, mode, parallel
        # (name, its JSON text without the opening quote): what is left to spell of each candidate
        self.names = tuple((n, _json.dumps(n, ensure_ascii=False)[1:]) for n in functions)
        self.key = ("tools", mode, parallel, tuple((n, s.key) for n, s in functions.items()))

    end = ("end",)

    def start(self) -> tuple:
        return ("open", 0)

    def complete(self, state: tuple) -> bool:
        kind = state[0]
        return kind in ("free", "end") or (kind == "open" and self.mode == "auto") or (kind == "after" and state[1] == 0)

    def closed(self, state: tuple) -> bool:
        return state[0] == "end" or (state[0] == "after" and state[1] == 0 and not self.parallel)

    def free(self, state: tuple) -> bool:
        """Plain text from here on: no more constraint."""
        return state[0] == "free"

    def free_prefix(self, state: tuple) -> str | None:
        """For the token mask: "" when any token may come; a text when any token may come except those that begin with
        all of it (they are checked past it); None when the state constrains every token."""
        if state[0] == "free":
            return ""
        if state[0] == "open" and self.mode == "auto":
            return TOOL_OPEN[state[1]:]
        return None

    def free_string(self, state: tuple) -> int | None:
        if state[0] == "args":
            return self.functions[state[1]].free_string(state[2])
        return None

    def step(self, state: tuple, ch: str) -> tuple | None:
        kind = state[0]
        if kind == "free":
            return state
        if kind == "open":
            k = state[1]
            if ch != TOOL_OPEN[k]:
                return ("free",) if self.mode == "auto" else None
            return ("open", k + 1) if k + 1 < len(TOOL_OPEN) else ("head", 0)
        if kind == "head":
            k = state[1]
            if ch != TOOL_HEAD[k]:
                return None
            return ("head", k + 1) if k + 1 < len(TOOL_HEAD) else ("name", self.names)
        if kind == "name":
            left = tuple((n, c[1:]) for n, c in state[1] if c and c[0] == ch)
            if not left:
                return None
            whole = [n for n, c in left if c == ""]  # the closing quote came: the name is whole
            return ("mid", 0, whole[0]) if whole else ("name", left)
        if kind == "mid":
            _, k, name = state
            if ch != TOOL_MID[k]:
                return None
            return ("mid", k + 1, name) if k + 1 < len(TOOL_MID) else ("args", name, self.functions[name].start())
        if kind == "args":
            _, name, inner = state
            schema = self.functions[name]
            nxt = schema.step(inner, ch)
            if nxt is None:
                return None
            # (parameters are an object: complete means its closing brace came)
            return ("close", 0) if schema.complete(nxt) else ("args", name, nxt)
        if kind == "close":
            k = state[1]
            if ch != TOOL_END[k]:
                return None
            return ("close", k + 1) if k + 1 < len(TOOL_END) else ("after", 0)
        if kind == "after":
            k = state[1]
            if not self.parallel or ch != TOOL_NEXT[k]:
                return None
            return ("after", k + 1) if k + 1 < len(TOOL_NEXT) else ("head", 0)
        return None
