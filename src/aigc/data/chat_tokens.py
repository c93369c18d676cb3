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

import json
import re
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


# ---------------------------------------------------------------- tool calls
# The Hermes format (Qwen2.5, SmolLM2-1.7B, NousHermes): the functions listed in the system turn, each call an object
# {"name", "arguments"} between <tool_call> tags, each result between <tool_response> tags in a ``tool`` turn. Messages
# here carry calls as ``tool_calls: [{"name", "arguments": {...}}]``; generate/grammar.py's Tools constrains a model's
# calls to exactly the text ``tool_call_text`` writes (arguments compact).

TOOL_OPEN = "<tool_call>\n"
TOOL_CLOSE = "\n</tool_call>"
TOOLS_PROMPT = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
                "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


def tool_call_text(calls: list[dict]) -> str:
    """What a model writes for ``calls`` (one block per call, a newline between blocks)."""
    return "\n".join(f'{TOOL_OPEN}{{"name": {json.dumps(c["name"], ensure_ascii=False)}, "arguments": '
                     f'{json.dumps(c["arguments"], ensure_ascii=False, separators=(",", ":"))}}}{TOOL_CLOSE}' for c in calls)


def tools_prompt(tools: list[dict]) -> str:
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def knows_tools(tokenizer) -> bool:
    """Whether the model's own chat template renders ``tools`` and ``tool_calls`` (then it is given them as they are)."""
    template = getattr(tokenizer, "chat_template", None)
    return "tool_calls" in str(template or "") and "tools" in str(template or "")


def plain_turns(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """role + content turns for a template that knows no tools: the functions join the system turn, calls are written
    into the assistant's text and results are wrapped in <tool_response> tags."""
    turns = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            content = (content + "\n" if content else "") + tool_call_text(m["tool_calls"])
        elif m["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        turns.append({"role": m["role"], "content": content})
    if tools:
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + tools_prompt(tools)}
        else:
            turns.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return turns


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """A conversation's text through the tokenizer's chat template, with its tools (see ``plain_turns``)."""
    if knows_tools(tokenizer):
        turns = []
        for m in messages:
            t = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                t["tool_calls"] = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                                   for c in m["tool_calls"]]
            turns.append(t)
        return tokenizer.apply_chat_template(turns, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer.apply_chat_template(plain_turns(messages, tools), tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, messages: list[dict], *, train_on_prompt: bool = False, mask_history: bool = False,
                add_generation_prompt: bool = False, tools: list[dict] | None = None) -> Encoded:
    """Token ids and labels of a conversation (see the module's docstring); ``tools``: the functions it may call
    (OpenAI's ``tools`` list), rendered as the template renders them."""
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
            add(render_chat(tokenizer, messages[:k], True, tools), train_on_prompt, f"the header of turn {k + 1}")
            trained = m.get("weight", 1) == 1 and (not mask_history or k == last)
            add(render_chat(tokenizer, messages[: k + 1], False, tools), trained, f"turn {k + 1}")
        else:
            add(render_chat(tokenizer, messages[: k + 1], False, tools), train_on_prompt, f"turn {k + 1}")
    if add_generation_prompt:
        add(render_chat(tokenizer, messages, True, tools), False, "the generation prompt")
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


_TAG = TOOL_OPEN.strip()
_TAG_END = TOOL_CLOSE.strip()
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ToolCallParser:
    """A model's answer, as it arrives, split into content and tool calls in the Hermes format (calls are taken at the
    start of the answer, one block after another). ``feed(text)`` and ``finish()`` return events: ``("content", text)``,
    ``("call", index, name)`` once a call's name is known, ``("args", index, text)`` as its arguments arrive (the text
    that may still turn out to be the block's closing brace is held back). A block that does not parse is content.
    ``content`` and ``calls`` ([name, arguments text]) hold the whole answer's parts."""

    def __init__(self):
        self.state, self.buf, self.sent = "start", "", 0  # sent: characters of the current call's arguments emitted
        self.content, self.calls = "", []

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        events: list[tuple] = []
        while True:
            before = (self.state, len(self.buf))
            self._advance(events, final=False)
            if (self.state, len(self.buf)) == before:
                return events

    def finish(self) -> list[tuple]:
        events: list[tuple] = []
        self._advance(events, final=False)
        self._advance(events, final=True)
        return events

    def _emit(self, events: list, event: tuple) -> None:
        if event[0] == "content":
            if not event[1]:
                return
            self.content += event[1]
        elif event[0] == "call":
            self.calls.append([event[2], ""])
        else:
            if not event[2]:
                return
            self.calls[event[1]][1] += event[2]
        events.append(event)

    def _advance(self, events: list, final: bool) -> None:
        state, buf = self.state, self.buf
        if state == "content":
            self._emit(events, ("content", buf))
            self.buf = ""
        elif state in ("start", "between"):
            lead = buf.lstrip()
            if lead.startswith(_TAG):
                self.state, self.buf = "head", lead[len(_TAG):]
            elif (not final and _TAG.startswith(lead)) or (state == "between" and not lead):
                if final:
                    self.buf = ""
            else:  # text: the answer's content from here on
                self.state = "content"
                self._emit(events, ("content", buf if state == "start" else lead))
                self.buf = ""
        elif state == "head":
            m = _HEAD.match(buf)
            if m:
                try:
                    name = json.loads(f'"{m.group(1)}"')
                except json.JSONDecodeError:
                    name = m.group(1)
                self._emit(events, ("call", len(self.calls), name))
                self.state, self.buf, self.sent = "args", buf[m.end():], 0
            elif final or _TAG_END in buf or len(buf) > 4096:  # not a call after all
                self.state = "content"
                self._emit(events, ("content", _TAG + buf))
                self.buf = ""
        elif state == "args":
            if self.sent == 0 and buf[:1].isspace():  # (the space after the colon may come after the colon)
                self.buf = buf = buf.lstrip()
            end = buf.find(_TAG_END)
            index = len(self.calls) - 1
            if end >= 0:
                body = buf[:end].rstrip()
                args = body[:-1].rstrip() if body.endswith("}") else body
                self._emit(events, ("args", index, args[self.sent:]))
                self.state, self.buf = "between", buf[end + len(_TAG_END):]
            elif final:  # cut off (max_tokens): the arguments so far
                self._emit(events, ("args", index, buf[self.sent:]))
                self.buf = ""
            else:
                brace = buf.rfind("}")
                tail = buf[brace + 1:].lstrip() if brace >= 0 else None
                safe = len(buf[:brace].rstrip()) if tail is not None and _TAG_END.startswith(tail) else len(buf.rstrip())
                if safe > self.sent:
                    self._emit(events, ("args", index, buf[self.sent:safe]))
                    self.sent = safe


def parse_tool_calls(text: str) -> tuple[str, list[list[str]]]:
    """(content, [[name, arguments text]]) of a whole answer."""
    p = ToolCallParser()
    p.feed(text)
    p.finish()
    return p.content, p.calls
