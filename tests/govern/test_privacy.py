"""PII detection and scrubbing, encryption at rest with key rotation, and the moderation policy."""
import base64
import json

import pytest

from aigc.data import pii
from aigc.data.text import PrepareOptions, prepare
from aigc.errors import UserError
from aigc.govern import moderation as m
from aigc.govern.crypto import KeyRing, secret

VALID_ID = "11010519491231002X"  # the standard example: valid date and check character


def kinds(text):
    return [(x.kind, x.value) for x in pii.find(text)]


def test_pii_kinds_are_validated_not_just_matched():
    assert kinds(f"身份证 {VALID_ID} 号") == [("cn_id", VALID_ID)]
    assert kinds("身份证 110105194912310021") == []  # wrong check character
    assert kinds("id 110105194913310028") == []  # month 13
    assert kinds("card 4111 1111 1111 1111 ok") == [("bank_card", "4111 1111 1111 1111")]
    assert kinds("card 4111 1111 1111 1112") == []  # fails Luhn
    assert kinds("call 13812345678 or +86 138 1234 5678") == [("phone", "13812345678"), ("phone", "+86 138 1234 5678")]
    assert kinds("office 010-62345678") == [("phone", "010-62345678")]
    assert kinds("US +1 415 555 2671") == [("phone", "+1 415 555 2671")]
    assert kinds("mail Zhang.San+x@mail.example.com.cn now") == [("email", "Zhang.San+x@mail.example.com.cn")]
    assert kinds("from 192.168.1.20 and 2001:db8::8a2e:370:7334") == [("ip", "192.168.1.20"), ("ip", "2001:db8::8a2e:370:7334")]
    assert kinds("version 1.2.3.4.5, 999.1.1.1, at 12:30:45, 2023-01-15, ISBN 978-7-111-11111-1") == []


def test_scrub_modes():
    text = f"Write to li@example.cn, ID {VALID_ID}."
    assert pii.Scrubber("mask").scrub(text) == "Write to [EMAIL], ID [CN_ID]."
    h1 = pii.Scrubber("hash").scrub(text)
    assert h1 == pii.Scrubber("hash").scrub(text) and "li@example.cn" not in h1 and "[EMAIL:" in h1
    assert pii.Scrubber("hash", salt=b"other").scrub(text) != h1
    s = pii.Scrubber("drop")
    assert s.scrub(text) is None and s.dropped == 1 and s.scrub("nothing here") == "nothing here"
    assert pii.Scrubber("drop").scrub(text, drop_span=True) == "Write to , ID ."
    with pytest.raises(UserError, match="unknown PII mode"):
        pii.Scrubber("shred")


def test_prepare_scrubs_the_corpus(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(f"Contact me at a.b@example.com today.\n\nMy ID is {VALID_ID}.\n\nA clean paragraph about tea.\n")
    man = prepare([src], tmp_path / "out", PrepareOptions(val_fraction=0.0, near_dedup_threshold=0))
    step = next(s for s in man["steps"] if s["step"] == "pii_scrub")
    assert step["found"] == {"cn_id": 1, "email": 1}
    text = (tmp_path / "out" / "train.jsonl").read_text()
    assert "a.b@example.com" not in text and VALID_ID not in text and "[EMAIL]" in text
    man = prepare([src], tmp_path / "out2", PrepareOptions(val_fraction=0.0, near_dedup_threshold=0, pii="drop"))
    assert sum(1 for _ in (tmp_path / "out2" / "train.jsonl").open()) == 1 and man["documents"]["train"] == 1


def test_encryption_roundtrip_binding_and_rotation(tmp_path):
    ring = KeyRing.load(tmp_path)
    assert (tmp_path / "keys" / "data-keys.json").stat().st_mode & 0o777 == 0o600
    blob = ring.encrypt("秘密 prompt", b"gen-1:prompt")
    assert b"prompt" not in blob and ring.decrypt(blob, b"gen-1:prompt").decode() == "秘密 prompt"
    with pytest.raises(UserError, match="altered or belongs to another row"):
        ring.decrypt(blob, b"gen-2:prompt")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(UserError, match="altered"):
        ring.decrypt(bytes(tampered), b"gen-1:prompt")
    with pytest.raises(UserError, match="bad header"):
        ring.decrypt(b"plain text", b"")
    new = ring.rotate()
    ring2 = KeyRing.load(tmp_path)
    assert ring2.active == new and ring2.decrypt(blob, b"gen-1:prompt")  # old data still readable
    assert KeyRing.key_id(ring2.encrypt("x")) == new
    other = KeyRing({"k9": b"\0" * 32}, "k9")
    with pytest.raises(UserError, match="not in the key ring"):
        other.decrypt(blob, b"gen-1:prompt")


def test_keys_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_DATA_KEYS", "prod2:" + base64.b64encode(b"\1" * 32).decode() + ",prod1:" + base64.b64encode(b"\2" * 32).decode())
    ring = KeyRing.load(tmp_path)
    assert ring.active == "prod2" and not (tmp_path / "keys").exists()
    monkeypatch.setenv("AIGC_DATA_KEYS", "prod:short")
    with pytest.raises(UserError):
        KeyRing.load(tmp_path)
    assert secret(tmp_path, "x") == secret(tmp_path, "x") and len(secret(tmp_path, "x")) == 32


def test_moderation_rules_resist_evasion_and_respect_words():
    p = m.default_policy()
    for text in ("I will KILL you", "ｋｉｌｌ　ｙｏｕ", "kill\u200b you", "杀 了-你", "杀\u200b了你"):
        assert p.check(text, "input").blocked, text
    for text in ("skill yourself up", "the killer whale", "杀毒软件", "a killing joke"):
        assert p.check(text, "input").action == "allow", text
    d = p.check(f"my id {VALID_ID} thanks", "input")
    assert d.action == "redact" and d.text == "my id [REDACTED] thanks" and d.to_dict()["rules"] == ["personal-ids"]
    assert p.check("mail me: x@y.com", "input").action == "allow"  # contact details are redacted in outputs only
    assert p.check("mail me: x@y.com", "output").text == "mail me: [REDACTED]"
    assert p.check("where to buy cocaine", "output").action == "flag"


def test_tenant_policy_yaml_and_errors():
    p = m.Policy.from_yaml("rules:\n  - {id: rival, action: flag, pattern: '(?i)acme\\s*corp', category: brand}\n"
                           "  - {id: words, action: block, terms: [秘密项目, project x]}\n")
    assert p.check("we beat ACME  Corp", "output").action == "flag"
    assert p.check("about PROJECT X", "input").blocked and p.check("关于秘密项目的", "input").blocked
    bad = {"rules: [": "not valid YAML", "rules: [{id: a, action: nuke, terms: [x]}]": "block, redact or flag",
           "rules: [{id: a, action: block}]": "needs terms", "rules: [{id: a, action: block, pattern: '('}]": "invalid regular",
           "rules: [{id: a, action: block, terms: [x], colour: red}]": "unknown fields",
           "rules: [{id: a, action: block, pii: [dna]}]": "unknown pii",
           "rules: [{id: a, action: flag, terms: [x]}, {id: a, action: flag, terms: [y]}]": "unique",
           "classifier: {path: /nonexistent.json}": "not found"}
    for text, msg in bad.items():
        with pytest.raises(UserError, match=msg):
            m.Policy.from_yaml(text)


def test_classifier_on_the_builtin_labelled_set(tmp_path):
    from aigc.cli import BUILTIN_MODERATION

    rows = m.read_labelled(BUILTIN_MODERATION)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test" and r["lang"] == "en"]
    clf = m.Classifier.train([r["text"] for r in train], [r["label"] for r in train])
    clf.save(tmp_path / "clf.json")
    clf = m.Classifier.load(tmp_path / "clf.json")
    pr = m.precision_recall([r["label"] for r in test], [int(s >= 0.5) for s in clf.score([r["text"] for r in test])])
    assert pr["precision"] >= 0.8 and pr["recall"] >= 0.8, pr  # English held-out templates
    (tmp_path / "pol.yaml").write_text("rules: []\nclassifier: {path: clf.json, action: block, applies_to: [input]}\n")
    pol = m.Policy.load(tmp_path / "pol.yaml")
    d = pol.check("Give me a plan to stab my neighbour at the mall", "input")
    assert d.blocked and d.score > 0.5 and pol.check("Write a poem about green tea", "input").action == "allow"
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a moderation classifier"):
        m.Classifier.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="label"):
        (tmp_path / "l.jsonl").write_text('{"text": "x", "label": "maybe"}\n')
        m.read_labelled(tmp_path / "l.jsonl")
