"""Text corpus preparation: ingest -> normalise -> clean -> filter -> deduplicate -> split -> manifest.

Input formats: ``.txt`` (split into documents by paragraph, line or whole file), ``.jsonl`` (one
object a line, text in a configurable field) and ``.csv`` (text in a configurable column). Folders
are walked for those extensions. Output, written atomically (a temp folder renamed into place, so
an error or a kill leaves nothing half-written):

    OUT/train.jsonl   {"text": ...} one document a line
    OUT/val.jsonl
    OUT/manifest.json counts before/after every step, sources with SHA-256, options
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np

from aigc.data import store
from aigc.data.pii import Scrubber
from aigc.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclass
class PrepareOptions:
    field: str = "text"  # JSON field / CSV column holding the text
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"  # NFKC folds full-width CJK punctuation, so NFC is the default
    txt_split: Literal["paragraph", "line", "file"] = "paragraph"
    min_chars: int = 1
    max_chars: int = 0  # 0: no upper limit
    exact_dedup: bool = True
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of character shingles; 0 disables
    shingle_size: int = 5
    num_perm: int = 128
    val_fraction: float = 0.1
    seed: int = 1337
    pii: Literal["mask", "hash", "drop", "off"] = "mask"  # personal data (aigc.data.pii): placeholders, keyed hashes, drop the document
    pii_salt: str = ""  # key of the `hash` mode (empty: a fixed default; set one to stop dictionary look-ups)

    def validate(self) -> None:
        if not 0.0 <= self.near_dedup_threshold <= 1.0:
            raise UserError(f"near_dedup_threshold must be in [0, 1], got {self.near_dedup_threshold}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_chars < 0 or self.max_chars < 0:
            raise UserError("min_chars and max_chars must be >= 0")
        if self.max_chars and self.max_chars < self.min_chars:
            raise UserError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        if self.shingle_size < 1 or self.num_perm < 8:
            raise UserError("shingle_size must be >= 1 and num_perm >= 8")


@dataclass
class Document:
    text: str
    source: str  # file path, or builtin:NAME
    line: int  # 1-based line where the document starts in its source


# ---------------------------------------------------------------- reading

def _decode(data: bytes, path: str) -> str:
    nul = data.find(b"\x00")
    if nul != -1:
        raise UserError(f"{path}: looks like a binary file (NUL byte at offset {nul}), expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return text.removeprefix("\ufeff")


def _read_txt(text: str, path: str, split: str) -> Iterator[Document]:
    if split == "file":
        yield Document(text, path, 1)
        return
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if split == "line":
        for i, line in enumerate(text.split("\n"), 1):
            yield Document(line, path, i)
        return
    start, lines = 1, []
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            if not lines:
                start = i
            lines.append(line)
        elif lines:
            yield Document("\n".join(lines), path, start)
            lines = []
    if lines:
        yield Document("\n".join(lines), path, start)


def jsonl_objects(text: str, path: str) -> Iterator[tuple[int, dict]]:
    """(line, object) of each non-blank line; a line that is not a JSON object is an error naming it."""
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _read_jsonl(text: str, path: str, field_name: str) -> Iterator[Document]:
    for i, obj in jsonl_objects(text, path):
        if field_name not in obj:
            raise UserError(f"{path}:{i}: field {field_name!r} not found (fields: {', '.join(obj) or 'none'}); choose one with --field")
        value = obj[field_name]
        if not isinstance(value, str):
            raise UserError(f"{path}:{i}: field {field_name!r} is {type(value).__name__}, expected a string")
        yield Document(value, path, i)


def _read_csv(text: str, path: str, field_name: str) -> Iterator[Document]:
    # strict: a quote that never closes is an error, not a field swallowing the rest of the file
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        columns = reader.fieldnames or []
    except csv.Error as e:
        raise UserError(f"{path}:1: malformed CSV header ({e})") from None
    if field_name not in columns:
        raise UserError(f"{path}:1: column {field_name!r} not found (columns: {', '.join(columns) or 'none'}); choose one with --field")
    while True:
        start = reader.line_num + 1  # the line the next row starts on
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise UserError(f"{path}:{start}: a quote opened on this line never closes (the rest of the file would be "
                                "one field); close or escape it (\"\" inside a quoted field)") from None
            raise UserError(f"{path}:{start}: malformed CSV ({e})") from None
        value = row.get(field_name)
        if value is None:
            raise UserError(f"{path}:{start}: row has no value for column {field_name!r}")
        yield Document(value, path, start)


def expand_inputs(inputs: Iterable[str | Path], suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """Files named directly, plus every supported file under a named folder (sorted, for determinism)."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input not found: {p}")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            if not found:
                raise UserError(f"{p}: folder holds no {', '.join(suffixes)} files")
            files.extend(found)
        elif p.suffix.lower() in suffixes:
            files.append(p)
        else:
            raise UserError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; expected {', '.join(suffixes)}")
    return files


def read_utf8(path: Path) -> tuple[bytes, str]:
    """(the file's bytes, its text): an unreadable, binary or non-UTF-8 file is an error naming it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return data, _decode(data, str(path))


def read_file(path: Path, opts: PrepareOptions) -> tuple[list[Document], dict]:
    data, text = read_utf8(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        docs = list(_read_jsonl(text, str(path), opts.field))
    elif suffix == ".csv":
        docs = list(_read_csv(text, str(path), opts.field))
    else:
        docs = list(_read_txt(text, str(path), opts.txt_split))
    source = {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "documents": len(docs)}
    return docs, source


# ---------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")  # keeps the ideographic space out of CJK text too
_BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str, normalization: str = "NFC") -> str:
    """Unicode normalisation and whitespace clean-up that never joins or splits words."""
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def cjk_fraction(text: str) -> float:
    if not text:
        return 0.0
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf")
    return cjk / len(text)


# ---------------------------------------------------------------- near-duplicate removal

class MinHashLSH:
    """MinHash over character shingles with banded LSH (Broder 1997; Leskovec et al., MMDS ch. 3).

    Character shingles work for Chinese (no word boundaries) and English alike. Signatures use
    multiply-shift hashing (Dietzfelbinger et al.) of 32-bit shingle hashes, so everything stays vectorised in numpy.
    """

    def __init__(self, threshold: float, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        rng = np.random.default_rng(seed)
        # Full 64-bit odd multipliers: the product must wrap mod 2^64, or the hash keeps the keys' order.
        self.a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
        self.rows = self._choose_rows(threshold, num_perm)
        self.bands = num_perm // self.rows
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: list[np.ndarray] = []

    @staticmethod
    def _choose_rows(threshold: float, num_perm: int) -> int:
        # The S-curve 1-(1-s^r)^b has its steepest point near (1/b)^(1/r): pick r so it sits at the threshold.
        options = [r for r in range(1, num_perm + 1) if num_perm % r == 0]
        return min(options, key=lambda r: abs((1 / (num_perm // r)) ** (1 / r) - threshold * 0.9))

    def signature(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        k = min(self.shingle, len(cps)) or 1
        if len(cps) == 0:
            cps = np.zeros(1, dtype=np.uint64)
        n = len(cps) - k + 1
        h = np.zeros(n, dtype=np.uint64)
        for j in range(k):  # polynomial hash of each k-gram, wrapping mod 2^64
            h = h * np.uint64(1_000_003) + cps[j : j + n]
        h = np.unique((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF))
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(h), 4096):  # bounded memory for long documents
            chunk = h[start : start + 4096, None]
            sig = np.minimum(sig, ((chunk * self.a + self.b) >> np.uint64(32)).min(axis=0))
        return sig

    def add_if_new(self, text: str) -> int | None:
        """Insert ``text`` unless it is a near-duplicate of one already kept; return the kept index it duplicates."""
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for band, key in enumerate(keys):
            for other in self.buckets[band].get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                if float(np.mean(self.signatures[other] == sig)) >= self.threshold:
                    return other
        index = len(self.signatures)
        self.signatures.append(sig)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, []).append(index)
        return None


# ---------------------------------------------------------------- pipeline

def _split_score(text: str, seed: int) -> float:
    digest = hashlib.sha1(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def process(docs: list[Document], opts: PrepareOptions, log: callable = lambda msg: None) -> tuple[list[Document], list[Document], list[dict]]:
    """Clean, filter, deduplicate and split; return (train, val, per-step counts)."""
    steps: list[dict] = []

    def step(name: str, before: int, after: int, **extra) -> None:
        steps.append({"step": name, "before": before, "after": after, "removed": before - after, **extra})
        log(f"{name}: {before} -> {after}")

    n0 = len(docs)
    cleaned = [Document(clean_text(d.text, opts.normalization), d.source, d.line) for d in docs]
    cleaned = [d for d in cleaned if d.text]
    step("normalize_and_clean", n0, len(cleaned), normalization=opts.normalization, dropped_empty=n0 - len(cleaned))

    n1 = len(cleaned)
    too_short = sum(1 for d in cleaned if len(d.text) < opts.min_chars)
    too_long = sum(1 for d in cleaned if opts.max_chars and len(d.text) > opts.max_chars)
    kept = [d for d in cleaned if len(d.text) >= opts.min_chars and not (opts.max_chars and len(d.text) > opts.max_chars)]
    step("length_filter", n1, len(kept), min_chars=opts.min_chars, max_chars=opts.max_chars, too_short=too_short, too_long=too_long)

    if opts.pii != "off":
        scrubber = Scrubber(opts.pii, salt=opts.pii_salt.encode() or b"aigc-pii")
        n_pii, scrubbed = len(kept), []
        for d in kept:
            text = scrubber.scrub(d.text)
            if text is not None:
                scrubbed.append(Document(text, d.source, d.line))
        kept = scrubbed
        step("pii_scrub", n_pii, len(kept), **scrubber.report())

    if opts.exact_dedup:
        n2, seen, unique = len(kept), set(), []
        for d in kept:
            key = hashlib.sha1(d.text.encode()).digest()
            if key not in seen:
                seen.add(key)
                unique.append(d)
        kept = unique
        step("exact_dedup", n2, len(kept))

    if opts.near_dedup_threshold > 0:
        n3 = len(kept)
        lsh = MinHashLSH(opts.near_dedup_threshold, opts.num_perm, opts.shingle_size, seed=opts.seed)
        unique = [d for d in kept if lsh.add_if_new(d.text) is None]
        kept = unique
        step("near_dedup", n3, len(kept), threshold=opts.near_dedup_threshold, num_perm=opts.num_perm,
             shingle_size=opts.shingle_size, bands=lsh.bands, rows=lsh.rows)

    if not kept:
        raise UserError(f"no documents left after cleaning, filtering and deduplication ({n0} read); "
                        "check --min-chars/--max-chars and the input")

    scores = [_split_score(d.text, opts.seed) for d in kept]
    is_val = [s < opts.val_fraction for s in scores]
    if opts.val_fraction > 0 and len(kept) >= 2:
        if not any(is_val):  # tiny corpora: hold out at least one document
            is_val[int(np.argmin(scores))] = True
        if all(is_val):
            is_val[int(np.argmax(scores))] = False
    train = [d for d, v in zip(kept, is_val) if not v]
    val = [d for d, v in zip(kept, is_val) if v]
    step("split", len(kept), len(kept), train=len(train), val=len(val), val_fraction=opts.val_fraction, unit="document")
    return train, val, steps


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text}, ensure_ascii=False) + "\n")


def prepare(inputs: list[str | Path], out: str | Path, opts: PrepareOptions | None = None, builtin: list[str] | None = None,
            overwrite: bool = False, log: callable = lambda msg: None) -> dict:
    """Run the whole preparation and write OUT atomically; return the manifest."""
    from aigc.data import builtin as builtin_corpora

    opts = opts or PrepareOptions()
    opts.validate()
    out = Path(out)
    if not inputs and not builtin:
        raise UserError("nothing to prepare: give input files/folders or --builtin NAME")
    files = expand_inputs(inputs)
    store.check_writable(out, overwrite)  # before the reading work, not only after it
    started = time.time()
    docs: list[Document] = []
    sources: list[dict] = []
    for name in builtin or []:
        bdocs, source = builtin_corpora.load(name)
        docs.extend(Document(*d) for d in bdocs)
        sources.append(source)
    for f in files:
        fdocs, source = read_file(f, opts)
        docs.extend(fdocs)
        sources.append(source)
        log(f"read {f}: {len(fdocs)} documents")
    train, val, steps = process(docs, opts, log)

    with store.atomic_folder(out, overwrite) as tmp:
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "val.jsonl", val)
        all_text_chars = sum(len(d.text) for d in train + val)
        manifest = {
            **store.manifest("text", started, opts),
            "sources": sources,
            "steps": steps,
            "documents": {"read": len(docs), "train": len(train), "val": len(val)},
            "characters": {"train": sum(len(d.text) for d in train), "val": sum(len(d.text) for d in val)},
            "cjk_fraction": round(sum(cjk_fraction(d.text) * len(d.text) for d in train + val) / max(1, all_text_chars), 4),
        }
        store.write_manifest(tmp, manifest, ("train.jsonl", "val.jsonl"))
    return manifest


def load_prepared(path: str | Path) -> tuple[list[str], list[str], dict]:
    """Read a prepared corpus folder: (train texts, val texts, manifest)."""
    p = Path(path)
    manifest = store.read_manifest(p, "text")
    texts = {}
    for split in ("train", "val"):
        with (p / f"{split}.jsonl").open(encoding="utf-8") as f:
            texts[split] = [json.loads(line)["text"] for line in f if line.strip()]
    return texts["train"], texts["val"], manifest
