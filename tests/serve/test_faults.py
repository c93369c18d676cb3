"""Faults inside one server process: a model that fails mid-batch, a SQLite database held by another writer, the disk
filling while a file is written. (Faults across processes and hosts: test_fleet.py.)"""
import sqlite3
import threading
import time

import httpx
import pytest
import torch

from aigc.generate.text import SamplingParams, TextGenerator
from tests.serve.conftest import seed_billing
from tests.serve.helpers import db, start, tenant


def run_batch(engine, prompts, seeds):
    from aigc.serve.batching import Sequence

    done, got = threading.Event(), {}
    for i, (p, seed) in enumerate(zip(prompts, seeds)):
        def sink(delta, finish, i=i):
            if finish is not None:
                got[i] = finish
                if len(got) == len(prompts):
                    done.set()
        engine.submit(Sequence(p, 12, 0.0, 1.0, [], seed, sink))
    assert done.wait(60), "the engine did not finish"
    return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize("fault", ["one_sequence_raises", "out_of_memory_for_the_batch"])
def test_a_model_failing_mid_batch_fails_only_what_fails_alone(spread_model, fault):
    from aigc.serve.batching import TextEngine

    gen = TextGenerator.from_path(spread_model)
    prompts = [gen.encode("The "), gen.encode("A longer prompt, "), gen.encode("x"), gen.encode("Tea and ")]
    want = [gen.generate([p], SamplingParams(max_new_tokens=12, temperature=0.0))[0].text for p in prompts]
    engine = TextEngine(gen, max_batch=4, context=64)
    real = engine._sample
    calls = {"n": 0}

    def faulty(logits, seqs):
        calls["n"] += 1
        if fault == "one_sequence_raises" and any(s.seed == 666 for s in seqs) and calls["n"] > 6:
            raise RuntimeError("the model failed on this sequence")
        if fault == "out_of_memory_for_the_batch" and len(seqs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated): the batch does not fit")
        return real(logits, seqs)
    engine._sample = faulty
    seeds = [1, 666, 2, 3]
    try:
        got = run_batch(engine, prompts, seeds)
    finally:
        engine.close()
    for i, finish in enumerate(got):
        if fault == "one_sequence_raises" and seeds[i] == 666:
            assert finish.reason == "error" and "failed on this sequence" in finish.error
        else:
            assert finish.reason == "length" and finish.text == want[i], (i, finish)


@pytest.fixture()
def sqlite_server(tmp_path, text_model):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    settings = Settings(home=tmp_path / "home", db_busy_timeout_s=1.0, settle_retry_s=30)
    sessions = db(settings)
    seed_billing(sessions)
    live = start(settings, Registry.from_paths([], echo=["echo"]))
    live.sessions = sessions
    yield live
    live.stop()


def test_a_sqlite_database_held_by_another_writer_waits_within_a_bound_then_503(sqlite_server):
    live = sqlite_server
    org, key = tenant(live.sessions, "acme", "payg")
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "echo", "prompt": "hello there", "max_tokens": 4}
    assert httpx.post(live.url + "/v1/completions", json=body, headers=h, timeout=30).status_code == 200  # key cached
    other = sqlite3.connect(str(live.settings.home / "aigc.db"), isolation_level=None)  # the CLI, say
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE organizations SET name = name WHERE id = ?", (org,))
    try:
        t0 = time.monotonic()
        r = httpx.post(live.url + "/v1/completions", json=body, headers=h, timeout=30)
        waited = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable" and r.headers["retry-after"] == "2"
        assert 0.9 <= waited < 10, waited  # it waited for the lock, within the bound, and did not hang
        assert httpx.get(live.url + "/healthz", timeout=5).status_code == 200  # the event loop kept serving
    finally:
        other.execute("ROLLBACK")
        other.close()
    r = httpx.post(live.url + "/v1/completions", json=body, headers=h, timeout=30)
    assert r.status_code == 200
    with live.sessions() as s:
        from aigc.db.models import Organization, UsageRecord

        assert s.get(Organization, org).reserved == 0  # the refused request held nothing
        assert s.query(UsageRecord).filter(UsageRecord.org_id == org).count() == 2


def test_a_lock_released_before_the_bound_lets_the_request_through(sqlite_server):
    live = sqlite_server
    _, key = tenant(live.sessions, "beta", "payg")
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "echo", "prompt": "hello there", "max_tokens": 4}
    assert httpx.post(live.url + "/v1/completions", json=body, headers=h, timeout=30).status_code == 200
    other = sqlite3.connect(str(live.settings.home / "aigc.db"), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE plans SET name = name")
    threading.Timer(0.4, lambda: (other.execute("COMMIT"), other.close())).start()
    r = httpx.post(live.url + "/v1/completions", json=body, headers=h, timeout=30)
    assert r.status_code == 200, r.text


def test_the_disk_filling_while_images_are_written_fails_the_request_whole(server, monkeypatch):
    """The second of two images cannot be written (ENOSPC): a clear 507, nothing charged, no file of it left or served."""
    import errno
    import pathlib

    from aigc.db.models import Organization, UsageRecord

    org, key = tenant(server.sessions, "full-disk", "payg")
    folder = server.settings.home / "images"
    before = set(folder.glob("*")) if folder.exists() else set()
    real, written = pathlib.Path.write_bytes, []

    def filling(self, data):
        if self.parent == folder:
            written.append(self.name)
            if len(written) == 2:  # half the file, then the disk is full
                real(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)
    monkeypatch.setattr(pathlib.Path, "write_bytes", filling)
    r = httpx.post(server.url + "/v1/images/generations", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": "shapes", "prompt": "a large red circle in the center", "n": 2, "response_format": "url"})
    assert r.status_code == 507, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_storage" and "No space left on device" in err["message"]
    assert len(written) == 2 and set(folder.glob("*")) == before  # neither the first image nor the partial second
    with server.sessions() as s:
        assert s.get(Organization, org).reserved == 0
        rec = s.query(UsageRecord).filter(UsageRecord.org_id == org).one()
        assert rec.status == "error" and rec.images == 0 and rec.charged == 0
    monkeypatch.undo()
    r = httpx.post(server.url + "/v1/images/generations", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": "shapes", "prompt": "a large red circle in the center", "n": 1, "response_format": "url"})
    assert r.status_code == 200 and httpx.get(r.json()["data"][0]["url"], timeout=30).status_code == 200
