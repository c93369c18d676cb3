"""Governance on the request path: each tenant's policy, moderation, watermark keys, provenance signing,
and the generation log with its audit entries (written before a response leaves).

A tenant's policy (``Organization.policy``, JSON) overrides these defaults; ``aigc admin org policy``
sets it. Everything is on by default.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from aigc.data.pii import Scrubber
from aigc.db import crud
from aigc.db.models import utcnow
from aigc.db import audit
from aigc.govern import text_watermark
from aigc.govern.crypto import KeyRing, secret
from aigc.govern.records import DEFAULT_POLICY
from aigc.govern.moderation import Decision, Policy, default_policy
from aigc.govern.text_watermark import Watermark
from aigc.settings import Settings

def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass
class Tenant:
    org_id: int
    policy: dict
    moderation: Policy
    text_key: int
    expires: float

    def mark(self) -> Watermark | None:
        return Watermark(self.text_key) if self.policy["watermark_text"] else None


@dataclass
class GenRecord:
    """One output in the generation log; built by ``lifecycle.Generation.record``, written by ``Governance.write``."""

    id: str
    request_id: str
    org_id: int
    key_id: int | None
    endpoint: str
    kind: str
    model: str
    model_version: str
    params: dict
    output_sha256: str
    prompt: str | None = None
    output: str | None = None  # text outputs only (images are referenced by hash)
    watermark: dict | None = None
    watermark_id: int | None = None
    moderation: dict | None = None
    filters: list = field(default_factory=list)
    status: str = "delivered"


class Governance:
    def __init__(self, settings: Settings, sessions, ttl_s: float = 5.0):
        self.settings, self.sessions, self.ttl_s = settings, sessions, ttl_s
        self.home = Path(settings.home)
        self.engine = sessions.kw["bind"]
        self.inline = self.engine.dialect.name == "sqlite"
        self.text_secret = secret(self.home, "text-watermark")
        self.audio_secret = secret(self.home, "audio-watermark")  # one for the fleet (a shared home): any host reads it
        self.keyring = KeyRing.load(self.home, settings.data_keys)
        self._tenants: dict[int, Tenant] = {}
        self.tokenizers: dict[str, object] = {}  # text models' tokenizers, for scoring watermarks
        self._blocked: set[str] = set()
        self._blocked_until = 0.0
        self._provenance = None

    # ------------------------------------------------------------ per-tenant settings

    @property
    def provenance(self):
        if self._provenance is None:
            from aigc.govern.c2pa import Provenance

            self._provenance = Provenance.from_settings(self.settings)
        return self._provenance

    def tenant(self, org_id: int) -> Tenant:
        hit = self._tenants.get(org_id)
        if hit is not None and hit.expires > time.monotonic():
            return hit
        with self.engine.connect() as conn:
            raw_policy, rules = crud.tenant_policy(conn, org_id)
        policy = {**DEFAULT_POLICY, **(raw_policy or {})}
        moderation = Policy.from_yaml(rules, f"the moderation policy of organisation {org_id}") if rules else default_policy()
        t = Tenant(org_id, policy, moderation, text_watermark.tenant_key(self.text_secret, org_id), time.monotonic() + self.ttl_s)
        self._tenants[org_id] = t
        return t

    def forget(self, org_id: int | None = None) -> None:
        if org_id is None:
            self._tenants.clear()
        else:
            self._tenants.pop(org_id, None)

    def moderate(self, t: Tenant, content: str, stage: str) -> Decision:
        return t.moderation.check(content, stage)

    # ------------------------------------------------------------ records

    def is_blocked(self, digest: str) -> bool:
        """Whether an output was taken down (the list is re-read every few seconds, and at once after a takedown here)."""
        if self._blocked_until < time.monotonic():
            with self.engine.connect() as conn:
                self._blocked = crud.blocked_digests(conn)
            self._blocked_until = time.monotonic() + self.ttl_s
        return digest in self._blocked

    def forget_blocked(self) -> None:
        self._blocked_until = 0.0

    def _seal(self, t: Tenant, gen_id: str, content: str | None, what: str) -> bytes | None:
        if content is None or not t.policy["store_content"]:
            return None
        scrubbed = Scrubber(t.policy["pii"]).scrub(content, drop_span=True) or ""
        return self.keyring.encrypt(scrubbed, f"{gen_id}:{what}".encode())

    def writer(self, records: list[GenRecord], actor: str):
        """A function of a connection that writes ``records`` and their audit entries, for Billing.settle's
        transaction (which has already written, so it holds SQLite's write lock)."""
        return lambda conn: self.write(conn, records, actor, holds_write_lock=True)

    def write(self, conn, records: list[GenRecord], actor: str, holds_write_lock: bool = False) -> None:
        for r in records:
            t = self.tenant(r.org_id)
            phash = params_hash(r.params)
            crud.insert_generation(conn, {
                "id": r.id, "request_id": r.request_id, "created_at": utcnow(),
                "org_id": r.org_id, "key_id": r.key_id, "endpoint": r.endpoint, "kind": r.kind, "model": r.model,
                "model_version": r.model_version, "params": r.params, "params_hash": phash,
                "output_sha256": r.output_sha256, "watermark": r.watermark, "watermark_id": r.watermark_id,
                "moderation": r.moderation, "filters": r.filters, "prompt_enc": self._seal(t, r.id, r.prompt, "prompt"),
                "output_enc": self._seal(t, r.id, r.output, "output"), "status": r.status, "purged_at": None})
            audit.append(conn, "generation", actor, r.org_id, f"generation:{r.id}", {
                "generation_id": r.id, "request_id": r.request_id, "key_id": r.key_id, "model": r.model,
                "model_version": r.model_version, "output_sha256": r.output_sha256, "params_hash": phash,
                "watermark": r.watermark, "watermark_id": r.watermark_id, "moderation": r.moderation, "status": r.status},
                holds_write_lock=holds_write_lock)
            holds_write_lock = True  # the insert above took it

    def _refusal(self, org_id: int, actor: str, request_id: str, endpoint: str, model: str, decision: Decision) -> None:
        with self.engine.begin() as conn:
            audit.append(conn, "moderation.block", actor, org_id, f"request:{request_id}",
                         {"request_id": request_id, "endpoint": endpoint, "model": model, **decision.to_dict()})

    async def refusal(self, org_id: int, actor: str, request_id: str, endpoint: str, model: str, decision: Decision) -> None:
        if self.inline:
            self._refusal(org_id, actor, request_id, endpoint, model, decision)
        else:
            await anyio.to_thread.run_sync(self._refusal, org_id, actor, request_id, endpoint, model, decision)
