"""The generation lifecycle's stages, each on its own: a Service without HTTP, a tenant, the echo model."""
import asyncio
import hashlib
import uuid
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from aigc.db import audit, crud
from aigc.db.crud import Units
from aigc.db.models import AuditEntry, Generation as GenRow, UsageRecord
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import Generation
from aigc.serve.registry import Registry
from aigc.serve.service import Service
from aigc.settings import Settings
from tests.serve.conftest import seed_billing
from tests.serve.helpers import tenant


@pytest.fixture()
def svc(tmp_path):
    service = Service.build(Settings(home=tmp_path), Registry.from_paths([], echo=["echo"]))
    seed_billing(service.sessions)
    yield service
    service.close()


def principal(service, plan="payg", credits=0.0):
    _, secret = tenant(service.sessions, f"t-{uuid.uuid4().hex[:8]}", plan, credits)
    with service.sessions() as s:
        return crud.lookup_key(s, secret)


def gen_for(service, p, rid="req_test", endpoint="images.generations", kind="image"):
    return Generation.admit(service, SimpleNamespace(state=SimpleNamespace(request_id=rid)), p, service.registry.get("echo"),
                            endpoint, kind)


def refused(service, reason):
    return service.metrics.refused.labels(reason)._value.get()


def test_moderate_lets_through_redacts_and_refuses_with_an_audit_entry(svc):
    p = principal(svc)
    g = gen_for(svc, p)
    assert asyncio.run(g.moderate("a red circle")) == "a red circle" and g.input.action == "allow"
    g = gen_for(svc, p, rid="req_bad")
    with pytest.raises(ApiError) as e:
        asyncio.run(g.moderate("I will kill you tomorrow"))
    assert e.value.status == 400 and e.value.code == "content_policy_violation"
    assert refused(svc, "moderation") == 1
    with svc.sessions() as s:
        entry = s.scalar(select(AuditEntry).where(AuditEntry.subject == "request:req_bad"))
    assert entry is not None and entry.kind == "moderation.block"


def test_limit_is_counted_for_every_modality(svc):
    p = principal(svc, "tight")  # 3 requests per minute
    for _ in range(3):
        assert "x-ratelimit-remaining-requests" in asyncio.run(gen_for(svc, p).limit())
    with pytest.raises(ApiError) as e:
        asyncio.run(gen_for(svc, p).limit())
    assert e.value.status == 429 and e.value.headers
    assert refused(svc, "rate_limit") == 1  # image refusals count too (they did not before the lifecycle)


def test_hold_refuses_what_the_balance_cannot_cover_and_gives_the_tokens_back(svc):
    p = principal(svc, "prepaid", credits=0.0)
    g = gen_for(svc, p, endpoint="completions", kind="text")
    asyncio.run(g.limit(500))
    remaining = svc.limiter.take(p.key_id, p.rpm, p.tpm, 0).headers["x-ratelimit-remaining-tokens"]
    with pytest.raises(ApiError) as e:
        asyncio.run(g.hold(Units(100, 400)))
    assert e.value.status == 402 and refused(svc, "payment_required") == 1
    after = svc.limiter.take(p.key_id, p.rpm, p.tpm, 0).headers["x-ratelimit-remaining-tokens"]
    assert int(after) == int(remaining) + 500  # (a window: nothing refills within the minute)


def test_check_output_blocks_taken_down_text(svc):
    p = principal(svc)
    g = gen_for(svc, p, endpoint="completions", kind="text")
    assert g.check_output("plain words") == ("plain words", None)
    with svc.sessions.begin() as s:
        from aigc.db.models import BlockedOutput

        s.add(BlockedOutput(sha256=hashlib.sha256(b"taken down").hexdigest()))
    svc.governance.forget_blocked()
    text, decided = g.check_output("taken down")
    assert text == "" and decided["action"] == "block"
    assert g.withheld(hashlib.sha256(b"taken down").hexdigest())


def test_record_has_named_fields_and_settle_runs_once(svc):
    p = principal(svc)
    g = gen_for(svc, p, rid="req_one")
    asyncio.run(g.moderate("circle"))
    asyncio.run(g.limit())
    asyncio.run(g.hold(Units(images=2)))
    recs = [g.record(f"req_one-{i}", params={"index": i}, output_sha256=f"{i}" * 64, watermark_id=7 + i,
                     filters=g.filters("c2pa")) for i in range(2)]
    r = recs[1]
    assert (r.id, r.request_id, r.org_id, r.key_id, r.endpoint, r.kind, r.model) == \
        ("req_one-1", "req_one", p.org_id, p.key_id, "images.generations", "image", "echo")
    assert r.watermark == {"scheme": "dwtDctSvd", "id": 8} and r.filters == [f"moderation:{g.tenant.moderation.source}", "c2pa"]
    assert r.moderation == {"input": g.input.to_dict()} and r.prompt == "circle" and r.status == "delivered"
    charged, _ = asyncio.run(g.settle("ok", Units(images=2), 0.5, recs))
    assert charged == 80_000  # $0.04 per image
    assert asyncio.run(g.settle("ok", Units(images=2), 0.5, recs)) == (charged, g.settled[1])  # a second call is a no-op
    assert svc.metrics.images.labels("echo")._value.get() == 2
    with svc.sessions() as s:
        assert len(s.scalars(select(UsageRecord).where(UsageRecord.request_id == "req_one")).all()) == 1
        rows = s.scalars(select(GenRow).where(GenRow.request_id == "req_one")).all()
        assert sorted(x.id for x in rows) == ["req_one-0", "req_one-1"]
    with svc.sessions.kw["bind"].connect() as conn:
        assert audit.verify(conn).ok


def test_settle_now_from_a_worker_thread_runs_the_extra_write_in_the_same_transaction(svc):
    p = principal(svc)
    g = gen_for(svc, p, rid="req_job", endpoint="audio.generations", kind="audio")
    asyncio.run(g.hold(Units(seconds=4)))
    seen = []
    g.settle_now("job_x", "ok", Units(seconds=3.0), 1.0, [g.record("job_x", params={}, output_sha256="a" * 64)],
                 also=lambda conn: seen.append(conn))
    assert len(seen) == 1 and g.settled is not None
    with svc.sessions() as s:
        rec = s.scalar(select(UsageRecord).where(UsageRecord.request_id == "job_x"))
        assert rec is not None and rec.seconds == 3.0
        assert s.get(GenRow, "job_x").kind == "audio"


def test_deliver_file_follows_the_tenants_policy(svc):
    from PIL import Image

    from aigc.govern import delivery
    from aigc.govern.records import set_policy

    p = principal(svc)
    img = Image.new("RGB", (256, 256), (120, 60, 30))
    done, withheld = gen_for(svc, p).deliver_file(img, delivery.PNG, "a.png", {"generation_id": "g"}, parameters="circle")
    assert done.filters == ["watermark:image:dwtDctSvd", "metadata:parameters", "c2pa"] and not withheld
    with svc.sessions.begin() as s:
        set_policy(s, p.org_id, {"watermark_image": False, "png_parameters": False, "c2pa": False}, None)
    svc.governance.forget(p.org_id)
    done, _ = gen_for(svc, p).deliver_file(img, delivery.JPEG, "a.jpg", parameters="circle")
    assert done.filters == [] and not done.signed and delivery.read_parameters(done.data) is None


def test_exhausted_credit_can_be_answered_as_openai_does(tmp_path):
    """AIGC_QUOTA_STATUS=429: the status OpenAI uses for exhausted credit (clients classify it by type and code)."""
    service = Service.build(Settings(home=tmp_path, quota_status=429), Registry.from_paths([], echo=["echo"]))
    try:
        seed_billing(service.sessions)
        g = gen_for(service, principal(service, "prepaid", credits=0.0), endpoint="completions", kind="text")
        with pytest.raises(ApiError) as e:
            asyncio.run(g.hold(Units(100, 400)))
        assert e.value.status == 429 and e.value.type == e.value.code == "insufficient_quota"
    finally:
        service.close()
    with pytest.raises(ValueError, match="quota_status"):
        Settings(home=tmp_path, quota_status=418)
