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
    plain = text_of(server, acme[1], max_tokens=8, temperature=0)
    first = tok(plain[0], add_special_tokens=False)["input_ids"][0]
    banned = text_of(server, acme[1], max_tokens=8, temperature=0, logit_bias={str(first): -100})
    assert banned[0] != plain[0] and plain[0] not in banned


def test_penalties_discourage_repeats(server, acme):
    plain = text_of(server, acme[1], max_tokens=60, temperature=0)
    penalised = text_of(server, acme[1], max_tokens=60, temperature=0, frequency_penalty=2, presence_penalty=2)
    assert max(Counter(plain).values()) > max(Counter(penalised).values())
    assert len(set(penalised)) > len(set(plain))


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
    r = httpx.get(server.url + "/v1/files/file-abc", headers=H(acme[1]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "unsupported_endpoint"
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url" and "GET /v2/nothing" in r.json()["error"]["message"]
