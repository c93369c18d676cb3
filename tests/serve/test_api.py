"""The OpenAI-compatible API through the official openai client, and its errors."""
import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from aigc.generate.text import SamplingParams, TextGenerator
from tests.serve.helpers import add_key


def client(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def H(key):
    return {"Authorization": f"Bearer {key}"}


def test_models_and_completions(server, acme, text_model):
    c = client(server, acme[1])
    ids = {m.id: m for m in c.models.list().data}
    assert set(ids) == {"rand", "shapes", "echo"}
    r = c.completions.create(model="rand", prompt="The quick", max_tokens=12, temperature=0)
    # served text carries the tenant's watermark: the reference decoder with the same key gives the same tokens
    mark = server.service.governance.tenant(acme[0]).mark()
    ref = TextGenerator.from_path(text_model).generate("The quick", SamplingParams(max_new_tokens=12, temperature=0,
                                                                                   watermark=mark))[0]
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # a seed reproduces a sample; n samples use seed, seed+1, ...
    a = c.completions.create(model="rand", prompt="x", max_tokens=10, temperature=1.0, seed=7, n=3)
    b = c.completions.create(model="rand", prompt="x", max_tokens=10, temperature=1.0, seed=7, n=3)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len({ch.text for ch in a.choices}) > 1 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert a.usage.prompt_tokens == 1


def test_chat_stream_stop_and_usage(server, acme):
    c = client(server, acme[1])
    full = c.chat.completions.create(model="rand", messages=[{"role": "user", "content": "hello"}], max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant" and len(text) > 0
    chunks = list(c.chat.completions.create(model="rand", messages=[{"role": "user", "content": "hello"}], max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    # a stop string cuts the output before it and finishes with "stop"
    stop = text[5:7]
    cut = c.chat.completions.create(model="rand", messages=[{"role": "user", "content": "hello"}], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_images_b64_and_signed_url(server, acme):
    c = client(server, acme[1])
    r = c.images.generate(model="shapes", prompt="a small red circle at top left", n=2, size="256x256", response_format="b64_json")
    imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert [im.size for im in imgs] == [(256, 256)] * 2 and r.data[0].revised_prompt == "a small red circle at top left"
    r = c.images.generate(model="shapes", prompt="a large blue square in the center", size="64x64")
    url = r.data[0].url
    got = httpx.get(url)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)
    bad = httpx.get(url.replace("sig=", "sig=0"))
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "invalid_signature"
    with pytest.raises(openai.BadRequestError, match="never saw these caption words: elephant"):
        c.images.generate(model="shapes", prompt="a purple elephant", size="64x64")
    with pytest.raises(openai.BadRequestError, match="text model"):
        c.images.generate(model="rand", prompt="x")


@pytest.mark.parametrize("payload,code", [
    ({"model": "nope", "prompt": "x"}, 404),
    ({"model": "rand", "prompt": "x", "temperature": 3}, 400),
    ({"model": "rand", "prompt": "x", "max_tokens": 0}, 400),
    ({"model": "rand", "prompt": "x", "n": 100}, 400),
    ({"model": "rand", "prompt": "x", "frequency_penalty": 3}, 400),
    ({"model": "rand", "prompt": "x", "logit_bias": {"99999": 5}}, 400),
    ({"model": "rand", "prompt": "x", "logit_bias": {"a": 5}}, 400),
    ({"model": "rand", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400),
    ({"model": "rand", "prompt": "x " * 200, "max_tokens": 5}, 400),  # over the 128-token context
    ({"model": "rand", "prompt": "x", "max_tokens": 1000}, 400),
    ({"model": "rand", "prompt": []}, 400),
    ({"model": "rand", "prompt": ["a"] * 65}, 400),
    ({"model": "rand", "prompt": ["a", "x " * 200], "max_tokens": 5}, 400),  # one of them over the context
    ({"model": "rand"}, 400),
    ({"model": "shapes", "prompt": "x"}, 400),
])
def test_bad_requests_get_openai_errors(server, acme, payload, code):
    r = httpx.post(server.url + "/v1/completions", json=payload, headers=H(acme[1]))
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_malformed_json_and_keys(server, acme):
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": ', headers={**H(acme[1]), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    for headers, code in (({}, "missing_api_key"), (H("sk-aigc-wrong"), "invalid_api_key"), (H("garbage"), "invalid_api_key")):
        r = httpx.post(server.url + "/v1/completions", json={"model": "rand", "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == code
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-aigc-nope").models.list()


def test_roles_allowed_models_revoke_and_expiry(server, acme):
    org, dev = acme
    viewer = add_key(server.sessions, org, "viewer@x.example", "viewer")
    r = httpx.post(server.url + "/v1/completions", json={"model": "echo", "prompt": "x"}, headers=H(viewer))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
    assert httpx.get(server.url + "/v1/usage", headers=H(viewer)).status_code == 200
    only_echo = add_key(server.sessions, org, "ci@x.example", "developer", allowed_models=["echo"])
    assert [m["id"] for m in httpx.get(server.url + "/v1/models", headers=H(only_echo)).json()["data"]] == ["echo"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "rand", "prompt": "x"}, headers=H(only_echo))
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    # an org admin revokes a key through the API: it stops working at once
    admin = add_key(server.sessions, org, "admin@x.example", "admin")
    keys = httpx.get(server.url + "/v1/organization/keys", headers=H(admin)).json()["data"]
    target = next(k for k in keys if k["allowed_models"] == ["echo"])
    assert "hash" not in target and target["prefix"] == only_echo[:16]
    assert httpx.delete(server.url + f"/v1/organization/keys/{target['id']}", headers=H(admin)).status_code == 200
    r = httpx.get(server.url + "/v1/models", headers=H(only_echo))
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"
    created = httpx.post(server.url + "/v1/organization/keys", json={"user": "ci@x.example", "expires_in_days": 30}, headers=H(admin)).json()
    assert created["api_key"].startswith("sk-aigc-") and created["expires_at"]
    assert httpx.get(server.url + "/v1/models", headers=H(created["api_key"])).status_code == 200
    assert created["api_key"] not in str(httpx.get(server.url + "/v1/organization/keys", headers=H(admin)).json())


def test_health_ready_metrics(server, acme):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    client(server, acme[1]).completions.create(model="echo", prompt="a b c", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("aigc_requests_total", "aigc_request_seconds_bucket", "aigc_tokens_total", "aigc_queue_depth",
                 "aigc_revenue_usd_total", "aigc_compute_cost_usd_total"):
        assert name in text, name
    assert 'aigc_tokens_total{direction="output",model="echo"}' in text
    r = httpx.get(server.url + "/healthz", headers={"x-request-id": "abc123"})
    assert r.headers["x-request-id"] == "abc123"
