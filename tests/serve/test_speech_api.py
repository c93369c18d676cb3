"""POST /v1/audio/speech and GET /v1/audio/voices through a live server and the official openai client: the audio
comes back watermarked and signed, is logged and charged per character, and bad requests get clear errors."""
import base64

import httpx
import openai
import pytest
from sqlalchemy import select

from aigc.data import audio as aio
from aigc.db import crud
from aigc.db.models import Generation, Organization, UsageRecord
from tests.serve.helpers import db, start, tenant
from tests.test_speech import need_espeak

PER_1K_CHARS = 0.015  # USD, as OpenAI's tts-1


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory):
    from aigc.serve.registry import Registry
    from aigc.settings import Settings

    need_espeak()
    settings = Settings(home=tmp_path_factory.mktemp("speechhome"), admin_token="op", log_json=True)
    sessions = db(settings)
    with sessions.begin() as s:
        crud.create_plan(s, "payg", "payg")
        crud.set_price(s, "*", per_1k_chars=PER_1K_CHARS)
    live = start(settings, Registry.from_paths([], echo=["echo"], speech=True))
    live.sessions = sessions
    yield live
    live.stop()


def H(key):
    return {"Authorization": f"Bearer {key}"}


def test_the_openai_client_gets_watermarked_signed_audio_charged_per_character(speech_server):
    org, key = tenant(speech_server.sessions, "voiceco", "payg")
    client = openai.OpenAI(base_url=speech_server.url + "/v1", api_key=key, max_retries=0, timeout=120)
    assert "tts-1" in [m.id for m in client.models.list().data]
    text = "Our autumn collection brings warm colours, soft wool and simple lines to every room."
    raw = client.audio.speech.with_raw_response.create(model="tts-1", voice="espeak-en", input=text, response_format="wav")
    data, headers = raw.content, raw.headers
    audio, rate = aio.read_wav(data)
    assert rate == 22050 and len(audio) / rate == pytest.approx(float(headers["x-audio-seconds"]), abs=0.01)
    assert len(audio) / rate > 2
    gov = speech_server.service.governance
    assert gov.provenance.verify(data).state == "Trusted"
    mp3 = aio.encode(audio, rate, "mp3")  # re-encoded by someone else: the signature is gone, the mark is not
    r = httpx.post(speech_server.url + "/v1/provenance/verify", headers=H(key), json={"file": base64.b64encode(mp3).decode()})
    mark = r.json()["audio_watermark"]
    assert r.status_code == 200 and mark["found"] and str(mark["watermark_id"]) == headers["x-watermark-id"]
    assert mark["generation"]["generation_id"] == headers["x-generation-id"]
    with speech_server.sessions() as s:
        usage = s.scalar(select(UsageRecord).where(UsageRecord.request_id == headers["x-generation-id"]))
        assert usage.characters == len(text) and usage.endpoint == "audio.speech"
        assert usage.list_price == round(len(text) * PER_1K_CHARS / 1000 * 1e6)
        gen = s.get(Generation, headers["x-generation-id"])
        assert gen.kind == "audio" and gen.watermark_id == int(headers["x-watermark-id"]) and "watermark:audio:stdm" in gen.filters
        assert s.get(Organization, org).reserved == 0
    # MP3, the default format, and an OpenAI voice name
    mp3_reply = client.audio.speech.create(model="tts-1", voice="alloy", input="Lesson four, part two.")
    assert aio.decode(mp3_reply.content)[1] > 0 and mp3_reply.content[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")


def test_voices_and_bad_requests(speech_server):
    _, key = tenant(speech_server.sessions, "voiceco2", "payg")
    voices = httpx.get(speech_server.url + "/v1/audio/voices", headers=H(key)).json()["data"]
    assert {"espeak-en", "espeak-zh"} <= {v["id"] for v in voices}
    post = lambda **body: httpx.post(speech_server.url + "/v1/audio/speech", headers=H(key), timeout=60,
                                     json={"model": "tts-1", "voice": "auto", "input": "hello there", **body})
    for body, param in (({"voice": "nobody"}, "voice"), ({"response_format": "opus"}, "response_format"),
                        ({"speed": 9}, "speed"), ({"input": ""}, "input"), ({"model": "echo"}, "model"),
                        ({"instructions": "cheerful"}, "instructions")):
        r = post(**body)
        assert r.status_code in (400, 404, 422), (body, r.text)
        assert r.json()["error"]["message"], body
    r = post(input="I will kill you")
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"
    with speech_server.sessions() as s:  # nothing refused was charged
        assert s.scalar(select(UsageRecord).where(UsageRecord.endpoint == "audio.speech",
                                                  UsageRecord.status != "ok")) is None
