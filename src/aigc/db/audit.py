"""Append-only, hash-chained audit log.

Each entry stores ``hash = SHA-256(prev_hash || canonical JSON of (ts, kind, actor, org_id, subject,
data))``; the first entry's ``prev_hash`` is 64 zeros. Changing, deleting or reordering any entry
breaks every later link, which ``verify`` reports (with the first bad sequence number). Writers race
safely: ``prev_hash`` is UNIQUE, so of two appends that read the same head one fails and retries on
the new head; on PostgreSQL appends also take a transaction-scoped advisory lock, so many concurrent
writers queue instead of retrying against each other.

Truncating the newest entries leaves a valid shorter chain: write down ``head()`` elsewhere (a
ticket, a notary, a second system) and pass it to ``verify(expect_head=...)`` to detect that too.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import Connection, select, text
from sqlalchemy.exc import IntegrityError

from aigc.db.models import AuditEntry

GENESIS = "0" * 64
_HEAD = text("SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1")
_INSERT = AuditEntry.__table__.insert()
_LOCK = text("SELECT pg_advisory_xact_lock(7303311)")
_LAST = "aigc.audit.last"  # in Connection.info: (the transaction, the hash it appended last)


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def entry_hash(prev: str, ts: str, kind: str, actor: str, org_id: int | None, subject: str, data: str) -> str:
    body = canonical({"ts": ts, "kind": kind, "actor": actor, "org_id": org_id, "subject": subject, "data": data})
    return hashlib.sha256((prev + body).encode()).hexdigest()


def append(conn: Connection, kind: str, actor: str, org_id: int | None, subject: str, data: dict, retries: int = 20,
           holds_write_lock: bool = False) -> str:
    """Append one entry inside the caller's transaction; returns its hash.

    No other appender can move the head while this transaction holds the advisory lock (PostgreSQL) or,
    on SQLite, when the caller says its transaction has already written (SQLite then holds the database's
    write lock until commit). Otherwise a SAVEPOINT guards a retry on the new head."""
    payload = canonical(data)
    if conn.dialect.name == "postgresql":
        tx, last = conn.get_transaction(), conn.info.get(_LAST)
        if tx is not None and last is not None and last[0] is tx and not conn.in_nested_transaction():
            prev = last[1]  # this transaction holds the lock and wrote the head itself (a group commit's next entry)
        else:
            conn.execute(_LOCK)  # one appender at a time until this transaction ends: no lost races under load
            prev = conn.execute(_HEAD).scalar() or GENESIS
            tx = conn.get_transaction()  # begun by the statement above where none was
        h = _insert(conn, prev, kind, actor, org_id, subject, payload)
        conn.info[_LAST] = (tx, h)
        return h
    if holds_write_lock:
        return _insert(conn, conn.execute(_HEAD).scalar() or GENESIS, kind, actor, org_id, subject, payload)
    for _ in range(retries):
        prev = conn.execute(_HEAD).scalar() or GENESIS
        ts = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
        h = entry_hash(prev, ts, kind, actor, org_id, subject, payload)
        try:
            with conn.begin_nested():
                conn.execute(_INSERT, {"ts": ts, "kind": kind, "actor": actor, "org_id": org_id, "subject": subject,
                                       "data": payload, "prev_hash": prev, "hash": h})
            return h
        except IntegrityError:
            continue  # another writer took this head: read the new one
    raise RuntimeError("could not append to the audit log: the head kept moving")


def _insert(conn: Connection, prev: str, kind: str, actor: str, org_id: int | None, subject: str, payload: str) -> str:
    ts = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
    h = entry_hash(prev, ts, kind, actor, org_id, subject, payload)
    conn.execute(_INSERT, {"ts": ts, "kind": kind, "actor": actor, "org_id": org_id, "subject": subject,
                           "data": payload, "prev_hash": prev, "hash": h})
    return h


def append_session(session, kind: str, actor: str, org_id: int | None, subject: str, data: dict) -> str:
    """The same from an ORM session (admin actions), in its transaction."""
    return append(session.connection(), kind, actor, org_id, subject, data)


@dataclass
class Report:
    ok: bool
    entries: int
    head: str
    problems: list[str]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "entries": self.entries, "head": self.head, "problems": self.problems}


def verify(conn, expect_head: str | None = None, limit_problems: int = 20) -> Report:
    """Walk the chain in sequence order, recomputing every hash and link."""
    prev, n, problems = GENESIS, 0, []
    rows = conn.execute(select(AuditEntry.__table__).order_by(AuditEntry.seq)).mappings()
    for row in rows:
        n += 1
        if row["prev_hash"] != prev:
            problems.append(f"entry {row['seq']}: its link does not match the previous entry (an entry before it was "
                            f"changed, removed or inserted)")
        expected = entry_hash(row["prev_hash"], row["ts"], row["kind"], row["actor"], row["org_id"], row["subject"], row["data"])
        if expected != row["hash"]:
            problems.append(f"entry {row['seq']}: its content does not match its hash (the entry was altered)")
        prev = row["hash"]
        if len(problems) >= limit_problems:
            break
    if expect_head is not None and prev != expect_head:
        problems.append(f"the chain ends at {prev[:16]}..., not at the expected head {expect_head[:16]}... "
                        "(entries were removed from the end, or the expected head is from another log)")
    return Report(not problems, n, prev, problems)


def head(conn) -> str:
    return conn.execute(_HEAD).scalar() or GENESIS
