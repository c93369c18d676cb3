"""Built-in vertical tasks: the references pass their checkers, the rejected answers fail them for the reason built in."""
import json
import random

import pytest

from aigc.data import tasks
from aigc.data.chat import ChatPrepareOptions, load_prepared, prepare
from aigc.errors import UserError
from conftest import run_cli


def split(record):
    return record["messages"][:-1], record["messages"][-1]["content"]


def test_product_references_are_covered_in_style_and_invent_nothing():
    for rec in tasks.records("products", "chat", 200, seed=3):
        prompt, answer = split(rec)
        v = tasks.check("products", prompt, answer)
        assert v["attribute_coverage"] == 1.0 and v["style_compliance"] and v["invented_facts"] == [], (answer, v)


def test_product_checker_finds_what_is_wrong():
    rng = random.Random(0)
    p = tasks.product(rng)
    prompt, good = tasks.product_prompt(p), tasks.product_answer(p, rng)
    other = next(c for c in tasks.COLOURS if c != p.colour)
    wrong = tasks.check("products", prompt, good.replace(p.colour, other))
    assert wrong["attribute_coverage"] < 1 and not wrong["covered"]["colour"] and other in wrong["invented_facts"]
    boast = tasks.check("products", prompt, good.replace(" is made of ", " is the best thing, made of ", 1))
    assert not boast["style_compliance"] and not boast["style"]["no_superlatives"]
    invented = tasks.check("products", prompt, good.replace(" and costs ", ", ships in 3 days and costs ", 1))
    assert invented["invented_facts"] == ["3"] and invented["attribute_coverage"] == 1.0
    run_on = tasks.check("products", prompt, good + "\n" + "It is great. " * 20)
    assert not run_on["style"]["short"]
    for pair in tasks.records("products", "preference", 30, seed=1):
        chosen = tasks.check("products", pair["prompt"], pair["chosen"])
        rejected = tasks.check("products", pair["prompt"], pair["rejected"])
        assert chosen["style_compliance"] and chosen["attribute_coverage"] == 1.0
        assert not rejected["style_compliance"] or rejected["attribute_coverage"] < 1 or rejected["invented_facts"]


def test_exercises_are_solved_from_their_text():
    for rec in tasks.records("exercises", "chat", 300, seed=2):
        prompt, answer = split(rec)
        assert tasks.check("exercises", prompt, "Let me think.\n" + answer)["correct"], (prompt, answer)
    pair = tasks.records("exercises", "preference", 20, seed=4)
    assert all(not tasks.check("exercises", r["prompt"], r["rejected"])["correct"] for r in pair)
    prompt, _ = split(tasks.records("exercises", "chat", 1, seed=2)[0])
    assert tasks.check("exercises", prompt, "forty") == {"correct": False, "parsed": None, "reason": "no 'Answer: <number>' line"}


def test_poems_keep_their_form():
    recs = tasks.records("poems", "chat", 50, seed=0)
    assert len(recs) == 50
    forms = set()
    for rec in recs:
        prompt, answer = split(rec)
        v = tasks.check("poems", prompt, answer)
        assert v["form_correct"], (prompt, answer, v)
        forms.add(v["found"])
    assert forms <= set(tasks.FORMS.values()) and len(forms) >= 2
    assert tasks.check("poems", prompt, "白日依山盡，黃河入海流。")["form_correct"] is False
    assert tasks.poem_form("白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。") == ("五言絕句", [5, 5, 5, 5])


def test_built_in_tasks_prepare_with_their_name_in_the_manifest(tmp_path):
    m = prepare([], tmp_path / "p", ChatPrepareOptions(), builtin=["products"], count=120)
    assert m["task"] == "products" and m["records"]["read"] == 120 and m["dropped"] == {}
    train, val, _ = load_prepared(tmp_path / "p")
    assert len(train) + len(val) == 120 and train[0]["messages"][0]["role"] == "system"
    m = prepare([], tmp_path / "e", ChatPrepareOptions(kind="preference"), builtin=["exercises"], count=50)
    assert m["kind"] == "preference" and m["records"]["read"] == 50
    with pytest.raises(UserError, match="unknown built-in task 'recipes'"):
        prepare([], tmp_path / "x", ChatPrepareOptions(), builtin=["recipes"])
    res = run_cli("data", "prepare", "--builtin", "poems", "--count", "40", "--out", tmp_path / "poems", "--json")
    assert json.loads(res.stdout)["kind"] == "chat" and json.loads(res.stdout)["task"] == "poems"
