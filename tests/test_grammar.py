"""The JSON automaton and its token mask (generate/grammar.py)."""
import json
import random

import pytest

from aigc.generate import grammar as g


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
