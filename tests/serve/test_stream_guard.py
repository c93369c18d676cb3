"""Streamed output under rules of several words fails closed: whatever the split into chunks, what leaves is the
redaction of the whole text, or the stream stops before any part of a blocked match has left."""
import pytest

from aigc.govern.moderation import Policy
from aigc.serve.text import StreamGuard

POLICY = Policy.from_yaml("""
rules:
  - id: codename
    action: redact
    applies_to: [output]
    terms: ["project blue falcon", "蓝色 猎鹰 计划"]
  - id: leak
    action: redact
    applies_to: [output]
    pattern: "(?i)internal\\\\s+price\\\\s+list"
  - id: threat
    action: block
    applies_to: [output]
    terms: ["i will hurt you"]
""")

TEXTS = [
    "Our roadmap names Project Blue Falcon as the next launch, see the Internal  Price List for details.",
    "Nothing to hide here: a project, a blue sky, a falcon, a price and a list.",
    "我们的 蓝色猎鹰计划 下个月上线，欢迎关注。",
    "Ends with project blue falcon",
]


def run(chunks: list[str]) -> tuple[str, bool]:
    guard = StreamGuard(lambda t: POLICY.check(t, "output"), lambda t: POLICY.pending(t, "output"))
    sent, cut = "", False
    for n, chunk in enumerate(chunks):
        out, d = guard.feed(chunk, final=n == len(chunks) - 1)
        if d is not None and d.blocked:
            cut = True
            break
        sent += out
    return sent, cut


def splits(text: str):
    yield [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]]  # word by word
    yield list(text)  # a character at a time
    for k in range(1, len(text)):  # every split point
        yield [text[:k], text[k:]]


@pytest.mark.parametrize("text", TEXTS)
def test_every_split_sends_exactly_the_redacted_text(text):
    whole = POLICY.check(text, "output").text
    for chunks in splits(text):
        sent, cut = run(chunks)
        assert not cut and sent == whole, chunks
    assert ("falcon" in whole.lower()) == (text.startswith("Nothing"))  # the rules did redact the others


def test_a_block_rule_of_several_words_leaves_no_part_of_it():
    text = "Listen. I will hurt you if you go on."
    for chunks in splits(text):
        sent, cut = run(chunks)
        assert cut, chunks
        assert "hurt" not in sent and not sent.endswith("I will "), (chunks, sent)
        assert sent in ("", "Listen. ")


def test_text_that_only_starts_like_a_rule_is_released():
    sent, cut = run(["the project ", "blue ", "team ", "won"])
    assert not cut and sent == "the project blue team won"
    guard = StreamGuard(lambda t: POLICY.check(t, "output"), lambda t: POLICY.pending(t, "output"))
    assert guard.feed("call project ")[0] == "call "  # "project" is held while "blue falcon" may follow
    assert guard.feed("blue ")[0] == ""
    assert guard.feed("sky ")[0] == "project blue sky "
