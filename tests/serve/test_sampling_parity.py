"""OpenAI's (and vLLM's) sampling controls on completions and chat: explicit nulls, penalties, logit_bias,
min_tokens and ignore_eos, max_tokens up to the context, and context errors that name what to shorten."""
from collections import Counter

import httpx
import pytest

from aigc.generate.text import TextGenerator


def H(key):
    return {"Authorization": f"Bearer {key}"}


def complete(server, key, **body):
    r = httpx.post(server.url + "/v1/completions", json={"model": "rand", "prompt": "The ", **body}, headers=H(key), timeout=60)
    return r


def text_of(server, key, **body) -> str:
    r = complete(server, key, **body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def tok(text_model):
    return TextGenerator.from_path(text_model).tokenizer


def test_explicit_nulls_mean_the_defaults(server, acme):
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None, "frequency_penalty": None,
             "presence_penalty": None, "logit_bias": None, "min_tokens": None, "ignore_eos": None, "user": None}
    r = complete(server, acme[1], max_tokens=5, **nulls)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(acme[1]), timeout=60,
                   json={"model": "rand", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **nulls})
    assert r.status_code == 200, r.text
    # zero penalties (what some wrappers always send) change nothing
    assert text_of(server, acme[1], max_tokens=20, temperature=0) == text_of(
        server, acme[1], max_tokens=20, temperature=0, frequency_penalty=0, presence_penalty=0)


def test_logit_bias_forces_and_bans_tokens(server, acme, tok):
    z = tok.convert_tokens_to_ids("z")
    assert text_of(server, acme[1], max_tokens=8, temperature=0, logit_bias={str(z): 100}) == "z" * 8
    plain = text_of(server, acme[1], max_tokens=8, temperature=0, ignore_eos=True)
    first = tok(plain[0], add_special_tokens=False)["input_ids"][0]
    banned = text_of(server, acme[1], max_tokens=8, temperature=0, ignore_eos=True, logit_bias={str(first): -100})
    assert banned[0] != plain[0] and plain[0] not in banned


def test_penalties_discourage_repeats(server, acme):
    # (ignore_eos: a tiny model may end after a few characters; 60 greedy ones repeat. Summed over a few prompts: the
    # random model's vocabulary order changes from session to session, and so do its texts.)
    plain = [text_of(server, acme[1], prompt=p, max_tokens=60, temperature=0, ignore_eos=True) for p in ("The ", "A ", "In ")]
    penalised = [text_of(server, acme[1], prompt=p, max_tokens=60, temperature=0, ignore_eos=True, frequency_penalty=2,
                         presence_penalty=2) for p in ("The ", "A ", "In ")]

    def repeats(t):
        return sum(c * (c - 1) for c in Counter(t).values())

    assert sum(map(repeats, plain)) > sum(map(repeats, penalised))
    assert sum(len(set(t)) for t in penalised) > sum(len(set(t)) for t in plain)


def test_min_tokens_and_ignore_eos_against_a_model_that_wants_to_stop(server, acme, tok):
    eos = {str(tok.eos_token_id): 100}  # the model would end at once
    r = complete(server, acme[1], max_tokens=10, temperature=0, logit_bias=eos).json()
    assert r["usage"]["completion_tokens"] == 0 and r["choices"][0]["finish_reason"] == "stop"
    r = complete(server, acme[1], max_tokens=10, temperature=0, logit_bias=eos, min_tokens=4).json()
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["finish_reason"] == "stop"
    r = complete(server, acme[1], max_tokens=10, temperature=0, logit_bias=eos, ignore_eos=True).json()
    assert r["usage"]["completion_tokens"] == 10 and r["choices"][0]["finish_reason"] == "length"


def test_max_tokens_left_out_runs_to_the_context(server, acme):
    r = complete(server, acme[1], prompt="x", temperature=0, ignore_eos=True).json()
    assert r["usage"]["prompt_tokens"] == 1 and r["usage"]["completion_tokens"] == 127  # a 128-token context
    assert r["choices"][0]["finish_reason"] == "length"


def test_context_errors_name_what_to_shorten(server, acme):
    long = "x " * 200  # over the 128-token context
    err = complete(server, acme[1], prompt=long).json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(acme[1]), timeout=60,
                   json={"model": "rand", "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    err = complete(server, acme[1], prompt="x", max_tokens=500).json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens" and "leave it out" in err["message"]


def test_unsupported_endpoints_say_so_in_openais_shape(server, acme):
    r = httpx.post(server.url + "/v1/audio/transcriptions", headers=H(acme[1]), json={})
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "unsupported_endpoint" and "/v1/audio/transcriptions" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/batches/batch_abc", headers=H(acme[1]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "unsupported_endpoint"
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url" and "GET /v2/nothing" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory):
    """A server whose only model is the offline sentence encoder (and the echo model)."""
    from aigc.serve.registry import Registry
    from aigc.settings import Settings
    from tests.serve.conftest import seed_billing
    from tests.serve.helpers import db, start

    settings = Settings(home=tmp_path_factory.mktemp("home"), log_json=True)
    sessions = db(settings)
    seed_billing(sessions)
    live = start(settings, Registry.from_paths([], echo=["echo"], embeddings=True))
    live.sessions = sessions
    yield live
    live.stop()


def test_embeddings_through_the_openai_client(embed_server):
    import numpy as np
    import openai

    from tests.serve.helpers import tenant

    oid, key = tenant(embed_server.sessions, "emb-tenant", "payg")
    c = openai.OpenAI(base_url=embed_server.url + "/v1", api_key=key, max_retries=0)
    assert "all-MiniLM-L6-v2" in {m.id for m in c.models.list().data}
    r = c.embeddings.create(model="all-MiniLM-L6-v2", input=["a red teapot", "a crimson tea kettle", "quarterly tax report"])
    v = np.array([d.embedding for d in r.data])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # meaning, not spelling
    assert r.usage.prompt_tokens == r.usage.total_tokens > 6
    # (the SDK asked for base64 above and decoded it; asked explicitly, it hands the string over, as does OpenAI's)
    import base64

    b = c.embeddings.create(model="all-MiniLM-L6-v2", input="a red teapot", encoding_format="base64")
    assert np.allclose(np.frombuffer(base64.b64decode(b.data[0].embedding), "<f4"), v[0], atol=1e-5)
    f = httpx.post(embed_server.url + "/v1/embeddings", headers=H(key),
                   json={"model": "all-MiniLM-L6-v2", "input": "a red teapot", "encoding_format": "float"}).json()
    assert np.allclose(f["data"][0]["embedding"], v[0], atol=1e-5)
    with embed_server.sessions() as s:  # metered per input token
        from sqlalchemy import text

        row = s.execute(text("SELECT endpoint, input_tokens FROM usage_records WHERE org_id = :o ORDER BY id"), {"o": oid}).first()
    assert row == ("embeddings", r.usage.prompt_tokens)
    for bad, param in (({"input": ""}, "input"), ({"input": "word " * 400}, "input"), ({"input": "x", "dimensions": 64}, "dimensions")):
        resp = httpx.post(embed_server.url + "/v1/embeddings", headers=H(key), json={"model": "all-MiniLM-L6-v2", **bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    resp = httpx.post(embed_server.url + "/v1/embeddings", headers=H(key), json={"model": "echo", "input": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "wrong_model_kind"


def test_logprobs_in_openais_shapes(server, acme, text_model):
    import math

    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=acme[1], max_retries=0)
    r = c.chat.completions.create(model="rand", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content and 5 <= len(content) <= 6
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        alts = [a.logprob for a in t.top_logprobs]
        assert alts == sorted(alts, reverse=True) and sum(math.exp(v) for v in alts) <= 1 + 1e-4
        # the drawn token, where it is among the alternatives, has the same log-probability there
        assert all(abs(a.logprob - t.logprob) < 1e-5 for a in t.top_logprobs if a.token == t.token)
    r = c.completions.create(model="rand", prompt="The ", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n = len(lp.tokens)  # (a token that adds no text, a special one, is not listed past the end of the text)
    assert "".join(lp.tokens) == r.choices[0].text and 4 <= n <= 5 and len(lp.token_logprobs) == n
    assert all(len(d) <= 2 for d in lp.top_logprobs) and lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(n)]
    echoed = c.completions.create(model="rand", prompt="The ", max_tokens=5, temperature=0, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "The " + r.choices[0].text
    plain = c.completions.create(model="rand", prompt="The ", max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None
    resp = complete(server, acme[1], max_tokens=3, echo=True, logprobs=1)  # the prompt's own logprobs are not computed
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "echo"
    resp = httpx.post(server.url + "/v1/chat/completions", headers=H(acme[1]),
                      json={"model": "rand", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_logprobs"


def test_streamed_logprobs_add_up_to_the_whole_answers(server, acme):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=acme[1], max_retries=0)
    kw = dict(model="rand", messages=[{"role": "user", "content": "hi"}], max_tokens=40, temperature=0, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True})
    whole = c.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = [ch.choices[0] for ch in c.chat.completions.create(**kw, stream=True) if ch.choices]
    streamed = [t for ch in chunks if ch.logprobs for t in ch.logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in whole]
    assert sum(1 for ch in chunks if ch.logprobs and ch.logprobs.content) >= 2  # spread over the chunks, with their text
    for ch in chunks:
        if ch.logprobs and ch.logprobs.content:
            assert "".join(t.token for t in ch.logprobs.content) == ch.delta.content
    parts = [ch.choices[0] for ch in c.completions.create(model="rand", prompt="The ", max_tokens=30, temperature=0, logprobs=1,
                                                          stream=True, extra_body={"ignore_eos": True})]
    text = "".join(p.text for p in parts)
    tokens = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
    offsets = [o for p in parts if p.logprobs for o in p.logprobs.text_offset]
    assert "".join(tokens) == text and offsets == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]


def test_a_list_of_prompts_gets_n_choices_per_prompt_in_order(server, acme):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=acme[1], max_retries=0)
    prompts = ["The ", "A mug", "In "]
    alone = [c.completions.create(model="rand", prompt=p, max_tokens=6, temperature=0, n=2, seed=7) for p in prompts]
    r = c.completions.create(model="rand", prompt=prompts, max_tokens=6, temperature=0, n=2, seed=7)
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [ch.text for a in alone for ch in a.choices]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed: dict[int, str] = {}
    for chunk in c.completions.create(model="rand", prompt=prompts, max_tokens=6, temperature=0, n=2, seed=7, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(6)] == [ch.text for ch in r.choices]
    # one request: every choice in the generation log under its id
    from sqlalchemy import select

    from aigc.db.models import Generation

    with server.sessions() as s:
        ids = s.scalars(select(Generation.id).where(Generation.request_id == r.id.removeprefix("cmpl-"))).all()
    assert sorted(ids) == sorted(f"{r.id.removeprefix('cmpl-')}-{i}" for i in range(6))


def test_json_object_answers_always_parse(server, acme, tok):
    """response_format json_object by grammar-constrained decoding: a tiny random-ish model's answers are JSON objects
    (or, cut by max_tokens, a valid beginning of one)."""
    import json

    from aigc.generate import grammar

    base = {"model": "rand", "messages": [{"role": "user", "content": "a product record"}], "response_format": {"type": "json_object"}}
    close = {str(tok.convert_tokens_to_ids(c)): 8 for c in '"}'}  # nudged to close quickly; the grammar keeps it valid
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(acme[1]), timeout=60,
                   json={**base, "n": 8, "seed": 3, "logit_bias": close}).json()
    stopped = [c["message"]["content"] for c in r["choices"] if c["finish_reason"] == "stop"]
    assert len(stopped) >= 2, r["choices"]
    for t in stopped:
        assert isinstance(json.loads(t), dict), t
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(acme[1]), timeout=60,
                   json={**base, "n": 4, "seed": 5, "max_tokens": 40}).json()
    for c in r["choices"]:  # unnudged: whole objects, or prefixes of one when the budget ran out
        text = c["message"]["content"]
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert c["finish_reason"] == "length" and text.lstrip().startswith("{"), text
            assert grammar.walk(grammar.start("object"), text) is not None, text


def test_the_sdks_parse_returns_a_validated_object(server, acme):
    """client.chat.completions.parse with a pydantic model: the schema (strict) constrains every token, so even a tiny
    model's answer parses and validates."""
    from enum import Enum
    from typing import Optional

    import openai
    from pydantic import BaseModel, Field

    class Colour(str, Enum):
        red = "red"
        green = "green"

    class Item(BaseModel):
        name: str = Field(max_length=4)
        ok: bool

    class Product(BaseModel):  # small enough for the test model's 128-token context, whatever it writes
        title: str = Field(max_length=4)
        colour: Colour
        items: list[Item] = Field(max_length=1)
        note: Optional[str] = Field(max_length=3)

    c = openai.OpenAI(base_url=server.url + "/v1", api_key=acme[1], max_retries=0)
    for seed in range(4):
        r = c.chat.completions.parse(model="rand", messages=[{"role": "user", "content": "a product"}], response_format=Product,
                                     seed=seed, temperature=1.0)
        got = r.choices[0].message.parsed
        assert r.choices[0].finish_reason == "stop" and isinstance(got, Product), r.choices[0].message.content
        assert len(got.title) <= 4 and len(got.items) <= 1 and got.colour in Colour


def test_unsupported_schemas_are_refused_by_name(server, acme):
    base = {"model": "rand", "messages": [{"role": "user", "content": "x"}]}
    for schema, word in (({"type": "string", "pattern": "a+"}, "pattern"), ({"$ref": "http://x/y"}, "local"),
                         ({"type": "object", "required": ["a"]}, "'a'")):
        resp = httpx.post(server.url + "/v1/chat/completions", headers=H(acme[1]), json={
            **base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        assert resp.status_code == 400 and word in resp.json()["error"]["message"], resp.text



def test_a_redaction_that_would_break_the_json_withholds_the_answer(server):
    import uuid

    import yaml

    from tests.serve.helpers import tenant

    _, admin = tenant(server.sessions, f"jr-{uuid.uuid4().hex[:8]}", "payg", role="admin")
    rule = yaml.safe_dump({"rules": [{"id": "no-quotes", "action": "redact", "applies_to": ["output"], "pattern": '"'}]})
    assert httpx.put(server.url + "/v1/organization/policy", headers=H(admin), json={"moderation": rule}).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", headers=H(admin), timeout=60, json={
        "model": "rand", "messages": [{"role": "user", "content": "x"}], "max_tokens": 30, "seed": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"]}}}}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == ""
