"""Function calling on chat completions (issue 17, part 3): tools rendered through the chat template (the built-in
one, and the plain transcript of a model without one), calls parsed into OpenAI's tool_calls with arguments that
are always instances of the function's schema (grammar-constrained), tool_choice none/auto/required/named,
role tool messages on the next turn, and streamed tool-call deltas as OpenAI sends them."""
import json

import httpx
import openai
import pytest

from aigc.data.chat_tokens import encode_chat, ensure_chat_template, parse_tool_calls, tool_call_text, tools_prompt

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"type": "string", "enum": ["c", "f"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def client(server, key):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def valid_weather(args: dict) -> bool:
    return set(args) <= {"city", "unit", "days"} and {"city", "unit"} <= set(args) and isinstance(args["city"], str) \
        and len(args["city"]) <= 10 and args["unit"] in ("c", "f") and isinstance(args.get("days", 0), int)


def valid_time(args: dict) -> bool:
    return set(args) == {"tz"} and isinstance(args["tz"], str) and len(args["tz"]) <= 6


VALID = {"get_weather": valid_weather, "get_time": valid_time}


@pytest.mark.parametrize("model", ["long-plain", "long-chat"])
def test_required_and_named_choices_return_schema_valid_calls(long_server, model):
    from tests.serve.helpers import tenant

    _, key = tenant(long_server.sessions, f"tools-{model}", "payg")
    c = client(long_server, key)
    for seed in range(3):
        r = c.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert VALID[call.function.name](json.loads(call.function.arguments)), call.function.arguments
    named = c.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=150, temperature=1.0,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and valid_time(json.loads(call.function.arguments))
    assert named.usage.prompt_tokens > 300  # the tools were rendered into the prompt


def test_auto_lets_the_model_answer_in_text_and_none_leaves_tools_out(long_server):
    from tests.serve.helpers import tenant

    _, key = tenant(long_server.sessions, "tools-auto", "payg")
    c = client(long_server, key)
    auto = c.chat.completions.create(model="long-chat", messages=ASK, tools=[WEATHER], max_tokens=12, temperature=0)
    # the random model does not begin with <tool_call>: a text answer, unconstrained after its first character
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason in ("stop", "length")
    assert not auto.choices[0].message.content.startswith("<tool_call>")
    none = c.chat.completions.create(model="long-chat", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=12,
                                     temperature=0)
    plain = c.chat.completions.create(model="long-chat", messages=ASK, max_tokens=12, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens and none.choices[0].message.content == plain.choices[0].message.content
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 300


def test_tool_results_are_accepted_on_the_next_turn(long_server):
    from tests.serve.helpers import tenant

    _, key = tenant(long_server.sessions, "tools-turn2", "payg")
    c = client(long_server, key)
    first = c.chat.completions.create(model="long-chat", messages=ASK, tools=[WEATHER], tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=150, temperature=0)
    msg = first.choices[0].message
    # (the SDK's message object itself, as people append it: what it serialises must be accepted)
    history = ASK + [msg, {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C and sunny"}]
    second = c.chat.completions.create(model="long-chat", messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    # the call and its result are in the prompt, as training renders them
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(tool_call_text([{"name": "get_weather", "arguments": {}}]))


def test_streamed_tool_call_deltas_add_up_to_the_whole_answer(long_server, long_models):
    from transformers import AutoTokenizer

    from tests.serve.helpers import tenant

    _, key = tenant(long_server.sessions, "tools-stream", "payg")
    c = client(long_server, key)
    kw = dict(model="long-plain", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200, temperature=0)
    whole = c.chat.completions.create(**kw, parallel_tool_calls=False)
    chunks = list(c.chat.completions.create(**kw, parallel_tool_calls=False, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant" and deltas[0].tool_calls[0].function.name and deltas[0].tool_calls[0].id
    assert len(deltas) >= 3  # a head, argument pieces, the finish
    calls: dict[int, dict] = {}
    for d in deltas:
        for t in d.tool_calls or []:
            entry = calls.setdefault(t.index, {"id": t.id, "name": t.function.name, "arguments": ""})
            entry["arguments"] += t.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    want = whole.choices[0].message.tool_calls
    assert [(v["name"], v["arguments"]) for v in calls.values()] == [(t.function.name, t.function.arguments) for t in want]
    # several calls in a row (parallel_tool_calls left on; the end of text banned, so the random model goes on calling):
    # each streamed under its own index
    eos = AutoTokenizer.from_pretrained(str(long_models["plain"])).eos_token_id
    parallel = list(c.chat.completions.create(**{**kw, "max_tokens": 400}, stream=True, logit_bias={str(eos): -100}))
    indexes = {t.index for ch in parallel if ch.choices for t in ch.choices[0].delta.tool_calls or []}
    assert len(indexes) >= 2


def test_bad_tool_requests_are_clear_400s(long_server):
    from tests.serve.helpers import tenant

    _, key = tenant(long_server.sessions, "tools-bad", "payg")

    def post(**body):
        r = httpx.post(long_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": "long-chat", "messages": ASK, "max_tokens": 5, **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert post(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})["param"] == "tool_choice"
    assert post(tool_choice="required")["param"] == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "a+"}}}}}
    assert "pattern" in post(tools=[bad])["message"]
    assert post(tools=[WEATHER, WEATHER])["param"] == "tools"
    assert post(tools=[WEATHER], response_format={"type": "json_object"})["param"] == "response_format"
    assert "deprecated" in post(functions=[WEATHER["function"]])["message"]
    broken = ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": "get_weather", "arguments": "{oops"}}]}]
    assert post(messages=broken)["param"] == "messages[1].tool_calls[0].function.arguments"
    assert post(messages=[{"role": "user"}])["param"] == "messages[0].content"
    ok = httpx.post(long_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                    json={"model": "long-chat", "messages": ASK, "max_tokens": 3, "tools": [], "tool_choice": None})
    assert ok.status_code == 200  # what some wrappers send by default


def test_training_renders_calls_as_the_server_parses_them(chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    ensure_chat_template(tok)
    calls = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]
    convo = ASK + [{"role": "assistant", "content": "", "tool_calls": calls},
                   {"role": "tool", "content": "18 C"}, {"role": "assistant", "content": "It is 18 C."}]
    e = encode_chat(tok, convo, tools=[WEATHER])
    prompt = tok.decode(e.input_ids)
    assert tools_prompt([WEATHER]) in prompt and "<tool_response>\n18 C\n</tool_response>" in prompt
    trained = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100])
    assert trained == tool_call_text(calls) + tok.eos_token + "\n" + "It is 18 C." + tok.eos_token + "\n"
    content, found = parse_tool_calls(tool_call_text(calls))
    assert content == "" and found == [["get_weather", '{"city":"Paris","unit":"c"}']]
    # the server's prompt for the first turn is training's prompt, token for token
    served = encode_chat(tok, ASK, tools=[WEATHER], add_generation_prompt=True).input_ids
    assert e.input_ids[: len(served)] == served
