"""Governance through the live server: watermarks, provenance, moderation, encrypted logs, explanations,
complaints and takedowns, all audited."""
import base64
import io
import json
import re
import uuid

import httpx
import pytest
import yaml
from PIL import Image
from sqlalchemy import text

from aigc.db import audit
from aigc.govern import records
from tests.serve.conftest import seed_billing
from tests.serve.helpers import add_key, db, start, tenant

VALID_ID = "11010519491231002X"


@pytest.fixture(scope="module")
def gov(tmp_path_factory, spread_model, image_model):
    """A server with a high-entropy random text model (watermarks need choices to bias) and the image model."""
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), admin_token="op", log_json=True)
    sessions = db(settings)
    seed_billing(sessions)
    live = start(settings, Registry.from_paths([f"spread={spread_model}", f"shapes={image_model}"], max_batch=4, context=256))
    live.sessions = sessions
    yield live
    live.stop()


def org(gov, role="developer"):
    """(org id, key of `role`, admin key)."""
    oid, key = tenant(gov.sessions, f"t-{uuid.uuid4().hex[:8]}", "payg", role=role)
    return oid, key, add_key(gov.sessions, oid, f"admin-{uuid.uuid4().hex[:6]}@x.example", "admin")


def call(gov, method, path, key=None, **kw):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, gov.url + path, headers=headers, timeout=60, **kw)


def complete(gov, key, prompt="The ", **kw):
    body = {"model": "spread", "prompt": prompt, "max_tokens": 200, "temperature": 1.0, "seed": 5, **kw}
    return call(gov, "POST", "/v1/completions", key, json=body)


def long_completion(gov, key, **kw):
    """A random model may draw its end-of-text token early: the first seed whose sample is long enough to score."""
    for seed in range(5, 40):
        r = complete(gov, key, seed=seed, **kw)
        assert r.status_code == 200, r.text
        if len(r.json()["choices"][0]["text"]) > 150:
            return r
    raise AssertionError("no long sample")


def image(gov, key, size="256x256", fmt="b64_json", seed=3):
    return call(gov, "POST", "/v1/images/generations", key,
                json={"model": "shapes", "prompt": "a large red circle in the center", "size": size, "response_format": fmt, "seed": seed})


def test_text_is_watermarked_per_tenant_logged_encrypted_and_explained(gov):
    oid, dev, admin = org(gov)
    r = long_completion(gov, dev, prompt=f"Mail a@b.example, ID {VALID_ID}: ")
    out = r.json()["choices"][0]["text"]
    gen_id = r.headers["x-generation-ids"]
    assert gen_id.endswith("-0")
    v = call(gov, "POST", "/v1/provenance/verify", dev, json={"text": out, "model": "spread"}).json()["text_watermark"]
    assert v["detected"] and v["z"] > 4
    _, other_dev, _ = org(gov)  # another tenant's key does not see this tenant's watermark
    assert not call(gov, "POST", "/v1/provenance/verify", other_dev, json={"text": out}).json()["text_watermark"]["detected"]
    assert call(gov, "POST", "/v1/provenance/verify", None, json={"text": out}).status_code == 401
    ex = call(gov, "GET", f"/v1/generations/{gen_id}/explanation", dev).json()
    assert ex["model"]["id"] == "spread" and ex["model"]["version"] and ex["parameters"]["temperature"] == 1.0
    assert "watermark:text" in ex["filters"] and ex["moderation"]["input"]["action"] == "redact"  # the ID number
    assert ex["stored_content"] == "encrypted" and ex["audit"]["hash"]
    assert call(gov, "GET", f"/v1/generations/{gen_id}/explanation", other_dev).status_code == 404
    assert call(gov, "GET", f"/v1/generations/{gen_id}/explanation?include_content=true", dev).status_code == 403
    full = call(gov, "GET", f"/v1/generations/{gen_id}/explanation?include_content=true", admin).json()
    assert full["prompt"] == "Mail [EMAIL], ID [REDACTED]: "  # moderation redacted the ID, storage masked the e-mail
    with gov.sessions() as s:  # nothing readable at rest
        blob = s.execute(text("SELECT prompt_enc FROM generations WHERE id = :i"), {"i": gen_id}).scalar()
    assert b"Mail" not in blob and blob.startswith(b"A1")
    # retention: the content goes, the record stays
    import datetime as dt
    with gov.sessions.begin() as s:
        assert records.purge(s, now=dt.datetime.now() + dt.timedelta(days=31))["purged_generations"] >= 1
    assert call(gov, "GET", f"/v1/generations/{gen_id}/explanation", dev).json()["stored_content"] == "purged"


def test_moderation_blocks_inputs_and_outputs(gov):
    oid, dev, admin = org(gov)
    r = complete(gov, dev, prompt="I will kill you tomorrow")
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"
    with gov.sessions() as s:
        row = s.execute(text("SELECT data FROM audit_log WHERE kind = 'moderation.block' AND org_id = :o"), {"o": oid}).scalar()
    assert "threats" in row
    m = call(gov, "POST", "/v1/moderations", dev, json={"input": ["I will kill you", "a poem about tea"]}).json()
    assert [x["flagged"] for x in m["results"]] == [True, False] and m["results"][0]["categories"]["violence"]
    # output stage: the tenant blocks a string its model is about to write
    # a random model may draw its end-of-text token at once: the first prompt whose greedy text is long enough
    for prompt in ("The ", "A ", "In ", "Tea ", "We ", "It ", "On ", "My "):
        first = complete(gov, dev, prompt=prompt, temperature=0, max_tokens=30).json()["choices"][0]["text"]
        if len(first) >= 16 and len(max(first.split() or [""], key=len)) >= 4:
            break
    else:
        pytest.fail(f"no prompt gave a long enough greedy text; last: {first!r}")
    # (dumped, not formatted: the text is random per session and may hold a quote or a backslash)
    rule = yaml.safe_dump({"rules": [{"id": "no-x", "action": "block", "applies_to": ["output"], "pattern": re.escape(first[10:16])}]})
    assert call(gov, "PUT", "/v1/organization/policy", dev, json={"moderation": rule}).status_code == 403
    assert call(gov, "PUT", "/v1/organization/policy", admin, json={"moderation": "rules: ["}).status_code == 400
    assert call(gov, "PUT", "/v1/organization/policy", admin, json={"moderation": rule}).status_code == 200
    again = complete(gov, dev, prompt=prompt, temperature=0, max_tokens=30).json()["choices"][0]
    assert again["finish_reason"] == "content_filter" and again["text"] == ""
    with httpx.stream("POST", gov.url + "/v1/completions", headers={"authorization": f"Bearer {dev}"}, timeout=60,
                      json={"model": "spread", "prompt": prompt, "max_tokens": 30, "temperature": 0, "seed": 5, "stream": True}) as s:
        body = "".join(s.iter_text())
    assert '"finish_reason": "content_filter"' in body and body.rstrip().endswith("[DONE]")
    assert first[10:16] not in body.replace("\\", "")
    # redaction also holds in a stream: text leaves a word at a time, after the check
    word = max(first.split(), key=len)[:4]
    rule = yaml.safe_dump({"rules": [{"id": "hide", "action": "redact", "applies_to": ["output"], "pattern": re.escape(word)}]})
    assert call(gov, "PUT", "/v1/organization/policy", admin, json={"moderation": rule}).status_code == 200
    with httpx.stream("POST", gov.url + "/v1/completions", headers={"authorization": f"Bearer {dev}"}, timeout=60,
                      json={"model": "spread", "prompt": prompt, "max_tokens": 30, "temperature": 0, "seed": 5, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert "[REDACTED]" in streamed and word not in streamed and streamed.replace("[REDACTED]", word) == first


def _png_text(data: bytes) -> dict:
    img = Image.open(io.BytesIO(data))
    img.load()
    return dict(img.text)


def test_images_are_marked_signed_described_and_resolved_for_their_owner(gov):
    oid, dev, admin = org(gov)
    r = image(gov, dev)
    assert r.status_code == 200, r.text
    gen_id = r.headers["x-generation-ids"]
    data = base64.b64decode(r.json()["data"][0]["b64_json"])
    params = _png_text(data)["parameters"]
    assert params.startswith("a large red circle in the center\n") and "Seed: 3" in params and "Model: shapes" in params
    v = call(gov, "POST", "/v1/provenance/verify", dev, json={"file": base64.b64encode(data).decode()}).json()
    assert v["c2pa"]["state"] == "Trusted" and v["c2pa"]["manifest"]["generation_id"] == gen_id
    assert v["c2pa"]["manifest"]["digital_source_type"].endswith("trainedAlgorithmicMedia") and v["exact_match"]
    assert v["image_watermark"]["found"] and v["image_watermark"]["generation"]["generation_id"] == gen_id
    _, other, _ = org(gov)
    seen = call(gov, "POST", "/v1/provenance/verify", other, json={"file": base64.b64encode(data).decode()}).json()
    assert seen["image_watermark"]["generation"] == {"known": True, "owner": False} and not seen["exact_match"]
    anon = call(gov, "POST", "/v1/provenance/verify", None, json={"file": base64.b64encode(data).decode()}).json()
    assert anon["c2pa"]["state"] == "Trusted" and anon["image_watermark"]["found"] and "generation" not in anon["image_watermark"]
    # a JPEG copy loses the manifest but keeps the watermark
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=75)
    j = call(gov, "POST", "/v1/provenance/verify", dev, json={"file": base64.b64encode(buf.getvalue()).decode()}).json()
    assert j["c2pa"]["state"] == "Absent" and j["image_watermark"]["generation"]["generation_id"] == gen_id
    ex = call(gov, "GET", f"/v1/generations/{gen_id}/explanation", dev).json()
    assert ex["dataset"] is not None and "c2pa" in ex["filters"] and ex["watermark"]["scheme"] == "dwtDctSvd"
    # small images carry no pixel watermark but are still signed; the tenant may opt out of parameters
    assert call(gov, "PUT", "/v1/organization/policy", admin, json={"policy": {"png_parameters": False}}).status_code == 200
    small = base64.b64decode(image(gov, dev, size="128x128").json()["data"][0]["b64_json"])
    assert "parameters" not in _png_text(small)
    vs = call(gov, "POST", "/v1/provenance/verify", dev, json={"file": base64.b64encode(small).decode()}).json()
    assert vs["c2pa"]["state"] == "Trusted" and not vs["image_watermark"]["found"]
    assert call(gov, "PUT", "/v1/organization/policy", admin, json={"policy": {"retention_days": 0}}).status_code == 400
    assert call(gov, "POST", "/v1/provenance/verify", dev, json={"file": "%%%"}).status_code == 400
    assert call(gov, "POST", "/v1/provenance/verify", dev, json={"file": base64.b64encode(b"junk").decode()}).json()["c2pa"]["state"] == "Invalid"


def test_jpeg_delivery_is_marked_described_signed_and_served(gov):
    from aigc.govern.delivery import read_parameters

    oid, dev, admin = org(gov)
    r = call(gov, "POST", "/v1/images/generations", dev, json={"model": "shapes", "prompt": "a large red circle in the center",
                                                                "output_format": "jpeg", "seed": 4})
    assert r.status_code == 200, r.text
    gen_id, url = r.headers["x-generation-ids"], r.json()["data"][0]["url"]
    assert "/v1/images/files/" in url and ".jpg?" in url
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(got.content)).format == "JPEG"
    assert read_parameters(got.content).startswith("a large red circle in the center\n")
    v = call(gov, "POST", "/v1/provenance/verify", dev, json={"file": base64.b64encode(got.content).decode()}).json()
    assert v["c2pa"]["state"] == "Trusted" and v["exact_match"]
    assert v["image_watermark"]["generation"]["generation_id"] == gen_id
    ex = call(gov, "GET", f"/v1/generations/{gen_id}/explanation", dev).json()
    assert ex["parameters"]["output_format"] == "jpeg" and "metadata:parameters" in ex["filters"]


def test_complaints_review_takedown_and_revocation_are_audited(gov):
    oid, dev, admin = org(gov)
    reviewer = add_key(gov.sessions, oid, f"rev-{uuid.uuid4().hex[:6]}@x.example", "reviewer")
    r = image(gov, dev, fmt="url", seed=11)
    url = r.json()["data"][0]["url"]
    gen_id = r.headers["x-generation-ids"]
    data = httpx.get(url).content
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=80)  # a re-encoded copy found online
    c = call(gov, "POST", "/v1/complaints", None, json={"reason": "this is my artwork", "contact": "owner@art.example",
                                                          "file": base64.b64encode(buf.getvalue()).decode()})
    assert c.status_code == 201 and c.json()["matched_generation"] and c.json()["evidence"]["by"] == "image_watermark"
    cid = c.json()["id"]
    assert call(gov, "GET", "/v1/complaints", dev).status_code == 403
    _, _, other_admin = org(gov)
    assert call(gov, "GET", "/v1/complaints", other_admin).json()["data"] == []
    assert call(gov, "POST", f"/v1/complaints/{cid}/decision", other_admin, json={"action": "takedown"}).status_code == 404
    queue = call(gov, "GET", "/v1/complaints", reviewer).json()["data"]
    assert [q["id"] for q in queue] == [cid] and queue[0]["generation_id"] == gen_id
    d = call(gov, "POST", f"/v1/complaints/{cid}/decision", reviewer, json={"action": "takedown", "note": "confirmed"})
    assert d.status_code == 200 and d.json()["status"] == "taken_down" and d.json()["deleted_files"] == 1
    assert httpx.get(url).status_code == 404
    assert call(gov, "POST", f"/v1/complaints/{cid}/decision", reviewer, json={"action": "dismiss"}).status_code == 400
    assert call(gov, "GET", f"/v1/generations/{gen_id}/explanation", dev).json()["status"] == "taken_down"
    # a text complaint by content leads to revoking the key that produced it
    t = complete(gov, dev)
    out = t.json()["choices"][0]["text"]
    c2 = call(gov, "POST", "/v1/complaints", None, json={"reason": "defamatory", "content": out}).json()
    assert c2["evidence"]["by"] == "sha256" and c2["generation_id"] == t.headers["x-generation-ids"]
    assert call(gov, "POST", "/v1/complaints", None, json={"reason": "x"}).status_code == 400  # no evidence
    assert call(gov, "POST", "/v1/complaints", None, json={"reason": "x", "sha256": "zz"}).status_code == 400
    unmatched = call(gov, "POST", "/v1/complaints", None, json={"reason": "x", "content": "never generated"}).json()
    assert not unmatched["matched_generation"]
    d2 = call(gov, "POST", f"/v1/complaints/{c2['id']}/decision", "op", json={"action": "revoke_key"})
    assert d2.status_code == 200 and d2.json()["revoked_key"]
    assert complete(gov, dev).json()["error"]["code"] == "key_revoked"
    with gov.sessions() as s:
        kinds = {k for (k,) in s.execute(text("SELECT kind FROM audit_log WHERE org_id = :o"), {"o": oid})}
        rep = audit.verify(s.connection())
    assert {"generation", "complaint.create", "complaint.decision", "admin.key.revoke"} <= kinds
    assert rep.ok, rep.problems
