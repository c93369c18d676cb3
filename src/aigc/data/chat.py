"""Conversation data for instruction tuning (``kind: chat``) and preference pairs for DPO (``kind: preference``).

Reads JSONL, JSON arrays and CSV in the formats people already have, and stores one normalised form:

- ``messages`` (OpenAI): ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ..., "weight": 0|1}]}``,
  assistant turns may carry ``tool_calls`` (OpenAI's, arguments as a JSON string or an object) and the record the
  ``tools`` it offers (OpenAI's fine-tuning format);
- ``alpaca``: ``instruction``, ``input``, ``output``, optional ``system`` and ``history`` ([[user, assistant], ...]);
- ``sharegpt``: ``conversations`` of ``{"from": "human"|"gpt"|"system", "value": ...}`` (``--tag`` maps other tags);
  LLaMA-Factory's ``function_call`` turns (a call's JSON, or a list of calls) and ``observation`` turns (its result),
  with ``tools`` (a JSON string or list of functions) beside ``conversations``;
- ``prompt_completion``: ``prompt`` + ``completion``;
- ``preference``: ``prompt`` + ``chosen`` + ``rejected``, each a string or a message list (without a
  ``prompt``, the messages that ``chosen`` and ``rejected`` share are the prompt).

``format: auto`` tells the format from each record's fields and refuses, naming both places, when
records disagree; ``columns`` maps other field names onto these (``{"instruction": "question"}``).

Output (written atomically): ``train.jsonl`` / ``val.jsonl`` (chat: ``{"messages": [...]}``; preference:
``{"prompt": [...], "chosen": [...], "rejected": [...]}``) and ``manifest.json``, which counts every
record dropped **by reason** with a few examples of each: ``bad_role_order``, ``bad_tool_call``, ``empty_assistant``,
``missing_field``, ``unknown_tag``, ``no_supervised`` (every assistant turn has weight 0),
``over_length``, ``pii`` (``pii: drop``), ``identical_pair``, ``duplicate`` and ``near_duplicate``
(on the prompt). A line that is not JSON, or a file whose records change format, is an error naming
the file and line; nothing is written then.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from aigc.data import store
from aigc.data.pii import Scrubber
from aigc.data.text import MinHashLSH, _split_score, clean_text, expand_inputs, jsonl_objects, read_utf8
from aigc.errors import UserError

CHAT_FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion")
FORMATS = ("auto", *CHAT_FORMATS, "preference")
ROLES = ("system", "user", "assistant", "tool")
TAGS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant",
        "model": "assistant", "system": "system", "observation": "tool", "tool": "tool"}
CALL_TAGS = ("function_call", "tool_call", "tool_calls")  # sharegpt turns that hold an assistant's call(s)
# Which fields tell a format (after --column renaming), most specific first.
SIGNATURES = (("preference", ("chosen", "rejected")), ("messages", ("messages",)), ("sharegpt", ("conversations",)),
              ("alpaca", ("instruction",)), ("prompt_completion", ("prompt", "completion")))
REASONS = ("missing_field", "unknown_tag", "bad_role_order", "bad_tool_call", "empty_assistant", "no_supervised", "identical_pair", "over_length",
           "pii", "duplicate", "near_duplicate")


@dataclass
class ChatPrepareOptions:
    kind: Literal["chat", "preference"] = "chat"
    format: str = "auto"  # auto or one of FORMATS
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> the name in the files
    tags: dict[str, str] = field(default_factory=dict)  # sharegpt "from" tag -> role, beside the usual ones
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    max_chars: int = 0  # a conversation (all turns) longer than this is dropped; 0: no limit
    exact_dedup: bool = True
    near_dedup_threshold: float = 0.9  # on the prompt; 0 disables
    shingle_size: int = 5
    num_perm: int = 128
    val_fraction: float = 0.1
    seed: int = 1337
    pii: Literal["mask", "hash", "drop", "off"] = "mask"
    pii_salt: str = ""
    examples_per_reason: int = 3

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.kind == "preference" and self.format not in ("auto", "preference"):
            raise UserError(f"preference data has one format (prompt, chosen, rejected), got format {self.format!r}")
        if self.kind == "chat" and self.format == "preference":
            raise UserError("format preference is for --kind preference")
        bad = {t: r for t, r in self.tags.items() if r not in ROLES}
        if bad:
            tag, role = next(iter(bad.items()))
            raise UserError(f"tag {tag!r} maps to {role!r}: a role is one of {', '.join(ROLES)}")
        if not 0.0 <= self.near_dedup_threshold <= 1.0:
            raise UserError(f"near_dedup_threshold must be in [0, 1], got {self.near_dedup_threshold}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_chars < 0:
            raise UserError("max_chars must be >= 0")


class Drop(Exception):
    """A record that is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Example:
    """One normalised record: ``messages`` (chat), or ``prompt`` + ``chosen`` + ``rejected`` (preference)."""

    source: str
    line: int
    messages: list[dict] = field(default_factory=list)
    prompt: list[dict] = field(default_factory=list)
    chosen: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None  # the functions a chat example offers (OpenAI's tools list)

    def prompt_text(self) -> str:
        """The conversation up to the last assistant turn, without system messages (a shared house style would
        make every prompt look alike): what dedup and the split key on."""
        turns = self.prompt if self.prompt or self.chosen else self.messages[: _last_assistant(self.messages)]
        return "\n".join(f"{m['role']}: {m['content']}" for m in turns if m["role"] != "system")

    def to_json(self) -> dict:
        if self.chosen:
            return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        return {"messages": self.messages, **({"tools": self.tools} if self.tools else {})}

    def all_messages(self) -> list[dict]:
        return self.messages + self.prompt + self.chosen + self.rejected


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


# ---------------------------------------------------------------- reading

def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line, record) of a .jsonl, .json (an array of objects) or .csv file; broken input is an error naming the line."""
    _, text = read_utf8(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from jsonl_objects(text, str(path))
    elif suffix == ".json":
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(arr, list):
            raise UserError(f"{path}: expected a JSON array of records, got {type(arr).__name__}")
        lines = _array_item_lines(text, len(arr))
        for n, obj in enumerate(arr):
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lines[n]}: record {n + 1} is {type(obj).__name__}, expected a JSON object")
            yield lines[n], obj
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:
            for row in reader:
                if None in row:
                    raise UserError(f"{path}:{reader.line_num}: more values than columns")
                yield reader.line_num, {k: _maybe_json(v) for k, v in row.items()}
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    else:
        raise UserError(f"{path}: conversation data is .jsonl, .json or .csv, not {suffix or 'a file without a suffix'}")


def _array_item_lines(text: str, n: int) -> list[int]:
    """The line where each top-level item of a JSON array starts (for error messages)."""
    dec, lines, pos = json.JSONDecoder(), [], text.index("[") + 1
    while len(lines) < n:
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = dec.raw_decode(text, pos)
    return lines


def _maybe_json(value: str | None):
    """CSV cells hold strings; a cell that is a JSON list (messages, conversations, history) is read as one."""
    if value and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def detect(record: dict) -> str | None:
    for name, keys in SIGNATURES:
        if all(k in record for k in keys):
            return name
    return None


def _renamed(record: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return record
    out = dict(record)
    for ours, theirs in columns.items():
        if theirs in record:
            out[ours] = record[theirs]
    return out


# ---------------------------------------------------------------- one record -> messages

def _text(value, what: str) -> str:
    if value is None:
        raise Drop("missing_field", f"no {what}")
    if not isinstance(value, str):
        raise Drop("missing_field", f"{what} is {type(value).__name__}, expected a string")
    return value


def _msg(role: str, content, what: str, weight=None) -> dict:
    m = {"role": role, "content": _text(content, what)}
    if weight is not None:
        if weight not in (0, 1) or isinstance(weight, bool):
            raise Drop("missing_field", f"{what}: weight must be 0 or 1, got {weight!r}")
        m["weight"] = int(weight)
    return m


def _messages(items, what: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise Drop("missing_field", f"{what} is not a non-empty list of messages")
    out = []
    for k, m in enumerate(items):
        if not isinstance(m, dict):
            raise Drop("missing_field", f"{what}[{k}] needs role and content")
        calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else None)  # (legacy function_call)
        if "role" not in m or ("content" not in m and not calls):
            raise Drop("missing_field", f"{what}[{k}] needs role and content")
        role = {"developer": "system", "function": "tool"}.get(m["role"], m["role"])
        if role not in ROLES:
            raise Drop("bad_role_order", f"{what}[{k}]: role {m['role']!r} is not system, user, assistant or tool")
        if calls and role != "assistant":
            raise Drop("bad_tool_call", f"{what}[{k}]: a {role} turn with tool_calls (only the assistant calls tools)")
        msg = _msg(role, m.get("content") or ("" if calls else m.get("content")), f"{what}[{k}].content", m.get("weight"))
        if calls:
            msg["tool_calls"] = tool_calls(calls, f"{what}[{k}].tool_calls")
        out.append(msg)
    return out


def tool_calls(value, what: str) -> list[dict]:
    """Calls as ``[{"name", "arguments": {...}}]``, from OpenAI's shape (``{"type": "function", "function": {"name",
    "arguments": "JSON"}}``), the plain ``{"name", "arguments"}`` one, or a JSON text of either (sharegpt)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Drop("bad_tool_call", f"{what} is not JSON ({e.msg})") from None
    items = value if isinstance(value, list) else [value]
    out = []
    for k, c in enumerate(items):
        if isinstance(c, dict) and isinstance(c.get("function"), dict):
            c = c["function"]
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise Drop("bad_tool_call", f"{what}[{k}] needs a function name")
        args = c.get("arguments", c.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise Drop("bad_tool_call", f"{what}[{k}].arguments is not JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise Drop("bad_tool_call", f"{what}[{k}].arguments is {type(args).__name__}, expected an object")
        out.append({"name": c["name"], "arguments": args})
    if not out:
        raise Drop("bad_tool_call", f"{what} is empty")
    return out


def tool_list(value, what: str = "tools") -> list[dict] | None:
    """The functions an example offers, as OpenAI's ``tools`` list; from that list, bare function objects, or a JSON
    text of either (LLaMA-Factory)."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Drop("bad_tool_call", f"{what} is not JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise Drop("bad_tool_call", f"{what} is {type(value).__name__}, expected a list of functions")
    out = []
    for k, t in enumerate(value):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" and "function" in t else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise Drop("bad_tool_call", f"{what}[{k}] needs a function name")
        if not isinstance(fn.get("parameters", {}), dict):
            raise Drop("bad_tool_call", f"{what}[{k}].parameters is not a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


def to_messages(fmt: str, r: dict, tags: dict[str, str]) -> list[dict]:
    """A chat record of format ``fmt`` as messages (raises Drop for a record to skip)."""
    if fmt == "messages":
        return _messages(r.get("messages"), "messages")
    if fmt == "prompt_completion":
        return [_msg("user", r.get("prompt"), "prompt"), _msg("assistant", r.get("completion"), "completion")]
    if fmt == "alpaca":
        out = [_msg("system", r["system"], "system")] if r.get("system") else []
        for k, pair in enumerate(r.get("history") or []):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise Drop("missing_field", f"history[{k}] is not a [user, assistant] pair")
            out += [_msg("user", pair[0], f"history[{k}][0]"), _msg("assistant", pair[1], f"history[{k}][1]")]
        instruction = _text(r.get("instruction"), "instruction")
        extra = r.get("input") or ""
        out.append({"role": "user", "content": f"{instruction}\n\n{_text(extra, 'input')}" if extra else instruction})
        out.append(_msg("assistant", r.get("output"), "output"))
        return out
    if fmt == "sharegpt":
        conv = r.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise Drop("missing_field", "conversations is not a non-empty list")
        out = []
        for k, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise Drop("missing_field", f"conversations[{k}] needs from and value")
            tag = str(turn["from"]).lower()
            if tag in CALL_TAGS and tag not in tags:
                out.append({"role": "assistant", "content": "",
                            "tool_calls": tool_calls(turn["value"], f"conversations[{k}].value")})
                continue
            role = {**TAGS, **tags}.get(tag)
            if role is None:
                raise Drop("unknown_tag", f"conversations[{k}]: unknown tag {turn['from']!r} (map it with --tag {turn['from']}=ROLE)")
            out.append(_msg(role, turn["value"], f"conversations[{k}].value"))
        return out
    raise UserError(f"unknown chat format {fmt!r}")


def check_order(messages: list[dict]) -> None:
    """An optional system message, then user and assistant turns alternating, from a user turn to an assistant one;
    an assistant turn with tool calls is followed by one tool turn or more (the results), then the assistant again."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for k, m in enumerate(turns):
        prev = turns[k - 1] if k else None
        if prev is None or (prev["role"] == "assistant" and not prev.get("tool_calls")):
            want = ("user",)
        elif prev["role"] == "user":
            want = ("assistant",)
        elif prev["role"] == "assistant":
            want = ("tool",)
        else:  # after a tool result: another result, or the assistant
            want = ("tool", "assistant")
        if m["role"] not in want:
            raise Drop("bad_role_order", f"turn {k + 1} is {m['role']}, expected {' or '.join(want)}")
    if not turns or turns[-1]["role"] != "assistant":
        raise Drop("bad_role_order", "the conversation does not end with an assistant turn")


def _as_turns(value, role: str, what: str) -> list[dict]:
    return [_msg(role, value, what)] if isinstance(value, str) or value is None else _messages(value, what)


def to_preference(r: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen answer turns, rejected answer turns)."""
    chosen, rejected = _as_turns(r.get("chosen"), "assistant", "chosen"), _as_turns(r.get("rejected"), "assistant", "rejected")
    if r.get("prompt") is not None:
        prompt = _as_turns(r["prompt"], "user", "prompt")
    else:  # implicit prompt: the turns both conversations share
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise Drop("missing_field", "no prompt, and chosen and rejected share no turns")
    check_order(prompt + chosen)
    check_order(prompt + rejected)
    return prompt, chosen, rejected


# ---------------------------------------------------------------- the pipeline

class Tally:
    """Dropped records by reason, with the first few examples of each."""

    def __init__(self, keep: int):
        self.keep, self.counts, self.examples = keep, {}, {}

    def drop(self, reason: str, source: str, line: int, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.keep:
            shown.append({"source": source, "line": line, "detail": detail[:300]})

    def report(self) -> dict:
        order = sorted(self.counts, key=REASONS.index)
        return {"dropped": {r: self.counts[r] for r in order}, "examples": {r: self.examples[r] for r in order}}


def _strings(value, fn):
    """``value`` (a tool call's arguments) with ``fn`` applied to every string in it; None if ``fn`` refused one."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, (list, dict)):
        items = [(k, _strings(v, fn)) for k, v in (value.items() if isinstance(value, dict) else enumerate(value))]
        if any(out is None and (value[k] is not None) for k, out in items):
            return None
        return dict(items) if isinstance(value, dict) else [out for _, out in items]
    return value


def _normalise(ex: Example, opts: ChatPrepareOptions) -> None:
    for m in ex.all_messages():
        m["content"] = clean_text(m["content"], opts.normalization)
        for c in m.get("tool_calls", ()):
            c["arguments"] = _strings(c["arguments"], lambda v: clean_text(v, opts.normalization))


def _check(ex: Example, opts: ChatPrepareOptions) -> None:
    if ex.chosen:
        if any(not m["content"] for m in ex.chosen + ex.rejected if m["role"] == "assistant"):
            raise Drop("empty_assistant", "an empty chosen or rejected answer")
        if ex.chosen == ex.rejected:
            raise Drop("identical_pair", "chosen and rejected are the same")
    else:
        check_order(ex.messages)
        if any(m["role"] == "assistant" and not m["content"] and not m.get("tool_calls") for m in ex.messages):
            raise Drop("empty_assistant", "an assistant turn is empty")
        if all(m.get("weight", 1) == 0 for m in ex.messages if m["role"] == "assistant"):
            raise Drop("no_supervised", "every assistant turn has weight 0: nothing to learn from")
    size = sum(len(m["content"]) for m in ex.all_messages())
    if opts.max_chars and size > opts.max_chars:
        raise Drop("over_length", f"{size} characters, over max_chars {opts.max_chars}")


def read_examples(files: list[Path], opts: ChatPrepareOptions, tally: Tally,
                  builtin: dict[str, list[dict]] | None = None) -> tuple[list[Example], list[dict]]:
    """Every record of ``files`` (and of built-in tasks: name -> records) normalised or dropped into ``tally``;
    and a source record per file or task."""
    examples, sources, first = [], [], None  # first: (format, where) of the first record, for --format auto
    inputs = [(f"builtin:{name}", None, list(enumerate(recs, 1))) for name, recs in (builtin or {}).items()]
    inputs += [(str(f), f, None) for f in files]
    for path, file, rows in inputs:
        data = file.read_bytes() if file is not None else json.dumps(rows, sort_keys=True).encode()
        n_records, formats = 0, {}
        for line, raw in (read_records(file) if file is not None else rows):
            n_records += 1
            r = _renamed(raw, opts.columns)
            fmt = opts.format
            if fmt == "auto":
                fmt = detect(r)
                if fmt is None:
                    raise UserError(f"{path}:{line}: no known format in fields {', '.join(map(str, raw)) or 'none'} (messages, "
                                    "conversations, instruction/output, prompt/completion, prompt/chosen/rejected); "
                                    "map yours with --column OURS=THEIRS or choose --format")
                if first is None:
                    first = (fmt, f"{path}:{line}")
                elif fmt != first[0]:
                    raise UserError(f"{path}:{line}: this record is {fmt} but {first[1]} is {first[0]}: records disagree on the "
                                    "format; split the files or choose --format")
            if (fmt == "preference") != (opts.kind == "preference"):
                raise UserError(f"{path}:{line}: a {fmt} record in {opts.kind} data; use --kind "
                                f"{'preference' if fmt == 'preference' else 'chat'}")
            formats[fmt] = formats.get(fmt, 0) + 1
            try:
                if fmt == "preference":
                    prompt, chosen, rejected = to_preference(r)
                    ex = Example(str(path), line, prompt=prompt, chosen=chosen, rejected=rejected)
                else:
                    ex = Example(str(path), line, messages=to_messages(fmt, r, opts.tags), tools=tool_list(r.get("tools")))
                _normalise(ex, opts)
                _check(ex, opts)
            except Drop as d:
                tally.drop(d.reason, str(path), line, d.detail)
                continue
            examples.append(ex)
        sources.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "records": n_records,
                        "formats": formats})
    return examples, sources


def process(examples: list[Example], opts: ChatPrepareOptions, tally: Tally) -> tuple[list[Example], list[Example], dict]:
    """PII scrub, exact and near dedup on the prompt, split: (train, val, PII report)."""
    pii_report = {"mode": "off"}
    if opts.pii != "off":
        scrubber = Scrubber(opts.pii, salt=opts.pii_salt.encode() or b"aigc-pii")
        kept = []
        for ex in examples:
            scrubbed = [scrubber.scrub(m["content"]) for m in ex.all_messages()]
            args = [_strings(c["arguments"], scrubber.scrub) for m in ex.all_messages() for c in m.get("tool_calls", ())]
            if any(s is None for s in scrubbed + args):
                tally.drop("pii", ex.source, ex.line, "personal data found (pii: drop)")
                continue
            for m, s in zip(ex.all_messages(), scrubbed):
                m["content"] = s
            for c, a in zip([c for m in ex.all_messages() for c in m.get("tool_calls", ())], args):
                c["arguments"] = a
            kept.append(ex)
        examples, pii_report = kept, scrubber.report()
    if opts.exact_dedup:
        seen: dict[bytes, Example] = {}
        kept = []
        for ex in examples:
            key = hashlib.sha1(ex.prompt_text().encode()).digest()
            if key in seen:
                tally.drop("duplicate", ex.source, ex.line, f"the same prompt as {seen[key].source}:{seen[key].line}")
                continue
            seen[key] = ex
            kept.append(ex)
        examples = kept
    if opts.near_dedup_threshold > 0:
        lsh = MinHashLSH(opts.near_dedup_threshold, opts.num_perm, opts.shingle_size, seed=opts.seed)
        kept = []
        for ex in examples:
            other = lsh.add_if_new(ex.prompt_text())
            if other is not None:
                tally.drop("near_duplicate", ex.source, ex.line, f"a prompt close to {kept[other].source}:{kept[other].line}")
                continue
            kept.append(ex)
        examples = kept
    scores = [_split_score(ex.prompt_text(), opts.seed) for ex in examples]
    is_val = [s < opts.val_fraction for s in scores]
    if opts.val_fraction > 0 and len(examples) >= 2:
        if not any(is_val):
            is_val[scores.index(min(scores))] = True
        if all(is_val):
            is_val[scores.index(max(scores))] = False
    return [e for e, v in zip(examples, is_val) if not v], [e for e, v in zip(examples, is_val) if v], pii_report


def prepare(inputs: list[str | Path], out: str | Path, opts: ChatPrepareOptions | None = None, overwrite: bool = False,
            builtin: list[str] | None = None, count: int = 1000) -> dict:
    """Read, normalise, filter, deduplicate, split and write conversation or preference data; return the manifest.
    ``builtin`` names tasks of ``data/tasks.py`` to generate ``count`` records of each (seeded by ``opts.seed``)."""
    from aigc.data import tasks

    opts = opts or ChatPrepareOptions()
    opts.validate()
    out = Path(out)
    if not inputs and not builtin:
        raise UserError(f"nothing to prepare: give {opts.kind} files (.jsonl, .json, .csv) or folders, or --builtin "
                        f"{'|'.join(tasks.TASKS)}")
    files = expand_inputs(inputs, suffixes=(".jsonl", ".json", ".csv")) if inputs else []
    store.check_writable(out, overwrite)
    if builtin and not files:
        opts.near_dedup_threshold = 0.0  # generated prompts share a template: only exact repeats are duplicates
    started = time.time()
    tally = Tally(opts.examples_per_reason)
    generated = {name: tasks.records(name, opts.kind, count, opts.seed) for name in builtin or []}
    examples, sources = read_examples(files, opts, tally, generated)
    read = sum(s["records"] for s in sources)
    train, val, pii_report = process(examples, opts, tally)
    if not train:
        report = tally.report()
        top = max(report["dropped"], key=report["dropped"].get) if report["dropped"] else None
        why = f"; most were {top} (e.g. {report['examples'][top][0]['source']}:{report['examples'][top][0]['line']}: " \
              f"{report['examples'][top][0]['detail']})" if top else ""
        raise UserError(f"no {opts.kind} examples left of {read} records{why}")
    with store.atomic_folder(out, overwrite) as tmp:
        for name, part in (("train", train), ("val", val)):
            with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                for ex in part:
                    f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
        kept = train + val
        manifest = {
            **store.manifest(opts.kind, started, opts),
            "task": builtin[0] if builtin and len(builtin) == 1 and not files else None,  # its checker scores answers
            "sources": sources,
            "records": {"read": read, "kept": len(kept), "train": len(train), "val": len(val)},
            **tally.report(),
            "pii": pii_report,
            "turns": {"mean": round(sum(len(e.all_messages()) for e in kept) / len(kept), 2),
                      "max": max(len(e.all_messages()) for e in kept)},
            "characters": sum(len(m["content"]) for e in kept for m in e.all_messages()),
            "tool_use": {"examples_with_tools": sum(1 for e in kept if e.tools),
                         "tool_calls": sum(len(m.get("tool_calls", ())) for e in kept for m in e.messages)},
        }
        store.write_manifest(tmp, manifest, ("train.jsonl", "val.jsonl"))
    return manifest


def load_prepared(path: str | Path, kind: str = "chat") -> tuple[list[dict], list[dict], dict]:
    """A prepared chat or preference folder: (train records, val records, manifest)."""
    p = Path(path)
    manifest = store.read_manifest(p, kind)
    splits = []
    for split in ("train", "val"):
        with (p / f"{split}.jsonl").open(encoding="utf-8") as f:
            splits.append([json.loads(line) for line in f if line.strip()])
    return splits[0], splits[1], manifest


def combine_prepared(train_dir: str | Path, val_dir: str | Path, out: str | Path, kind: str = "chat") -> dict:
    """A prepared folder whose training records are all of ``train_dir``'s and whose held-out records are all of
    ``val_dir``'s (a separate validation file, as OpenAI's fine-tuning jobs take one); returns its manifest."""
    train_a, val_a, manifest = load_prepared(train_dir, kind)
    train_b, val_b, _ = load_prepared(val_dir, kind)
    train, val = train_a + val_a, train_b + val_b
    with store.atomic_folder(Path(out)) as tmp:
        for name, part in (("train", train), ("val", val)):
            with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                for r in part:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        manifest = {**manifest, "records": {**manifest["records"], "train": len(train), "val": len(val)},
                    "validation": {"source": str(val_dir), "records": len(val)}}
        store.write_manifest(tmp, manifest, ("train.jsonl", "val.jsonl"))
    return manifest
