import json

import pytest

from aigc.data.text import MinHashLSH, PrepareOptions, clean_text, prepare
from aigc.errors import UserError

PARA = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden gate."


def read_jsonl(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_txt_jsonl_csv_are_ingested_cleaned_and_split(tmp_path):
    (tmp_path / "a.txt").write_text("First  paragraph\twith   spaces.\r\n\r\n\r\nSecond paragraph.\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}, ensure_ascii=False) for t in ["床前明月光，疑是地上霜。", "Third doc"]) + "\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text('id,body\n1,"Fourth, with a comma"\n2,Fifth\n', encoding="utf-8")
    out = tmp_path / "out"
    m = prepare([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.csv"], out,
                PrepareOptions(field="body", val_fraction=0.3, near_dedup_threshold=0))
    docs = read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl")
    assert sorted(docs) == sorted(["First paragraph with spaces.", "Second paragraph.", "床前明月光，疑是地上霜。",
                                   "Third doc", "Fourth, with a comma", "Fifth"])
    assert m["documents"] == {"read": 6, "train": len(read_jsonl(out / "train.jsonl")), "val": len(read_jsonl(out / "val.jsonl"))}
    assert m["documents"]["val"] >= 1 and m["documents"]["train"] >= 1
    assert [s["path"] for s in m["sources"]] == [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.csv")]
    import hashlib

    assert m["sources"][0]["sha256"] == hashlib.sha256((tmp_path / "a.txt").read_bytes()).hexdigest()
    assert [s["step"] for s in m["steps"]] == ["normalize_and_clean", "length_filter", "pii_scrub", "exact_dedup", "split"]


def test_split_is_by_document_and_deterministic(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i} " * 5}) for i in range(200)), encoding="utf-8")
    a = prepare([tmp_path / "d.jsonl"], tmp_path / "o1", PrepareOptions(near_dedup_threshold=0))
    prepare([tmp_path / "d.jsonl"], tmp_path / "o2", PrepareOptions(near_dedup_threshold=0))
    assert (tmp_path / "o1/val.jsonl").read_text() == (tmp_path / "o2/val.jsonl").read_text()
    assert 8 <= a["documents"]["val"] <= 35  # ~10% of 200
    assert not set(read_jsonl(tmp_path / "o1/val.jsonl")) & set(read_jsonl(tmp_path / "o1/train.jsonl"))


def test_exact_and_near_duplicates_are_removed_distinct_docs_kept(tmp_path):
    near = PARA.replace("old wooden", "old painted")  # one word changed
    zh = "春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。"
    zh_near = zh.replace("多少", "幾許")
    other = "An entirely different paragraph about databases, indexes and query planners in production."
    (tmp_path / "x.txt").write_text("\n\n".join([PARA, PARA, near, zh, zh_near, other]), encoding="utf-8")
    m = prepare([tmp_path / "x.txt"], tmp_path / "o", PrepareOptions(val_fraction=0, near_dedup_threshold=0.7))
    kept = read_jsonl(tmp_path / "o/train.jsonl")
    assert kept == [PARA, zh, other]
    steps = {s["step"]: s for s in m["steps"]}
    assert steps["exact_dedup"]["removed"] == 1 and steps["near_dedup"]["removed"] == 2


def test_minhash_estimates_jaccard():
    lsh = MinHashLSH(0.5, num_perm=256, shingle=3)
    a, b = lsh.signature("abcdefghij" * 3), lsh.signature("abcdefghij" * 3 + "klmnop")
    c = lsh.signature("zyxwvutsrq")
    assert (a == b).mean() > 0.5 and (a == c).mean() < 0.1


def test_normalization_nfc_keeps_fullwidth_punctuation_nfkc_folds_it():
    assert clean_text("你好，世界！ｱ", "NFC") == "你好，世界！ｱ"
    assert clean_text("你好，世界！ｱ", "NFKC") == "你好,世界!ア"
    assert clean_text("a\u200bb\x07c  d \n\n\n\ne", "NFC") == "abc d\n\ne"


def test_length_filters(tmp_path):
    (tmp_path / "x.txt").write_text("short\n\n" + "x" * 50 + "\n\n" + "y" * 500, encoding="utf-8")
    m = prepare([tmp_path / "x.txt"], tmp_path / "o", PrepareOptions(min_chars=10, max_chars=100, val_fraction=0))
    assert read_jsonl(tmp_path / "o/train.jsonl") == ["x" * 50]
    step = next(s for s in m["steps"] if s["step"] == "length_filter")
    assert (step["too_short"], step["too_long"]) == (1, 1)


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"fine line\nbad \xff byte\n", r"bad\.txt:2: not valid UTF-8 \(byte 0xff at offset 14\)"),
    ("bin.txt", b"PK\x03\x04\x00\x00binary", r"bin\.txt: looks like a binary file \(NUL byte at offset 4\)"),
    ("f.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"f\.jsonl:2: field 'text' not found \(fields: body\)"),
    ("j.jsonl", b'{"text": "a"}\n{"text": \n', r"j\.jsonl:2: not valid JSON"),
    ("c.csv", b"a,b\n1,2\n", r"c\.csv:1: column 'text' not found \(columns: a, b\)"),
    ("q.csv", b'text,n\nfine,1\n"multi\nline, closed",2\n"never closed,3\nnext,4\nlast,5\n', r"q\.csv:5: a quote opened on this line never closes"),
    ("s.csv", b'text,n\nfine,1\n"closed"then more,2\n', r"s\.csv:3: malformed CSV"),
    ("e.txt", b"   \n\n\t\n", r"no documents left"),
    ("x.pdf", b"%PDF", r"unsupported file type '\.pdf'"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare([tmp_path / name], out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp folders left behind


def test_missing_input_and_existing_output(tmp_path):
    with pytest.raises(UserError, match="input not found"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o")
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    prepare([tmp_path / "a.txt"], tmp_path / "o", PrepareOptions(val_fraction=0))
    before = (tmp_path / "o/train.jsonl").read_text()
    with pytest.raises(UserError, match="already exists"):
        prepare([tmp_path / "a.txt"], tmp_path / "o")
    (tmp_path / "b.txt").write_bytes(b"\xff")
    with pytest.raises(UserError):
        prepare([tmp_path / "b.txt"], tmp_path / "o", overwrite=True)
    assert (tmp_path / "o/train.jsonl").read_text() == before  # a failed overwrite keeps the old data


def test_builtin_corpora():
    from aigc.data.builtin import load

    docs, source = load("tang")
    text, where, line = docs[0]
    assert len(docs) > 1000 and text.startswith("《") and where == "builtin:tang" and line >= 1 and source["sha256"]
    docs, _ = load("pydoc")
    assert sum(len(text) for text, _, _ in docs) > 400_000
    with pytest.raises(UserError, match="unknown built-in corpus"):
        load("wiki")
