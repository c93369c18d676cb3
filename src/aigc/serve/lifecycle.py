"""One generation's lifecycle, the same for every modality and endpoint:

    admit -> moderate -> limit -> hold -> render -> deliver -> record -> settle

- ``Generation.admit``: who asks for which model at which endpoint, under the tenant's policy;
- ``moderate``: the tenant's input policy on the prompt; a refusal is audited, counted and answered 400;
- ``limit``: the key's requests and tokens per minute (429, counted);
- ``hold``: the most the request can cost is reserved from the tenant's balance (402, counted);
- render: the modality's own work (a batching engine, an image or music pipeline, a video composer);
- deliver: what may leave: the output policy on text (``check_output``, ``check_chunk`` when streaming),
  files finished as the tenant's policy says (``deliver_file``: watermark, metadata, C2PA, through
  ``govern.delivery``), and the takedown list on every output (``withheld``);
- ``record``: the one typed record of each output for the generation log (``GenRecord``);
- ``settle``: the charge for the units actually used, the usage record, the generation log and its
  audit entries, in one transaction, and the metrics; run exactly once, also when the client left,
  the request timed out or the model failed (``settle_now`` from a job's worker thread).

A modality supplies only how it renders and the ``Units`` it used.
"""
from __future__ import annotations

import hashlib

import anyio

from aigc.db.crud import Principal, Units
from aigc.govern import delivery
from aigc.govern.delivery import Delivered
from aigc.govern.moderation import Decision
from aigc.serve.billing import Hold
from aigc.serve.errors import ApiError
from aigc.serve.governance import GenRecord, Tenant
from aigc.serve.registry import ModelEntry


async def engine_for(service, entry: ModelEntry):
    """The model's loaded engine or pipeline (render's first step): loaded off the event loop when not resident."""
    if entry.id in service.registry.loaded:
        return service.registry.acquire(entry.id)  # resident: no I/O, just the LRU update
    try:
        return await anyio.to_thread.run_sync(service.registry.acquire, entry.id)
    except Exception as exc:
        raise ApiError(503, f"the model {entry.id!r} could not be loaded: {exc}", code="model_unavailable") from exc


def actor(p: Principal) -> str:
    """Who the audit log names for a request made with this principal."""
    return "operator" if p.operator else f"key:{p.key_prefix}"


class Generation:
    """The state of one request's generation as it passes the stages; each stage is one method."""

    def __init__(self, service, principal: Principal, entry: ModelEntry, endpoint: str, kind: str, request_id: str):
        self.service, self.principal, self.entry = service, principal, entry
        self.endpoint, self.kind, self.request_id = endpoint, kind, request_id
        self.tenant: Tenant = service.governance.tenant(principal.org_id)
        self.input: Decision | None = None  # the input policy's decision on the prompt
        self.prompt = ""  # the prompt as moderated (redacted where a redact rule matched)
        self.headers: dict = {}  # rate-limit headers for the response
        self.budget = 0  # tokens taken from the key's per-minute allowance
        self._slot = 0  # the second the limiter counted them in
        self._hold: Hold | None = None
        self.settled: tuple[int, int] | None = None  # (charged, cost), micro-USD

    # ------------------------------------------------------------ admit

    @classmethod
    def admit(cls, service, request, principal: Principal, entry: ModelEntry, endpoint: str, kind: str) -> Generation:
        """A generation for ``principal`` (its key, role and model already checked by the route's dependencies and
        ``deps.model_for``) under its tenant's current policy."""
        return cls(service, principal, entry, endpoint, kind, request.state.request_id)

    @property
    def policy(self) -> dict:
        return self.tenant.policy

    # ------------------------------------------------------------ moderate

    async def moderate(self, prompt: str, param: str = "prompt") -> str:
        """The prompt as the input policy lets it through; a blocked one is audited and refused."""
        gov = self.service.governance
        decision = gov.moderate(self.tenant, prompt, "input")
        if decision.blocked:
            await gov.refusal(self.principal.org_id, actor(self.principal), self.request_id, self.endpoint, self.entry.id, decision)
            self.service.metrics.refused.labels("moderation").inc()
            cats = ", ".join(decision.to_dict()["categories"]) or "policy"
            raise ApiError(400, f"the prompt was refused by the content policy ({cats})", code="content_policy_violation", param=param)
        self.input, self.prompt = decision, decision.text
        return decision.text

    # ------------------------------------------------------------ limit

    async def limit(self, tokens: int = 0) -> dict:
        """Take one request and ``tokens`` from the key's per-minute allowance (shared by every server:
        ``serve.ratelimit``); the response's rate-limit headers."""
        p = self.principal
        decision = await self.service.limiter.atake(p.limit_key, p.rpm, p.tpm, tokens)
        if not decision.allowed:
            self.service.metrics.refused.labels("rate_limit").inc()
            raise ApiError(429, decision.reason, code="rate_limit_exceeded", headers=decision.headers)
        self.budget, self.headers, self._slot = tokens, decision.headers, decision.slot
        return decision.headers

    # ------------------------------------------------------------ hold

    async def hold(self, estimate: Units) -> Hold:
        """Reserve the most the request can cost (402 when the balance or spend limit cannot cover it)."""
        try:
            self._hold = await self.service.billing.reserve(self.principal, self.entry.id, self.entry.version, estimate)
        except ApiError:
            await self.service.limiter.arefund(self.principal.limit_key, self.budget, self._slot)
            self.service.metrics.refused.labels("payment_required").inc()
            raise
        return self._hold

    # ------------------------------------------------------------ deliver

    def check_output(self, text: str) -> tuple[str, dict | None]:
        """(the text that may leave, the output decision when it is not a plain allow): "" when blocked or taken down."""
        gov = self.service.governance
        d = gov.moderate(self.tenant, text, "output")
        decided = d.to_dict() if d.action != "allow" else None
        if d.blocked or gov.is_blocked(hashlib.sha256(d.text.encode()).hexdigest()):
            return "", {**d.to_dict(), "action": "block"}
        return d.text, decided

    def check_chunk(self, text: str) -> Decision:
        """The output policy on a piece of streamed text (with the tail already sent, for context)."""
        return self.service.governance.moderate(self.tenant, text, "output")

    def pending(self, text: str) -> int:
        """Where in streamed ``text`` a block or redact match may have begun that later text could complete."""
        return self.tenant.moderation.pending(text, "output")

    def deliver_file(self, content, mime: str, title: str, extra: dict | None = None, *, parameters: str | None = None,
                     watermark_id: int | None = None, audio_marked: bool = False) -> tuple[Delivered, bool]:
        """Finish a file as the tenant's policy says (image or audio watermark, metadata, C2PA signature;
        ``govern.delivery``) and check it against the takedown list: (the delivered file, whether it is withheld).
        Blocking: a worker thread."""
        policy, gov = self.policy, self.service.governance
        done = delivery.finish(content, mime, watermark=policy["watermark_audio" if mime == delivery.WAV else "watermark_image"],
                               parameters=parameters if policy["png_parameters"] else None,
                               provenance=gov.provenance if policy["c2pa"] else None,
                               claim=delivery.Claim(title, self.entry.id, self.entry.version, dict(extra or {})),
                               watermark_id=watermark_id, audio_key=gov.audio_secret, audio_marked=audio_marked)
        return done, self.withheld(done.sha256)

    def withheld(self, digest: str) -> bool:
        """Whether an output with this SHA-256 was taken down."""
        return self.service.governance.is_blocked(digest)

    # ------------------------------------------------------------ record

    def filters(self, *applied: str) -> list[str]:
        """What the output passed through, for the log: the moderation policy, then ``applied`` (watermark, c2pa, ...)."""
        return [f"moderation:{self.tenant.moderation.source or 'default'}", *applied]

    def record(self, generation_id: str, *, params: dict, output_sha256: str, output: str | None = None,
               watermark: dict | None = None, watermark_id: int | None = None, output_decision: dict | None = None,
               filters: list[str] | None = None, status: str = "delivered", prompt: str | None = None,
               input_decision=None) -> GenRecord:
        """The generation-log record of one output of this request (``prompt`` and ``input_decision``: its own prompt and
        the input policy's decision on it, where a request has several prompts)."""
        decided = input_decision if input_decision is not None else self.input
        moderation = {"input": decided.to_dict() if decided is not None else {"action": "allow"}}
        if output_decision is not None or self.kind == "text":
            moderation["output"] = output_decision or {"action": "allow"}
        if watermark is None and watermark_id is not None:
            watermark = {"scheme": "dwtDctSvd", "id": watermark_id}
            if "watermark:audio:stdm" in (filters or []):
                watermark = ({"scheme": "dwtDctSvd+stdm", "id": watermark_id} if "watermark:image:dwtDctSvd" in filters
                             else {"scheme": "stdm", "id": watermark_id})
        p = self.principal
        return GenRecord(id=generation_id, request_id=self.request_id, org_id=p.org_id, key_id=p.key_id or None,
                         endpoint=self.endpoint, kind=self.kind, model=self.entry.id, model_version=self.entry.version,
                         params=params, output_sha256=output_sha256, prompt=self.prompt if prompt is None else (prompt or None),
                         output=output, watermark=watermark, watermark_id=watermark_id, moderation=moderation,
                         filters=filters if filters is not None else self.filters(), status=status)

    # ------------------------------------------------------------ settle

    def _settled(self, charged: int, cost: int, units: Units) -> tuple[int, int]:
        m, model = self.service.metrics, self.entry.id
        if units.input_tokens or units.output_tokens:
            m.tokens.labels(model, "input").inc(units.input_tokens)
            m.tokens.labels(model, "output").inc(units.output_tokens)
        if units.images:
            m.images.labels(model).inc(units.images)
        m.revenue.labels(model).inc(charged / 1e6)
        m.cost.labels(model).inc(cost / 1e6)
        self.settled = (charged, cost)
        return self.settled

    def _unused(self, units: Units) -> int:
        return max(0, self.budget - units.input_tokens - units.output_tokens) if self.budget else 0

    def _writer(self, records: list[GenRecord], also):
        write = self.service.governance.writer(records, actor(self.principal)) if records else None

        def both(conn):
            if write is not None:
                write(conn)  # logged and audited in the same transaction as the charge
            if also is not None:
                also(conn)
        return both

    async def settle(self, status: str, units: Units, compute_s: float, records: list[GenRecord] = (), also=None) -> tuple[int, int]:
        """Charge ``units``, append the usage record and the generation log (``records``) in one transaction. Once."""
        if self.settled is not None:
            return self.settled
        self.settled = (0, 0)
        await self.service.limiter.arefund(self.principal.limit_key, self._unused(units), self._slot)
        charged, cost = await self.service.billing.settle(self.request_id, self.principal, self.entry.id, self.entry.version,
                                                          self.endpoint, status, units, self._hold, compute_s,
                                                          also=self._writer(list(records), also))
        return self._settled(charged, cost, units)

    def settle_now(self, settle_id: str, status: str, units: Units, compute_s: float, records: list[GenRecord] = (),
                   also=None) -> tuple[int, int]:
        """``settle`` from a worker thread (a job), under the job's id."""
        if self.settled is not None:
            return self.settled
        self.settled = (0, 0)
        if self._unused(units):
            self.service.limiter.safe_refund(self.principal.limit_key, self._unused(units), self._slot)
        charged, cost = self.service.billing.settle_blocking(settle_id, self.principal, self.entry.id, self.entry.version, self.endpoint,
                                                     status, units, self._hold, compute_s, also=self._writer(list(records), also))
        return self._settled(charged, cost, units)
