"""POST /v1/audio/speech in OpenAI's shape (model, input, voice, response_format, speed): the audio itself in the
body, and GET /v1/audio/voices, the voices installed.

The input passes the tenant's input policy like a prompt; the audio is spoken by a local voice
(``generate.speech``: Piper when installed, eSpeak NG always), marked with the inaudible audio watermark, encoded
and C2PA-signed as the tenant's policy says (``govern.delivery``), logged as a generation with its audit entry and
charged per character (the price's ``per_1k_chars``) before it leaves."""
from __future__ import annotations

import hashlib
import time
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from aigc.data.audio import write_wav
from aigc.db.crud import Units
from aigc.errors import UserError
from aigc.generate.speech import MAX_CHARS, choose
from aigc.govern import delivery
from aigc.serve.deps import Generator, ServiceDep, model_for
from aigc.serve.errors import ApiError
from aigc.serve.lifecycle import Generation, engine_for
from aigc.serve.registry import SPEECH

router = APIRouter(tags=["audio"])
MIME = {"mp3": delivery.MP3, "wav": delivery.WAV, "flac": delivery.FLAC}
UNSUPPORTED = ("opus", "aac", "pcm")


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    input: str = Field(min_length=1, max_length=MAX_CHARS)
    voice: str = Field(min_length=1, max_length=100, description="A voice of GET /v1/audio/voices, an OpenAI voice name "
                                                                 "(the default voice for the text's language), or auto.")
    response_format: Literal["mp3", "wav", "flac", "opus", "aac", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = Field(None, max_length=4096)
    stream_format: Literal["audio"] | None = None


@router.get("/v1/audio/voices")
async def list_voices(service: ServiceDep, p: Generator) -> dict:
    """The installed voices of the speech model (id, engine, language, sample rate, licence)."""
    entry = model_for(service, p, next((e.id for e in service.registry.entries.values() if e.kind == SPEECH), "tts-1"), (SPEECH,))
    speaker = await engine_for(service, entry)
    return {"object": "list", "model": entry.id, "data": [v.to_dict() for v in speaker.available]}


@router.post("/v1/audio/speech", response_class=Response,
             responses={200: {"content": {m: {} for m in MIME.values()}, "description": "The spoken audio."}})
async def create_speech(body: SpeechRequest, request: Request, service: ServiceDep, p: Generator):
    """Speak ``input`` with ``voice``: the audio file (MP3 by default, WAV or FLAC), watermarked and signed."""
    entry = model_for(service, p, body.model, (SPEECH,))
    if body.response_format in UNSUPPORTED:
        raise ApiError(400, f"response_format {body.response_format!r} is not available here: use mp3, wav or flac",
                       code="invalid_value", param="response_format")
    if body.instructions:
        raise ApiError(400, "instructions (a voice's style) are not supported by the local voices: leave them out",
                       code="invalid_value", param="instructions")
    gen = Generation.admit(service, request, p, entry, "audio.speech", "audio")
    text = await gen.moderate(body.input, "input")
    headers = await gen.limit()
    speaker = await engine_for(service, entry)
    try:
        voice = choose(body.voice, text, speaker.available)
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_value", param="voice") from None
    await gen.hold(Units(characters=len(text)))
    rid, mime = gen.request_id, MIME[body.response_format]
    params = {"model": entry.id, "voice": voice.name, "engine": voice.engine, "speed": body.speed,
              "response_format": body.response_format, "input_sha256": hashlib.sha256(text.encode()).hexdigest()}

    def render():
        t0 = time.perf_counter()
        audio, rate, _ = speaker.speak(text, voice.name, body.speed)
        done, withheld = gen.deliver_file(write_wav(audio, rate), mime, f"{rid}{delivery.SUFFIX[mime]}",
                                          {"generation_id": rid, "voice": voice.name})
        return done, withheld, len(audio) / rate, time.perf_counter() - t0

    status, compute, records, done = "error", 0.0, [], None
    try:
        done, withheld, seconds, compute = await anyio.to_thread.run_sync(render)
        records = [gen.record(rid, params=params, output_sha256=done.sha256, watermark_id=done.watermark_id,
                              filters=gen.filters(*done.filters), status="blocked" if withheld else "delivered")]
        if withheld:
            raise ApiError(400, "the output was withheld: it matches content taken down", code="content_policy_violation")
        status = "ok"
    except UserError as exc:
        raise ApiError(400, str(exc), code="invalid_value", param="input") from None
    finally:
        await gen.settle(status, Units(characters=len(text) if status == "ok" else 0), compute, records)
    return Response(done.data, media_type=mime, headers={**headers, "x-generation-id": rid, "x-voice": voice.name,
                                                          "x-audio-seconds": f"{seconds:.3f}",
                                                          **({"x-watermark-id": str(done.watermark_id)}
                                                             if done.watermark_id is not None else {})})
