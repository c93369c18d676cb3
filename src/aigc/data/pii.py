"""Personal data detection and scrubbing, for training corpora and for stored request logs.

Detected kinds (each candidate is validated, not only pattern-matched, to keep false positives down):

- ``email``: RFC 5322-ish local@domain.tld;
- ``cn_id``: 18-character mainland China resident ID numbers, with a valid birth date and the
  ISO 7064 MOD 11-2 check character;
- ``bank_card``: 13 to 19 digits (spaces or dashes allowed between groups) passing the Luhn check;
- ``phone``: mainland China mobile numbers (1[3-9]x, optional +86 / 0086), China landlines with an
  area code (010-12345678), and international numbers in E.164 style (+ country code, 8-15 digits);
- ``ip``: IPv4 and IPv6 addresses (validated by the standard ``ipaddress`` module).

Modes: ``mask`` replaces a match by ``[EMAIL]``-style placeholders; ``hash`` by a keyed hash
(``[EMAIL:1f3a9c0d]``: the same value always maps to the same token, so joins and counts survive
without the value); ``drop`` removes the whole record that contains personal data (for corpora) or
the span (for logs, see ``scrub(..., drop_span=True)``); ``off`` leaves text alone.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

from aigc.errors import UserError

MODES = ("mask", "hash", "drop", "off")
KINDS = ("email", "cn_id", "bank_card", "phone", "ip")

_EMAIL = r"(?P<email>(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-]))"
_CN_ID = r"(?P<cn_id>(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z]))"
_CARD = r"(?P<bank_card>(?<![\d-])\d{4}(?:[ -]?\d{3,4}){2,3}(?:[ -]?\d{1,3})?(?![\d-]))"
_PHONE = (r"(?P<phone>(?<![\d+])(?:"
          r"(?:\+|00)86[ -]?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # +86 mobile
          r"|1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # mainland mobile
          r"|0\d{2,3}-\d{7,8}"  # mainland landline with area code
          r"|\+(?:[1-9]\d{0,2})[ .-]?(?:\(?\d{1,4}\)?[ .-]?){2,4}\d{2,4}"  # international, E.164-ish
          r")(?![\d]))")
_IPV4 = r"(?P<ipv4>(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.]))"
_IPV6 = r"(?P<ipv6>(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:]))"
# Order matters: an ID number or card must win over the phone pattern that could match inside it.
PATTERN = re.compile("|".join([_EMAIL, _CN_ID, _CARD, _PHONE, _IPV4, _IPV6]))

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def cn_id_valid(s: str) -> bool:
    """Mainland resident ID: 17 digits, a valid date of birth (digits 7-14) and the MOD 11-2 check character."""
    s = s.upper()
    if not re.fullmatch(r"\d{17}[\dX]", s):
        return False
    try:
        birth = dt.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not dt.date(1900, 1, 1) <= birth <= dt.date.today():
        return False
    return _ID_CHECK[sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS)) % 11] == s[17]


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _valid(kind: str, value: str) -> str | None:
    """The kind a candidate really is, or None when the validation rejects it."""
    if kind == "email":
        return "email"
    if kind == "cn_id":
        return "cn_id" if cn_id_valid(value) else _valid("bank_card", value)
    if kind == "bank_card":
        digits = re.sub(r"[ -]", "", value)
        if 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1:
            return "bank_card"
        if re.fullmatch(r"1[3-9]\d{9}", digits):
            return "phone"  # 11-digit mobile numbers look like short card numbers
        return None
    if kind == "phone":
        return "phone" if 8 <= len(re.sub(r"\D", "", value)) <= 15 else None
    if kind in ("ipv4", "ipv6"):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return None
        if kind == "ipv6" and (len([g for g in value.split(":") if g]) < 3 or not re.search(r"\d", value)):
            return None  # "std::ab" or "::1" parse as IPv6 but are not anybody's address
        return "ip"
    return None


@dataclass
class Match:
    kind: str
    start: int
    end: int
    value: str


def find(text: str, kinds: tuple[str, ...] = KINDS) -> list[Match]:
    out = []
    for m in PATTERN.finditer(text):
        group = m.lastgroup or ""
        kind = _valid(group, m.group())
        if kind is not None and kind in kinds:
            out.append(Match(kind, m.start(), m.end(), m.group()))
    return out


@dataclass
class Scrubber:
    """Applies one mode to text; counts what it found by kind (``counts``) and records dropped (``dropped``)."""

    mode: str = "mask"
    kinds: tuple[str, ...] = KINDS
    salt: bytes = b"aigc-pii"
    counts: Counter = field(default_factory=Counter)
    dropped: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown PII mode {self.mode!r}: use one of {', '.join(MODES)}")
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise UserError(f"unknown PII kind(s) {sorted(unknown)}: known kinds are {', '.join(KINDS)}")

    def token(self, m: Match) -> str:
        if self.mode == "hash":
            return f"[{m.kind.upper()}:{hmac.new(self.salt, m.value.encode(), hashlib.sha256).hexdigest()[:8]}]"
        return f"[{m.kind.upper()}]"

    def scrub(self, text: str, drop_span: bool = False) -> str | None:
        """Scrubbed text; None when the mode is ``drop`` and the text holds personal data (the record goes)."""
        if self.mode == "off":
            return text
        found = find(text, self.kinds)
        if not found:
            return text
        self.counts.update(m.kind for m in found)
        if self.mode == "drop" and not drop_span:
            self.dropped += 1
            return None
        parts, last = [], 0
        for m in found:
            parts.append(text[last : m.start])
            parts.append("" if self.mode == "drop" else self.token(m))
            last = m.end
        parts.append(text[last:])
        return "".join(parts)

    def report(self) -> dict:
        return {"mode": self.mode, "found": dict(sorted(self.counts.items())), "records_dropped": self.dropped}
