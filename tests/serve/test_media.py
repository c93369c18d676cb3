"""Music and video jobs through the API: create (202), poll, fetch signed files, metering per second."""
import base64

import httpx
import pytest
from sqlalchemy import select

from conftest import wait_for
from aigc.db import crud
from aigc.db.models import Generation, Job, Organization, UsageRecord
from tests.serve.helpers import db, start, tenant

PER_SECOND = 0.001  # USD per second of output


@pytest.fixture(scope="module")
def media_server(tmp_path_factory, image_model, music_model):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("mediahome"), admin_token="op", log_json=True)
    sessions = db(settings)
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        crud.create_plan(s, "prepaid", "prepaid")
        crud.set_price(s, "*", per_second=PER_SECOND)
    live = start(settings, Registry.from_paths([f"shapes={image_model}", f"chorales={music_model}"]))
    live.sessions = sessions
    yield live
    live.stop()


def H(key):
    return {"Authorization": f"Bearer {key}"}


def wait(server, key, job_id, timeout=180):
    def finished():
        r = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=H(key))
        assert r.status_code == 200, r.text
        return r.json() if r.json()["status"] in ("succeeded", "failed") else None
    return wait_for(finished, f"job {job_id} to finish", timeout=timeout, interval=0.1)


def test_music_job(media_server):
    from aigc.data.audio import read_wav

    org, key = tenant(media_server.sessions, "band", "payg")
    r = httpx.post(f"{media_server.url}/v1/audio/generations", headers=H(key),
                   json={"model": "chorales", "bars": 2, "key": "G major", "tempo": 120, "seed": 3})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running", "succeeded") and r.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait(media_server, key, job["id"])
    assert done["status"] == "succeeded", done["error"]
    files = {f["name"]: f for f in done["result"]["files"]}
    assert set(files) == {"music.wav", "music.mid"}
    wav = httpx.get(files["music.wav"]["url"]).content
    audio, rate = read_wav(wav)
    assert rate == 44100 and audio.shape[1] == 2
    seconds = done["result"]["seconds"]
    assert seconds == pytest.approx(audio.shape[0] / rate - 0.2, abs=0.05)  # the piece, plus the release tail
    assert media_server.service.governance.provenance.verify(wav).state == "Trusted"
    assert done["result"]["key"] == "7:major" and done["result"]["tempo"] == 120
    # metered per second of output, logged and audited like any generation
    with media_server.sessions() as s:
        usage = s.scalar(select(UsageRecord).where(UsageRecord.request_id == job["id"]))
        assert usage.seconds == pytest.approx(seconds) and usage.endpoint == "audio.generations"
        assert usage.list_price == round(seconds * PER_SECOND * 1e6)
        gen = s.get(Generation, job["id"])
        assert gen.kind == "audio" and gen.org_id == org
        assert s.get(Organization, org).reserved == 0  # the hold was released
    # another tenant cannot see it; a bad file URL signature is refused
    _, other = tenant(media_server.sessions, "other", "payg")
    assert httpx.get(f"{media_server.url}/v1/jobs/{job['id']}", headers=H(other)).status_code == 404
    assert httpx.get(files["music.wav"]["url"].replace("sig=", "sig=0")).status_code == 403
    listed = httpx.get(f"{media_server.url}/v1/jobs", headers=H(key)).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]


def test_music_primer_and_bad_requests(media_server, music_data):
    from aigc.data.music import load_prepared
    from aigc.generate.music import to_midi

    _, key = tenant(media_server.sessions, "primer", "payg")
    train, _, _ = load_prepared(music_data)
    primer = to_midi(train[0], 96)
    r = httpx.post(f"{media_server.url}/v1/audio/generations", headers=H(key),
                   json={"model": "chorales", "bars": 1, "primer": base64.b64encode(primer).decode(), "seed": 1})
    assert r.status_code == 202, r.text
    done = wait(media_server, key, r.json()["id"])
    assert done["status"] == "succeeded" and done["result"]["primer_bars"] >= 2
    for body, code in (({"model": "chorales", "key": "H major"}, 400), ({"model": "chorales", "primer": "%%%"}, 400),
                       ({"model": "chorales", "primer": base64.b64encode(b"not midi").decode()}, 400),
                       ({"model": "shapes"}, 400), ({"model": "nope"}, 404), ({"model": "chorales", "bars": 0}, 400)):
        res = httpx.post(f"{media_server.url}/v1/audio/generations", headers=H(key), json=body)
        assert res.status_code == code, (body, res.text)


def test_video_job(media_server):
    from aigc.generate.video import probe_mp4

    org, key = tenant(media_server.sessions, "studio", "payg")
    r = httpx.post(f"{media_server.url}/v1/videos/generations", headers=H(key),
                   json={"model": "shapes", "music_model": "chorales", "prompt": "a red circle; a blue square",
                         "seconds": 1, "fps": 6, "size": 256, "seed": 2})
    assert r.status_code == 202, r.text
    done = wait(media_server, key, r.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    files = {f["name"]: f for f in done["result"]["files"]}
    assert {"video.mp4", "storyboard.json", "soundtrack.wav", "soundtrack.mid", "keyframe-scene-01.png"} <= set(files)
    mp4 = httpx.get(files["video.mp4"]["url"]).content
    assert media_server.service.governance.provenance.verify(mp4).state == "Trusted"
    info = probe_mp4(mp4)
    assert info["video"]["frames"] == 6 and info["audio"]["codec"] == "aac"
    assert [s["text"] for s in done["result"]["scenes"]] == ["a red circle", "a blue square"]
    with media_server.sessions() as s:
        usage = s.scalar(select(UsageRecord).where(UsageRecord.request_id == done["id"]))
        assert usage.seconds == pytest.approx(1.0) and usage.model == "shapes"
        assert s.get(Generation, done["id"]).watermark_id == done["result"]["watermark_id"]
    # the frames' watermark id leads back to the generation (complaints and verification use it)
    res = httpx.post(f"{media_server.url}/v1/provenance/verify", headers=H(key),
                     json={"file": base64.b64encode(httpx.get(files["keyframe-scene-01.png"]["url"]).content).decode()})
    assert res.status_code == 200 and res.json()["image_watermark"]["generation"]["generation_id"] == done["id"], res.text
    res = httpx.post(f"{media_server.url}/v1/provenance/verify", headers=H(key), json={"file": base64.b64encode(mp4).decode()})
    assert res.json()["c2pa"]["state"] == "Trusted" and res.json()["exact_match"] is True


def test_prepaid_without_credit_is_refused_and_dead_servers_jobs_and_holds_are_released(media_server):
    import datetime as dt
    import subprocess
    import sys

    from aigc.db.models import Server, ServerHold

    org, key = tenant(media_server.sessions, "broke", "prepaid")
    r = httpx.post(f"{media_server.url}/v1/audio/generations", headers=H(key), json={"model": "chorales", "bars": 4})
    assert r.status_code == 402
    org, _ = tenant(media_server.sessions, "crashed", "payg")
    fleet = media_server.service.fleet
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    servers = {  # a dead process on this host, a live server on another host, one whose lease expired there
        "ab": Server(id=f"{fleet.host}:{gone}:x", host=fleet.host, pid=gone, heartbeat_at=now),
        "cd": Server(id="another-host:1:y", host="another-host", pid=1, heartbeat_at=now),
        "ef": Server(id="another-host:2:z", host="another-host", pid=2, heartbeat_at=now - dt.timedelta(seconds=fleet.lease_s + 5)),
    }
    with media_server.sessions.begin() as s:
        for i, (tag, server) in enumerate(servers.items()):
            s.add(server)
            s.add(Job(id="job_" + tag * 12, org_id=org, kind="audio", model="chorales", model_version="v", status="running",
                      params={}, held=5000, owner=server.id))
            s.add(ServerHold(id=10 * i + 1, server_id=server.id, org_id=org, amount=300))  # its requests in flight
            s.add(ServerHold(id=10 * i + 2, server_id=server.id, org_id=org, amount=400))
        s.add(Job(id="job_" + "gh" * 12, org_id=org, kind="audio", model="chorales", model_version="v", status="queued",
                  params={}, held=5000, owner="old-host:123"))  # an owner no server row names (an older server)
        s.get(Organization, org).reserved = 4 * 5000 + 3 * 700
    done = fleet.sweep()
    assert sorted(done["servers"]) == sorted([servers["ab"].id, servers["ef"].id]) and done["jobs"] == 3
    assert done["released"] == {org: 1400}
    with media_server.sessions() as s:
        status = {t: s.get(Job, "job_" + t * 12).status for t in ("ab", "cd", "ef", "gh")}
        assert status == {"ab": "failed", "cd": "running", "ef": "failed", "gh": "failed"}
        assert "stopped" in s.get(Job, "job_" + "ab" * 12).error
        assert s.get(Organization, org).reserved == 5000 + 700  # the live server's job and request keep theirs
        assert {x.id for x in s.query(Server)} >= {servers["cd"].id, fleet.id}
    assert fleet.sweep() == {"servers": [], "released": {}, "jobs": 0, "fine_tunes": 0}  # each released once


def test_sniff_recognises_audio_and_video():
    """Verification (CLI and route) tells WAV and MP4 apart from images."""
    from aigc.govern.c2pa import sniff_mime

    assert sniff_mime(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "audio/wav"
    assert sniff_mime(b"\x00\x00\x00\x18ftypisom" + bytes(8)) == "video/mp4"
