"""Music and video generation as asynchronous jobs, metered per second of output.

- ``POST /v1/audio/generations``: a music model composes; the job's result is a MIDI file and a
  C2PA-signed 44.1 kHz WAV.
- ``POST /v1/videos/generations``: an image model (``model``) renders the scenes, a text model
  (``text_model``, optional) writes the storyboard, a music model (``music_model``, optional) scores
  it; the result is a C2PA-signed MP4 (H.264 + AAC) with watermarked frames, plus every intermediate.
- ``GET /v1/jobs/{id}`` polls a job (its tenant only); ``GET /v1/jobs`` lists the tenant's recent jobs.
- ``GET /v1/media/{job}/{name}`` serves a result file behind a signed, expiring URL.

Both POSTs answer 202 with the job; prompts (and the storyboard the text model writes) pass the
tenant's moderation policy; the hold covers the requested duration and the charge is the duration
actually delivered.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from aigc.data import store
from aigc.db import crud
from aigc.db.crud import Units
from aigc.db.models import Job
from aigc.errors import UserError
from aigc.govern import delivery
from aigc.run import IMAGE, MUSIC, TEXT
from aigc.serve.deps import READ_USAGE, Generator, ServiceDep, model_for, role
from aigc.serve.errors import ApiError
from aigc.serve.jobs import Outcome
from aigc.serve.lifecycle import Generation
from aigc.serve.schemas import Job as JobOut
from aigc.serve.schemas import ListOf

router = APIRouter(tags=["media"])

MIME = {".wav": "audio/wav", ".mid": "audio/midi", ".mp4": "video/mp4", ".png": "image/png", ".json": "application/json"}


class MusicRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field("", max_length=4000, description="A description kept with the job (the model is conditioned on the controls).")
    bars: int = Field(8, ge=1, le=256)
    seconds: float = Field(0.0, ge=0, le=600, description="> 0: enough bars for this duration (overrides bars).")
    key: str | None = Field(None, max_length=20)
    tempo: int | None = Field(None, ge=20, le=300)
    time_signature: str | None = Field(None, max_length=5)
    primer: str | None = Field(None, max_length=2_000_000, description="A MIDI file to continue, base64.")
    temperature: float = Field(0.9, ge=0, le=5)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    user: str | None = Field(None, max_length=256)


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200, description="The image model that renders the frames.")
    prompt: str = Field("", max_length=4000)
    text_model: str | None = Field(None, max_length=200)
    music_model: str | None = Field(None, max_length=200)
    scenes: int = Field(3, ge=1, le=16)
    scene_texts: list[str] = Field(default_factory=list, max_length=16)
    seconds: float = Field(6.0, ge=0.5, le=120)
    fps: int = Field(12, ge=1, le=30)
    size: int = Field(256, ge=64, le=512)
    captions: bool = False
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0, le=50)
    key: str | None = Field(None, max_length=20)
    tempo: int | None = Field(None, ge=20, le=300)
    chroma: Literal["420", "444"] = "420"
    voice: str | None = Field(None, max_length=100, description="A voice-over of the scene lines with this voice "
                                                                "(GET /v1/audio/voices, or auto); none when absent.")
    voice_speed: float = Field(1.0, ge=0.25, le=4.0)
    user: str | None = Field(None, max_length=256)


def sign(secret: bytes, job: str, name: str, expires: int) -> str:
    return hmac.new(secret, f"media:{job}/{name}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]


def _job_json(job: Job, service, base: str) -> dict:
    out = {"id": job.id, "object": "generation.job", "kind": job.kind, "model": job.model, "status": job.status,
           "created_at": int(job.created_at.timestamp()) if job.created_at else None,
           "started_at": int(job.started_at.timestamp()) if job.started_at else None,
           "finished_at": int(job.finished_at.timestamp()) if job.finished_at else None, "error": job.error}
    result = job.result if not isinstance(job.result, str) else json.loads(job.result)
    if result:
        expires = int(time.time()) + service.settings.image_url_ttl_s
        files = []
        for f in result.get("files", []):
            sig = sign(service.url_secret, job.id, f["name"], expires)
            files.append({**f, "url": f"{base}/v1/media/{job.id}/{f['name']}?expires={expires}&sig={sig}"})
        out["result"] = {**result, "files": files}
    return out


def _music_meta(entry):
    from aigc.run import MusicMeta

    return MusicMeta.load(entry.path)


def _save(folder: Path, name: str, data: bytes) -> dict:
    return _entry(store.write_bytes(folder / name, data))


def _entry(path: Path) -> dict:
    """A result file as the job reports it (served from the job's folder by name)."""
    data = path.read_bytes()
    return {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "mime": MIME.get(path.suffix, "application/octet-stream")}


async def _create(service, p, request: Request, kind: str, entry, body, prompt: str, estimate_s: float, work_factory) -> JSONResponse:
    """The lifecycle's first stages on the request; the job's worker renders, delivers, records and settles."""
    gen = Generation.admit(service, request, p, entry, f"{kind}.generations", kind)
    await gen.moderate(prompt)
    headers = await gen.limit()
    hold = await gen.hold(Units(seconds=estimate_s))
    job_id = "job_" + secrets.token_hex(12)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    params = {**body.model_dump(exclude={"primer", "user"}), "seed": seed,
              "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()}
    params.pop("prompt", None)
    if getattr(body, "primer", None):
        params["primer_sha256"] = hashlib.sha256(body.primer.encode()).hexdigest()
    base = service.base_url(request)

    def create(s):
        job = crud.create_job(s, server=hold.server, hold_id=hold.hold_id, id=job_id, org_id=p.org_id, key_id=p.key_id or None, kind=kind,
                              model=entry.id, model_version=entry.version, owner=service.jobs.owner, params=params, held=hold.amount)
        return _job_json(job, service, base)
    try:
        payload = await service.db(create)
    except BaseException:
        await gen.settle("error", Units(), 0.0)  # no job: the hold goes back at once
        raise
    hold.server = None  # the job's row carries the hold now
    service.jobs.submit(job_id, gen, work_factory(gen, job_id, seed, params))
    return JSONResponse(payload, status_code=202, headers={**headers, "location": f"/v1/jobs/{job_id}"})


@router.post("/v1/audio/generations", status_code=202, response_model=JobOut)
async def create_music(body: MusicRequest, request: Request, service: ServiceDep, p: Generator):
    """Compose music as a job: the result is a MIDI file and a C2PA-signed 44.1 kHz WAV; poll GET /v1/jobs/{id}."""
    from aigc.data.music import TIME_SIGNATURES, bar_ticks, parse_key, ticks_to_seconds

    entry = model_for(service, p, body.model, (MUSIC,))
    try:
        if body.key:
            parse_key(body.key)
        if body.time_signature and body.time_signature not in TIME_SIGNATURES:
            raise UserError(f"time_signature must be one of {', '.join(TIME_SIGNATURES)}")
        primer = base64.b64decode(body.primer, validate=True) if body.primer else None
    except (UserError, ValueError) as exc:
        raise ApiError(400, str(exc) if isinstance(exc, UserError) else "primer: not valid base64", code="invalid_request_error") from None
    meta = _music_meta(entry)
    tempo = body.tempo or meta.tempo
    bar_s = ticks_to_seconds(bar_ticks(body.time_signature or meta.time_signature), tempo)
    estimate = body.seconds or body.bars * bar_s
    primer_piece = None
    if primer is not None:
        from aigc.data.music import piece_from_midi

        try:
            primer_piece = piece_from_midi(primer)
        except ValueError as exc:
            raise ApiError(400, f"primer: {exc}", code="invalid_request_error", param="primer") from None
        estimate += primer_piece.seconds(tempo)

    def factory(gen: Generation, job_id: str, seed: int, params: dict):
        def work() -> Outcome:
            from aigc.generate.music import MusicParams, render_wav

            t0 = time.perf_counter()
            handle = service.registry.acquire(entry.id)
            mp = MusicParams(bars=body.bars, seconds=body.seconds, key=body.key, tempo=body.tempo, time_signature=body.time_signature,
                             temperature=body.temperature, top_p=body.top_p, seed=seed)
            mp.primer = primer_piece
            with handle.lock:
                result = handle.pipeline.generate(mp)
            midi = result.midi_bytes()
            wav, synth = render_wav(result.piece, result.tempo, result.program, "auto")
            done, withheld = gen.deliver_file(wav, delivery.WAV, f"{job_id}.wav",
                                              {"generation_id": job_id, "midi_sha256": hashlib.sha256(midi).hexdigest()})
            if withheld:
                raise UserError("the output was withheld: it matches content taken down")
            folder = service.settings.home / "media" / job_id
            files = [_save(folder, "music.wav", done.data), _save(folder, "music.mid", midi)]
            seconds = round(result.seconds, 3)
            rec = gen.record(job_id, params=params, output_sha256=done.sha256, filters=gen.filters(*done.filters),
                             prompt=body.prompt, watermark_id=done.watermark_id)
            return Outcome(Units(seconds=seconds), [rec], {"seconds": seconds, "generation_id": job_id, "files": files,
                                                           "watermark_id": done.watermark_id,
                                                           "key": f"{result.piece.tonic}:{result.piece.mode}", "tempo": result.tempo,
                                                           "time_signature": result.piece.time_signature, "notes": len(result.piece.notes),
                                                           "primer_bars": result.primer_bars, "synth": synth},
                           time.perf_counter() - t0)
        return work

    return await _create(service, p, request, "audio", entry, body, body.prompt, estimate, factory)


@router.post("/v1/videos/generations", status_code=202, response_model=JobOut)
async def create_video(body: VideoRequest, request: Request, service: ServiceDep, p: Generator):
    """Compose a video as a job: storyboard, key frames, soundtrack, a C2PA-signed MP4; poll GET /v1/jobs/{id}."""
    entry = model_for(service, p, body.model, (IMAGE,))
    text_entry = model_for(service, p, body.text_model, (TEXT,)) if body.text_model else None
    music_entry = model_for(service, p, body.music_model, (MUSIC,)) if body.music_model else None
    if not body.prompt and not body.scene_texts:
        raise ApiError(400, "give a prompt or scene_texts", code="invalid_request_error", param="prompt")
    for t in body.scene_texts:
        if len(t) > 500:
            raise ApiError(400, "each scene text is at most 500 characters", code="invalid_request_error", param="scene_texts")
    prompt = "\n".join([body.prompt, *body.scene_texts]).strip()

    def factory(gen: Generation, job_id: str, seed: int, params: dict):
        def work() -> Outcome:
            from aigc.generate.video import VideoParams, compose, write_storyboard

            t0 = time.perf_counter()
            scenes = list(body.scene_texts)
            if not scenes:
                scenes = write_storyboard(body.prompt, body.scenes, text_entry.path if text_entry else None, seed)
                for line in scenes:  # what the text model wrote is output: it passes the output policy
                    if gen.check_chunk(line).blocked:
                        raise UserError("the storyboard the text model wrote was refused by the content policy")
            vp = VideoParams(prompt=body.prompt, scenes=len(scenes), scene_texts=scenes, seconds=body.seconds, fps=body.fps,
                             size=body.size, captions=body.captions, seed=seed, steps=body.steps, guidance=body.guidance,
                             key=body.key, tempo=body.tempo, watermark=gen.policy["watermark_image"], chroma=body.chroma,
                             voice=body.voice or "", voice_speed=body.voice_speed)
            folder = service.settings.home / "media" / job_id
            result = compose(entry.path, folder, vp, music_run=music_entry.path if music_entry else None, overwrite=True,
                             audio_key=service.governance.audio_secret if gen.policy["watermark_audio"] else None,
                             voices_dir=service.settings.voices_dir)
            done, withheld = gen.deliver_file(result.mp4, delivery.MP4, f"{job_id}.mp4",
                                              {"generation_id": job_id, "text_model": body.text_model or "",
                                               "music_model": body.music_model or ""}, watermark_id=result.watermark_id,
                                              audio_marked=result.audio_marked)
            if withheld:
                raise UserError("the output was withheld: it matches content taken down")
            files = [_save(folder, "video.mp4", done.data)]
            for name in ("storyboard.json", "params.json", "soundtrack.wav", "soundtrack.mid", "voiceover.wav"):
                if (folder / name).is_file():
                    files.append(_entry(folder / name))
            for png in sorted((folder / "keyframes").glob("*.png")):  # served by name from the job's folder
                files.append(_save(folder, f"keyframe-{png.stem}.png", png.read_bytes()))
            seconds = round(result.seconds, 3)
            rec = gen.record(job_id, params=params, output_sha256=done.sha256, watermark_id=done.watermark_id,
                             filters=gen.filters(*done.filters), prompt=prompt)
            return Outcome(Units(seconds=seconds), [rec],
                           {"seconds": seconds, "frames": result.frames, "fps": body.fps, "size": body.size, "audio": result.audio,
                            "generation_id": job_id, "watermark_id": result.watermark_id, "files": files,
                            "scenes": [{"text": s.text, "condition": s.condition, "reason": s.reason} for s in result.storyboard]},
                           time.perf_counter() - t0)
        return work

    return await _create(service, p, request, "video", entry, body, prompt, body.seconds, factory)


JobReader = role(READ_USAGE, "read jobs")


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, request: Request, service: ServiceDep, p: JobReader):
    """One job of this tenant, with signed URLs of its result files once it has succeeded."""
    base = service.base_url(request)
    return await service.db(lambda s: _job_json(crud.get_job(s, job_id, p.org_id), service, base), write=False)


@router.get("/v1/jobs", response_model=ListOf[JobOut])
async def list_jobs(request: Request, service: ServiceDep, p: JobReader, limit: int = Query(20, ge=1, le=100)):
    """This tenant's most recent jobs, newest first."""
    base = service.base_url(request)
    return {"object": "list", "data": await service.db(lambda s: [_job_json(j, service, base) for j in crud.list_jobs(s, p.org_id, limit)],
                                                       write=False)}


@router.get("/v1/media/{job_id}/{name}", response_class=Response,
            responses={200: {"content": {m: {"schema": {"type": "object" if m == "application/json" else "string"}}
                                          for m in MIME.values()}, "description": "The file"}})
async def media_file(job_id: str, name: str, service: ServiceDep, expires: int = Query(..., ge=0, le=2**40),
                     sig: str = Query(..., max_length=64)):
    """A job's result file behind a signed URL (no key needed, like image URLs)."""
    if (not re.fullmatch(r"job_[0-9a-f]{24}", job_id) or not re.fullmatch(r"[A-Za-z0-9_\-]+\.(wav|mid|mp4|png|json)", name)
            or not hmac.compare_digest(sign(service.url_secret, job_id, name, expires), sig)):
        raise ApiError(403, "invalid media URL signature", code="invalid_signature")
    if expires < time.time():
        raise ApiError(403, "this media URL has expired", code="url_expired")
    path = service.settings.home / "media" / job_id / name
    if not path.is_file():
        raise ApiError(404, "file not found", code="not_found")
    return Response(path.read_bytes(), media_type=MIME.get(path.suffix, "application/octet-stream"))
