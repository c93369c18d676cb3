"""The generation log's uses: verification, complaints and takedowns, explanations, retention and re-keying.

Plain functions over a SQLAlchemy session, shared by the API (serve/routes/governance.py) and the CLI.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from aigc.db import crud
from aigc.db.models import AuditEntry, BlockedOutput, Complaint, Generation, Organization, utcnow
from aigc.errors import NotFound, UserError
from aigc.db import audit
from aigc.data.audio import NO_AUDIO
from aigc.govern import audio_watermark, c2pa, image_watermark, text_watermark
from aigc.govern.crypto import KeyRing
from aigc.govern.moderation import Policy

DECISIONS = ("dismiss", "takedown", "revoke_key")
MAX_FILE_BYTES = 32 * 2**20


# ---------------------------------------------------------------- tenant policy

DEFAULT_POLICY = {
    "watermark_text": True,  # green-list watermark on generated text
    "watermark_image": True,  # invisible payload in images of 256x256 and more
    "watermark_audio": True,  # inaudible payload in audio of a few seconds and more (music, speech, soundtracks)
    "c2pa": True,  # signed C2PA manifest on every file
    "png_parameters": True,  # generation parameters in PNG text metadata ("parameters" convention)
    "store_content": True,  # keep prompts and outputs (PII-scrubbed, encrypted) for explanations and complaints
    "pii": "mask",  # scrubbing of stored prompts/outputs: mask | hash | drop (drop the spans)
    "retention_days": 30,  # stored prompts/outputs are purged after this many days (metadata and hashes stay)
}
_TYPES = {k: type(v) for k, v in DEFAULT_POLICY.items()}


def validate_policy(changes: dict) -> dict:
    out = {}
    for k, v in changes.items():
        if k not in DEFAULT_POLICY:
            raise UserError(f"unknown policy setting {k!r}: known settings are {', '.join(DEFAULT_POLICY)}")
        want = _TYPES[k]
        if want is bool and isinstance(v, str):
            if v.lower() not in ("true", "false", "on", "off", "1", "0", "yes", "no"):
                raise UserError(f"policy {k} must be true or false, got {v!r}")
            v = v.lower() in ("true", "on", "1", "yes")
        elif want is int and isinstance(v, str):
            if not v.strip().isdigit():
                raise UserError(f"policy {k} must be a whole number of days, got {v!r}")
            v = int(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise UserError(f"policy {k} must be a {want.__name__}, got {v!r}")
        if k == "pii" and v not in ("mask", "hash", "drop"):
            raise UserError("policy pii must be mask, hash or drop")
        if k == "retention_days" and v < 1:
            raise UserError("policy retention_days must be >= 1")
        out[k] = v
    return out


def set_policy(s, org_id: int, changes: dict, moderation: str | None) -> Organization:
    """Validate and store a tenant's policy changes and/or moderation rules (audited). Shared with the CLI."""
    org = crud.get_org(s, org_id)
    valid = validate_policy(changes)
    if valid:
        org.policy = {**(org.policy or {}), **valid}
    if moderation is not None:
        if moderation.strip():
            Policy.from_yaml(moderation, "the moderation policy")  # refuse a broken policy before storing it
        org.moderation = moderation or None
    s.flush()
    crud.announce(s, "policy", org.id)
    audit.append_session(s, "admin.policy.set", crud.ACTOR.get(), org.id, f"org:{org.id}",
                         {"changes": valid, "moderation_sha256": hashlib.sha256(moderation.encode()).hexdigest()
                          if moderation is not None else None})
    return org


def decode_b64(data: str, what: str = "file") -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} must be base64-encoded bytes") from None
    if len(raw) > MAX_FILE_BYTES:
        raise UserError(f"{what} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    if not raw:
        raise UserError(f"{what} is empty")
    return raw


# ---------------------------------------------------------------- verification


def check_image_mark(data: bytes) -> dict:
    """The invisible watermark of an image file: {found, watermark_id, ...} or why none could be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return {"found": False, "reason": f"not a readable image ({exc.__class__.__name__}: {exc})"}
    if min(img.size) < image_watermark.MIN_SIDE:
        return {"found": False, "reason": f"images under {image_watermark.MIN_SIDE}x{image_watermark.MIN_SIDE} carry no watermark"}
    out = image_watermark.extract(img).to_dict()
    if not out["found"]:
        out["reason"] = "no watermark payload (not generated here, or altered beyond what error correction can repair)"
    return out


def audio_kind(data: bytes) -> str | None:
    """The MIME type of an audio file (or of an MP4, whose soundtrack may carry the mark), else None."""
    mime = c2pa.sniff_mime(data)
    if mime in ("audio/wav", "audio/flac", "audio/mpeg"):
        return mime
    if mime == "video/mp4":
        return "audio/mp4" if data[8:12] in (b"M4A ", b"M4B ") else mime
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0:  # an ADTS frame: AAC
        return "audio/aac"
    return None


def check_audio_mark(data: bytes, key: bytes | None) -> dict:
    """The inaudible watermark of an audio file (or an MP4's soundtrack): {found, watermark_id, ...} or why none could
    be read. ``key``: the audio-watermark secret of the home that made it."""
    from aigc.data.audio import decode

    if key is None:
        return {"found": False, "reason": "no audio-watermark key here: verify with the home (AIGC_HOME) that generated it"}
    try:
        audio, rate = decode(data)
    except UserError as exc:
        return {"found": False, "reason": str(exc)}
    if len(audio) / rate < audio_watermark.MIN_SECONDS:
        return {"found": False, "reason": f"audio under {audio_watermark.MIN_SECONDS:.1f} s carries no watermark"}
    out = audio_watermark.extract(audio, rate, key).to_dict()
    if not out["found"]:
        out["reason"] = "no watermark payload (not generated here, or altered beyond what error correction can repair)"
    return out


def resolve_watermark(s: Session, wm_id: int, org_id: int | None, operator: bool) -> dict | None:
    """The generation behind a watermark id (image or audio), shown to its owner (or the operator) only."""
    gen = s.scalar(select(Generation).where(Generation.watermark_id == wm_id).order_by(Generation.created_at.desc()))
    if gen is None:
        return {"known": False}
    if not operator and gen.org_id != org_id:
        return {"known": True, "owner": False}
    org = s.get(Organization, gen.org_id)
    return {"known": True, "owner": True, "generation_id": gen.id, "request_id": gen.request_id,
            "organization": org.name if org else gen.org_id, "model": gen.model, "model_version": gen.model_version,
            "created_at": gen.created_at.isoformat() + "Z", "status": gen.status}


def _first_frame_png(data: bytes) -> bytes | None:
    """A video's first frame as PNG bytes (its frames carry the image watermark), or None if unreadable."""
    import io

    try:
        from aigc.govern.delivery import first_frame

        buf = io.BytesIO()
        first_frame(data).save(buf, format="PNG")
        return buf.getvalue()
    except Exception:  # a damaged or non-video file: the C2PA verdict already says what is wrong
        return None


def verify_file(data: bytes, trust_anchors: str, s: Session | None = None, org_id: int | None = None,
                operator: bool = False, audio_key: bytes | None = None) -> dict:
    """What a file says of its origin: its C2PA manifest, its image watermark (images, a video's frames) and its audio
    watermark (audio files of any format, a video's soundtrack; ``audio_key``: the home's audio-watermark secret)."""
    mime = c2pa.sniff_mime(data)
    sound = audio_kind(data)
    out: dict = {"kind": mime or sound or "unknown", "sha256": hashlib.sha256(data).hexdigest(),
                 "c2pa": c2pa.verify(data, mime, trust_anchors).to_dict()}
    frame = _first_frame_png(data) if mime == "video/mp4" and sound != "audio/mp4" else None
    if mime in ("image/png", "image/jpeg") or (mime is None and sound is None) or frame is not None:
        mark = check_image_mark(frame or data)
        if mark.get("found") and s is not None:
            mark["generation"] = resolve_watermark(s, mark["watermark_id"], org_id, operator)
        out["image_watermark"] = mark
    if sound is not None:
        mark = check_audio_mark(data, audio_key)
        if mark.get("found") and s is not None:
            mark["generation"] = resolve_watermark(s, mark["watermark_id"], org_id, operator)
        if not (sound == "video/mp4" and mark.get("reason") == NO_AUDIO):  # a silent video: nothing to say of its sound
            out["audio_watermark"] = mark
    if s is not None:
        gen = s.scalar(select(Generation).where(Generation.output_sha256 == out["sha256"]))
        out["exact_match"] = bool(gen) and (operator or gen.org_id == org_id)
    return out


def verify_text(content: str, candidates: list[tuple[str, object, int]], threshold: float = text_watermark.Z_THRESHOLD) -> dict:
    """candidates: (model id, tokenizer, key). Reports the strongest evidence over them (and each one)."""
    if not content.strip():
        raise UserError("the text to verify is empty")
    if not candidates:
        return {"detected": False, "reason": "no text model to score with (give --model / model)"}
    per = []
    for model, tok, key in candidates:
        d = text_watermark.detect_text(content, tok, key, threshold=threshold)
        per.append({"model": model, **d.to_dict()})
    best = max(per, key=lambda r: r["z"])
    out = {"detected": best["detected"], "z": best["z"], "threshold": threshold, "model": best["model"],
           "scored_tokens": best["scored"], "per_model": per}
    if best["scored"] < 25:
        out["note"] = f"only {best['scored']} tokens could be scored: short texts cannot carry strong evidence"
    return out


# ---------------------------------------------------------------- complaints and takedowns


def find_generation(s: Session, generation_id: str | None = None, digest: str | None = None,
                    data: bytes | None = None, audio_key: bytes | None = None) -> tuple[Generation | None, dict]:
    """Identify the generation a piece of evidence points at: by id, by exact output hash, else by its watermark
    (image, or audio with the home's ``audio_key``)."""
    if generation_id:
        gen = s.get(Generation, generation_id)
        return gen, {"by": "generation_id", "generation_id": generation_id, "matched": gen is not None}
    if digest:
        gen = s.scalar(select(Generation).where(Generation.output_sha256 == digest))
        if gen is not None:
            return gen, {"by": "sha256", "sha256": digest, "matched": True}
    if data is not None and c2pa.sniff_mime(data) in ("image/png", "image/jpeg"):
        mark = check_image_mark(data)
        if mark.get("found"):
            gen = s.scalar(select(Generation).where(Generation.watermark_id == mark["watermark_id"]))
            return gen, {"by": "image_watermark", "watermark_id": mark["watermark_id"], "matched": gen is not None}
    if data is not None and audio_key is not None and audio_kind(data) is not None:
        mark = check_audio_mark(data, audio_key)
        if mark.get("found"):
            gen = s.scalar(select(Generation).where(Generation.watermark_id == mark["watermark_id"]))
            return gen, {"by": "audio_watermark", "watermark_id": mark["watermark_id"], "matched": gen is not None}
    return None, {"by": "sha256" if digest else "none", "sha256": digest, "matched": False}


def create_complaint(s: Session, reason: str, contact: str = "", generation_id: str | None = None, content: str | None = None,
                     data: bytes | None = None, digest: str | None = None, audio_key: bytes | None = None) -> Complaint:
    if not reason or not reason.strip():
        raise UserError("a complaint needs a reason")
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UserError("sha256 must be 64 lowercase hexadecimal characters")
    if content is not None:
        digest = hashlib.sha256(content.encode()).hexdigest()
    elif data is not None:
        digest = hashlib.sha256(data).hexdigest()
    if not (generation_id or digest):
        raise UserError("give evidence: a generation_id, the content, a file, or its sha256")
    gen, how = find_generation(s, generation_id, digest, data, audio_key)
    c = Complaint(reason=reason.strip(), contact=contact.strip(), evidence_sha256=digest, evidence=how,
                  generation_id=gen.id if gen else None, org_id=gen.org_id if gen else None, decision_note="")
    s.add(c)
    s.flush()
    audit.append_session(s, "complaint.create", "public", c.org_id, f"complaint:{c.id}",
                         {"complaint_id": c.id, "evidence": how, "generation_id": c.generation_id, "reason_sha256":
                          hashlib.sha256(c.reason.encode()).hexdigest()})
    return c


def complaint_out(c: Complaint) -> dict:
    return {"id": c.id, "object": "complaint", "created_at": c.created_at.isoformat() + "Z", "status": c.status,
            "reason": c.reason, "contact": c.contact, "evidence": c.evidence, "evidence_sha256": c.evidence_sha256,
            "generation_id": c.generation_id, "decided_by": c.decided_by,
            "decided_at": c.decided_at.isoformat() + "Z" if c.decided_at else None, "decision_note": c.decision_note}


def list_complaints(s: Session, org_id: int | None, status: str | None = None) -> list[Complaint]:
    q = select(Complaint).order_by(Complaint.id)
    if org_id is not None:
        q = q.where(Complaint.org_id == org_id)
    if status:
        q = q.where(Complaint.status == status)
    return list(s.scalars(q))


@dataclass
class Outcome:
    complaint: Complaint
    revoked_key: int | None = None
    deleted_files: int = 0


def decide(s: Session, complaint_id: int, action: str, reviewer: str, org_id: int | None, note: str = "",
           images_dir: Path | None = None) -> Outcome:
    """dismiss | takedown (block the output hash, delete served files) | revoke_key (of the key that made it)."""
    if action not in DECISIONS:
        raise UserError(f"unknown decision {action!r}: use one of {', '.join(DECISIONS)}")
    c = s.get(Complaint, complaint_id)
    if c is None or (org_id is not None and c.org_id != org_id):
        raise NotFound(f"no complaint {complaint_id}")
    if c.status != "open":
        raise UserError(f"complaint {complaint_id} was already decided ({c.status})")
    gen = s.get(Generation, c.generation_id) if c.generation_id else None
    if action != "dismiss" and gen is None:
        raise UserError("this complaint matched no generation: it can only be dismissed")
    out = Outcome(c)
    if action == "takedown":
        assert gen is not None
        if s.get(BlockedOutput, gen.output_sha256) is None:
            s.add(BlockedOutput(sha256=gen.output_sha256, generation_id=gen.id, complaint_id=c.id))
            crud.announce(s, "blocked")
        gen.status = "taken_down"
        if images_dir is not None:
            for f in Path(images_dir).glob(f"{gen.id}.*"):
                f.unlink(missing_ok=True)
                out.deleted_files += 1
    elif action == "revoke_key":
        assert gen is not None
        if gen.key_id is None:
            raise UserError("the generation was not made with an API key")
        with _actor(reviewer):
            crud.revoke_key(s, gen.org_id, gen.key_id)
        out.revoked_key = gen.key_id
    c.status = {"dismiss": "dismissed", "takedown": "taken_down", "revoke_key": "key_revoked"}[action]
    c.decided_by, c.decided_at, c.decision_note = reviewer, utcnow(), note
    s.flush()
    audit.append_session(s, "complaint.decision", reviewer, c.org_id, f"complaint:{c.id}",
                         {"complaint_id": c.id, "action": action, "generation_id": c.generation_id,
                          "output_sha256": gen.output_sha256 if gen else None, "revoked_key": out.revoked_key, "note": note})
    return out


@contextlib.contextmanager
def _actor(who: str):
    """Admin changes made inside are audited under ``who`` (the reviewer), not the caller's default."""
    token = crud.ACTOR.set(who)
    try:
        yield
    finally:
        crud.ACTOR.reset(token)


# ---------------------------------------------------------------- explanations


def explain(s: Session, generation_id: str, org_id: int | None, registry_paths: dict[str, Path], keyring: KeyRing | None = None,
            reveal: bool = False) -> dict:
    """The generation path: model version, the dataset manifest it was trained on, parameters, filters applied."""
    gen = s.get(Generation, generation_id)
    if gen is None or (org_id is not None and gen.org_id != org_id):
        raise NotFound(f"no generation {generation_id!r}")
    run = registry_paths.get(gen.model)
    dataset = None
    if run is not None:
        for cand in (Path(run) / "dataset" / "manifest.json", Path(run) / "data" / "manifest.json"):
            if cand.is_file():
                try:
                    dataset = json.loads(cand.read_text())
                except ValueError:
                    dataset = {"error": f"{cand.name} is not valid JSON"}
                break
    entry = s.scalar(select(AuditEntry).where(AuditEntry.subject == f"generation:{gen.id}"))
    out = {
        "id": gen.id, "object": "generation.explanation", "created_at": gen.created_at.isoformat() + "Z",
        "request_id": gen.request_id, "endpoint": gen.endpoint, "kind": gen.kind, "status": gen.status,
        "model": {"id": gen.model, "version": gen.model_version, "run": str(run) if run else None},
        "dataset": _dataset_summary(dataset),
        "parameters": gen.params, "parameters_sha256": gen.params_hash,
        "output_sha256": gen.output_sha256,
        "filters": gen.filters or [], "moderation": gen.moderation, "watermark": gen.watermark,
        "stored_content": "purged" if gen.purged_at else ("encrypted" if gen.prompt_enc or gen.output_enc else "not stored"),
        "audit": {"seq": entry.seq, "hash": entry.hash} if entry else None,
    }
    if reveal and keyring is not None and not gen.purged_at:
        out["prompt"] = keyring.decrypt(gen.prompt_enc, f"{gen.id}:prompt".encode()).decode() if gen.prompt_enc else None
        out["output"] = keyring.decrypt(gen.output_enc, f"{gen.id}:output".encode()).decode() if gen.output_enc else None
    return out


def _dataset_summary(manifest: dict | None) -> dict | None:
    if manifest is None:
        return None
    keep = ("kind", "created", "sources", "inputs", "builtin", "documents", "characters", "images", "classes", "sha256",
            "fingerprint", "steps", "options")
    return {k: manifest[k] for k in keep if k in manifest} or manifest


# ---------------------------------------------------------------- retention and keys


def purge(s: Session, now: dt.datetime | None = None, default_days: int = 30) -> dict:
    """Clear stored prompts/outputs older than each tenant's retention (metadata, hashes and audit stay)."""
    now = now or utcnow()
    cleared = 0
    for org in s.scalars(select(Organization)):
        days = int({**DEFAULT_POLICY, **(org.policy or {})}.get("retention_days", default_days))
        cutoff = now - dt.timedelta(days=days)
        res = s.execute(update(Generation).where(Generation.org_id == org.id, Generation.created_at < cutoff,
                                                 Generation.purged_at.is_(None))
                        .values(prompt_enc=None, output_enc=None, purged_at=now))
        if res.rowcount:
            audit.append_session(s, "retention.purge", crud.ACTOR.get(), org.id, f"org:{org.id}",
                                 {"before": cutoff.isoformat(), "generations": res.rowcount, "retention_days": days})
        cleared += res.rowcount or 0
    return {"purged_generations": cleared}


def reencrypt(s: Session, ring: KeyRing) -> dict:
    """Re-seal every stored prompt/output under the active key (after a rotation)."""
    moved = 0
    for gen in s.scalars(select(Generation).where((Generation.prompt_enc.is_not(None)) | (Generation.output_enc.is_not(None)))):
        for col, what in (("prompt_enc", "prompt"), ("output_enc", "output")):
            blob = getattr(gen, col)
            if blob is not None and KeyRing.key_id(blob) != ring.active:
                aad = f"{gen.id}:{what}".encode()
                setattr(gen, col, ring.encrypt(ring.decrypt(blob, aad), aad))
                moved += 1
    audit.append_session(s, "keys.reencrypt", crud.ACTOR.get(), None, "keys", {"active": ring.active, "fields": moved})
    return {"reencrypted_fields": moved, "active_key": ring.active}
