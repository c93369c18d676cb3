"""The hash-chained audit log on SQLite and PostgreSQL: admin actions are logged, tampering is found,
and concurrent writers never fork the chain."""
import subprocess
import sys
import threading

from sqlalchemy import text

from aigc.db import crud
from aigc.db.session import open_db
from aigc.db import audit


def test_admin_actions_are_chained_and_tampering_is_found(database_url):
    sessions = open_db(database_url)
    engine = sessions.kw["bind"]
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        org = crud.create_org(s, "acme", "payg")
        user = crud.create_user(s, org.id, "a@acme.example", "admin")
        key, _ = crud.create_key(s, user, name="k")
        crud.revoke_key(s, org.id, key.id)
    with engine.connect() as conn:
        rep = audit.verify(conn)
        kinds = [r[0] for r in conn.execute(text("SELECT kind FROM audit_log ORDER BY seq"))]
        head = audit.head(conn)
    assert rep.ok and rep.entries == 5 and rep.head == head
    assert kinds == ["admin.plan.create", "admin.org.create", "admin.user.create", "admin.key.create", "admin.key.revoke"]
    with engine.begin() as conn:  # someone edits an entry in the database directly
        conn.execute(text("UPDATE audit_log SET data = replace(data, 'a@acme.example', 'b@acme.example') WHERE seq = 3"))
    with engine.connect() as conn:
        rep = audit.verify(conn)
    assert not rep.ok and rep.problems[0].startswith("entry 3: its content does not match")
    # the CLI reports it too, with exit status 1
    cli = subprocess.run([sys.executable, "-m", "aigc.cli", "audit", "verify", "--db", database_url], capture_output=True, text=True)
    assert cli.returncode == 1 and "TAMPERED" in cli.stderr
    with engine.begin() as conn:  # recomputing that entry's hash does not help: the next link breaks
        row = conn.execute(text("SELECT * FROM audit_log WHERE seq = 3")).mappings().one()
        h = audit.entry_hash(row["prev_hash"], row["ts"], row["kind"], row["actor"], row["org_id"], row["subject"], row["data"])
        conn.execute(text("UPDATE audit_log SET hash = :h WHERE seq = 3"), {"h": h})
    with engine.connect() as conn:
        rep = audit.verify(conn)
    assert not rep.ok and any(p.startswith("entry 4: its link") for p in rep.problems)
    engine.dispose()


def test_deletion_and_truncation(database_url):
    sessions = open_db(database_url)
    engine = sessions.kw["bind"]
    with engine.begin() as conn:
        for i in range(5):
            audit.append(conn, "test", "t", None, f"s{i}", {"i": i})
    with engine.connect() as conn:
        head = audit.head(conn)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)"))
    with engine.connect() as conn:
        assert audit.verify(conn).ok  # a shorter chain is still a chain...
        assert not audit.verify(conn, expect_head=head).ok  # ...unless the head was written down elsewhere
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 2"))
    with engine.connect() as conn:
        assert not audit.verify(conn).ok
    engine.dispose()


def test_concurrent_writers_keep_one_chain(database_url):
    sessions = open_db(database_url)
    engine = sessions.kw["bind"]
    errors = []

    def writer(w):
        try:
            for i in range(15):
                with engine.begin() as conn:
                    audit.append(conn, "test", f"w{w}", None, f"{w}-{i}", {"w": w, "i": i})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with engine.connect() as conn:
        rep = audit.verify(conn)
    assert rep.ok and rep.entries == 90, rep.problems
    engine.dispose()


def test_generation_records_and_complaints_on_each_database(database_url, tmp_path):
    from aigc.govern import records
    from aigc.serve.governance import GenRecord, Governance

    sessions = open_db(database_url)
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        org = crud.create_org(s, "acme", "payg")
        key, _ = crud.create_key(s, crud.create_user(s, org.id, "d@acme.example", "developer"))
        org_id, key_id = org.id, key.id
    from aigc.settings import Settings

    gov = Governance(Settings(home=tmp_path), sessions)
    rec = GenRecord("req1-0", "req1", org_id, key_id, "completions", "text", "m", "v1", {"temperature": 0.7}, "ab" * 32,
                    prompt="call 13812345678", output="hello", watermark={"scheme": "green-list"}, moderation={"input": {"action": "allow"}},
                    filters=["watermark:text"])
    with sessions.kw["bind"].begin() as conn:
        gov.writer([rec], "key:test")(conn)
    with sessions.begin() as s:
        ex = records.explain(s, "req1-0", org_id, {}, gov.keyring, reveal=True)
        assert ex["prompt"] == "call [PHONE]" and ex["output"] == "hello" and ex["parameters"] == {"temperature": 0.7}
        c = records.create_complaint(s, "spam", digest="ab" * 32)
        assert c.generation_id == "req1-0" and c.org_id == org_id
        out = records.decide(s, c.id, "revoke_key", "reviewer", org_id)
        assert out.revoked_key == key_id
    with sessions.kw["bind"].connect() as conn:
        assert audit.verify(conn).ok
    sessions.kw["bind"].dispose()
