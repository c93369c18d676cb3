"""Conversation and preference data: every input format, auto-detection, drops counted by reason, clear errors."""
import csv
import json

import pytest

from aigc.data.chat import ChatPrepareOptions, load_prepared, prepare
from aigc.errors import UserError
from conftest import run_cli


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def opts(**kw):
    return ChatPrepareOptions(val_fraction=0.0, **kw)


def records(out):
    train, val, manifest = load_prepared(out, manifest_kind(out))
    return train + val, manifest


def manifest_kind(out):
    return json.loads((out / "manifest.json").read_text())["kind"]


def test_every_chat_format_becomes_messages(tmp_path):
    jsonl(tmp_path / "oa.jsonl", [{"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello", "weight": 0},
                                                {"role": "user", "content": "Mug?"}, {"role": "assistant", "content": "Blue, 300 ml."}]}])
    got, m = records(_prep(tmp_path, "oa.jsonl"))
    assert got[0]["messages"][0] == {"role": "system", "content": "Be brief."} and got[0]["messages"][2]["weight"] == 0
    assert m["kind"] == "chat" and m["sources"][0]["formats"] == {"messages": 1}

    jsonl(tmp_path / "al.jsonl", [{"instruction": "Describe", "input": "a red mug", "output": "A red mug.", "system": "Style: short",
                                   "history": [["Hi", "Hello"]]}])
    got, _ = records(_prep(tmp_path, "al.jsonl"))
    assert [x["role"] for x in got[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert got[0]["messages"][3]["content"] == "Describe\n\na red mug"

    jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "Pain?"}, {"from": "doctor", "value": "Rest."}]}])
    with pytest.raises(UserError, match="no .* examples left .*unknown_tag .*--tag doctor=ROLE"):
        _prep(tmp_path, "sg.jsonl")
    got, _ = records(_prep(tmp_path, "sg.jsonl", tags={"doctor": "assistant"}))
    assert got[0]["messages"] == [{"role": "user", "content": "Pain?"}, {"role": "assistant", "content": "Rest."}]

    with (tmp_path / "pc.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerow(["What is 2+2?", "4"])
        w.writerow(["Capital of France?", "Paris"])
    got, m = records(_prep(tmp_path, "pc.csv", columns={"prompt": "question", "completion": "answer"}))
    assert [x["messages"][1]["content"] for x in got] == ["4", "Paris"] and m["sources"][0]["formats"] == {"prompt_completion": 2}

    (tmp_path / "arr.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}], indent=1))
    got, _ = records(_prep(tmp_path, "arr.json"))
    assert len(got) == 2


def _prep(tmp_path, name, **kw):
    out = tmp_path / ("out-" + name)
    prepare([tmp_path / name], out, opts(**kw), overwrite=True)
    return out


def test_drops_are_counted_by_reason_with_examples(tmp_path):
    topics = ["a blue mug", "oak tables", "linen shirts", "steel kettles", "wool socks", "paper lamps"]
    ok = [{"messages": [{"role": "user", "content": f"Write two lines on {t} for the shop"},
                        {"role": "assistant", "content": f"Answer {i}"}]} for i, t in enumerate(topics)]
    bad = [
        {"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "no"}]},  # bad_role_order
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  \u200b "}]},  # empty_assistant
        {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "x", "weight": 0}]},  # no_supervised
        {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "y" * 500}]},  # over_length
        {"messages": [{"role": "user", "content": "Write two lines on oak tables for the shop"},
                      {"role": "assistant", "content": "Another answer"}]},  # duplicate prompt
        {"messages": [{"role": "user", "content": "Write two lines on linen shirts for the shop!"},
                      {"role": "assistant", "content": "Near"}]},  # near duplicate
        {"messages": [{"role": "user"}]},  # missing_field
    ]
    out = tmp_path / "out"
    m = prepare([jsonl(tmp_path / "d.jsonl", ok + bad)], out, opts(max_chars=300, near_dedup_threshold=0.8))
    assert m["records"] == {"read": 13, "kept": 6, "train": 6, "val": 0}
    assert m["dropped"] == {"missing_field": 1, "bad_role_order": 1, "empty_assistant": 1, "no_supervised": 1, "over_length": 1,
                            "duplicate": 1, "near_duplicate": 1}
    assert m["examples"]["bad_role_order"] == [{"source": str(tmp_path / "d.jsonl"), "line": 7, "detail": "turn 1 is assistant, expected user"}]
    assert "d.jsonl:2" in m["examples"]["duplicate"][0]["detail"]
    assert len(m["files"]) == 2 and (out / "train.jsonl").read_text().count("\n") == 6


def test_pii_is_scrubbed_or_drops_the_record(tmp_path):
    rows = [{"prompt": "Mail me at ann@example.com", "completion": "Done."}, {"prompt": "Plain", "completion": "Fine."}]
    got, m = records(_prep(tmp_path, jsonl(tmp_path / "p.jsonl", rows).name))
    assert got[0]["messages"][0]["content"] == "Mail me at [EMAIL]" and m["pii"]["found"]
    got, m = records(_prep(tmp_path, "p.jsonl", pii="drop"))
    assert len(got) == 1 and m["dropped"] == {"pii": 1}


def test_mixed_formats_and_broken_lines_are_errors_and_write_nothing(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}])
    jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "output": "y"}])
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"b.jsonl:1: this record is alpaca but .*a.jsonl:1 is prompt_completion"):
        prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], out, opts())
    assert not out.exists()
    # an explicit format reads the records it names; fields it needs and lacks are counted
    m = prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], out, opts(format="alpaca"))
    assert m["dropped"] == {"missing_field": 1} and m["examples"]["missing_field"][0]["detail"] == "no instruction"
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", \n')
    with pytest.raises(UserError, match=r"broken.jsonl:2: not valid JSON"):
        prepare([tmp_path / "broken.jsonl"], tmp_path / "o2", opts())
    jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(UserError, match=r"odd.jsonl:1: no known format in fields question, answer .*--column"):
        prepare([tmp_path / "odd.jsonl"], tmp_path / "o3", opts())
    (tmp_path / "arr.json").write_text('[\n  {"prompt": "a", "completion": "b"},\n  3\n]')
    with pytest.raises(UserError, match=r"arr.json:3: record 2 is int"):
        prepare([tmp_path / "arr.json"], tmp_path / "o4", opts())
    with pytest.raises(UserError, match="a preference record in chat data; use --kind preference"):
        prepare([jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])], tmp_path / "o5", opts())


def test_preference_pairs_explicit_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": "Describe the mug", "chosen": "A blue mug, 300 ml.", "rejected": "The best mug ever!!!"},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
        {"prompt": "Same", "chosen": "x", "rejected": "x"},
        {"prompt": "Empty", "chosen": "ok", "rejected": ""},
    ]
    out = tmp_path / "out"
    m = prepare([jsonl(tmp_path / "p.jsonl", rows)], out, opts(kind="preference"))
    got, _, _ = load_prepared(out, "preference")
    assert m["kind"] == "preference" and m["dropped"] == {"empty_assistant": 1, "identical_pair": 1}
    assert got[0] == {"prompt": [{"role": "user", "content": "Describe the mug"}], "chosen": [{"role": "assistant", "content": "A blue mug, 300 ml."}],
                      "rejected": [{"role": "assistant", "content": "The best mug ever!!!"}]}
    assert got[1]["prompt"] == [{"role": "user", "content": "2+2?"}] and got[1]["chosen"][0]["content"] == "4"
    with pytest.raises(UserError, match="a prepared preference dataset, not a chat one"):
        load_prepared(out, "chat")


def test_options_are_checked():
    for bad, message in (({"format": "yaml"}, "format must be one of"), ({"kind": "preference", "format": "alpaca"}, "one format"),
                         ({"tags": {"bot": "robot"}}, "a role is one of"), ({"format": "preference"}, "for --kind preference")):
        with pytest.raises(UserError, match=message):
            ChatPrepareOptions(**bad).validate()


def test_cli_prepares_chat_data(tmp_path):
    jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": f"Q{i} about tea"}, {"from": "gpt", "value": f"A{i}"}]}
                                 for i in range(10)] + [{"conversations": [{"from": "gpt", "value": "first"}]}])
    res = run_cli("data", "prepare", tmp_path / "c.jsonl", "--kind", "chat", "--out", tmp_path / "out", "--near-dup-threshold", "0")
    assert "chat examples of 11 records; dropped: bad_role_order 1" in res.stdout
    m = json.loads(run_cli("data", "prepare", tmp_path / "c.jsonl", "--kind", "chat", "--out", tmp_path / "out", "--overwrite",
                           "--column", "conversations=conversations", "--tag", "Human=user", "--json").stdout)
    assert m["records"]["train"] + m["records"]["val"] == 10 and m["records"]["val"] >= 1
    bad = run_cli("data", "prepare", tmp_path / "c.jsonl", "--kind", "chat", "--out", tmp_path / "o2", "--tag", "oops", ok=False)
    assert bad.returncode == 2 and "--tag 'oops': write NAME=VALUE" in bad.stderr


WEATHER = {"name": "weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_tool_calls_in_openai_and_sharegpt_records_become_the_same_messages(tmp_path):
    jsonl(tmp_path / "oa.jsonl", [{"tools": [{"type": "function", "function": WEATHER}], "messages": [
        {"role": "user", "content": "Weather in Oslo? Mail bob@example.com"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo", "to": "bob@example.com"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "snow"},
        {"role": "assistant", "content": "Snow in Oslo."}]}])
    jsonl(tmp_path / "sg.jsonl", [{"tools": json.dumps([WEATHER]), "conversations": [  # LLaMA-Factory's shape
        {"from": "human", "value": "Weather in Oslo? Mail bob@example.com"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo", "to": "bob@example.com"}})},
        {"from": "observation", "value": "snow"},
        {"from": "gpt", "value": "Snow in Oslo."}]}])
    (oa, m), (sg, _) = records(_prep(tmp_path, "oa.jsonl")), records(_prep(tmp_path, "sg.jsonl"))
    assert oa == sg
    call = oa[0]["messages"][1]
    assert call == {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo", "to": "[EMAIL]"}}]}
    assert oa[0]["messages"][2] == {"role": "tool", "content": "snow"}
    assert oa[0]["tools"] == [{"type": "function", "function": WEATHER}]
    assert m["tool_use"] == {"examples_with_tools": 1, "tool_calls": 1} and m["pii"]["found"]["email"] == 2


def test_bad_tool_calls_and_turn_orders_are_dropped_by_reason(tmp_path):
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": "{}"}}]}
    jsonl(tmp_path / "bad.jsonl", [
        {"messages": [user, {"role": "assistant", "tool_calls": [{"function": {"name": "weather", "arguments": "{oops"}}]}]},
        {"messages": [user, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
        {"messages": [user, {"role": "tool", "content": "r"}, answer]},  # a result nobody asked for
        {"messages": [user, call, answer]},  # a call without its result
        {"messages": [user, call, {"role": "tool", "content": "r"}, {"role": "tool", "content": "r2"}, answer]},  # kept
        {"messages": [user, call]},  # kept: the call is what is learnt
    ])
    got, m = records(_prep(tmp_path, "bad.jsonl", near_dedup_threshold=0.0, exact_dedup=False))
    assert len(got) == 2 and m["dropped"] == {"bad_role_order": 2, "bad_tool_call": 2}
    assert "arguments is not JSON" in m["examples"]["bad_tool_call"][0]["detail"]
    assert m["examples"]["bad_role_order"][1]["detail"] == "turn 3 is assistant, expected tool"
