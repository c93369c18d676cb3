"""Server-side key material: encryption at rest (AES-256-GCM with a rotating key ring) and named secrets.

Key ring: ``AIGC_DATA_KEYS`` (``kid:base64key[,kid:base64key...]``, the first is active) when set,
else ``HOME/keys/data-keys.json`` (``{"active": kid, "keys": {kid: base64key}}``), created with one
fresh key on first use, mode 0600. Every ciphertext names the key that sealed it, so after
``rotate`` new data uses the new key while old rows still decrypt; ``aigc admin keys reencrypt``
moves old rows to the active key, after which a retired key can be deleted from the file.

Ciphertext layout: ``b"A1" | len(kid) | kid | nonce(12) | AES-GCM(ciphertext + tag)``. The associated
data binds a ciphertext to its row (a prompt copied onto another generation does not decrypt).
"""
from __future__ import annotations

import base64
import json
import os
import secrets as pysecrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aigc.errors import UserError

MAGIC = b"A1"


def _private_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def secret(home: Path, name: str, create: bool = True) -> bytes:
    """A named 32-byte server secret under HOME/keys (created on first use unless ``create`` is off: a checker
    must never mint a key, or it scores with a key nothing was marked with): watermark keys derive from these."""
    path = Path(home) / "keys" / f"{name}.key"
    if not path.is_file():
        if not create:
            raise UserError(f"no {name} key in {home} ({path} is missing): use the home that generated the content "
                            "(AIGC_HOME or --home)")
        _private_write(path, pysecrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 16:
        raise UserError(f"{path}: a secret must hold at least 16 bytes (it has {len(data)})")
    return data


class KeyRing:
    def __init__(self, keys: dict[str, bytes], active: str, path: Path | None = None):
        if active not in keys:
            raise UserError(f"the active data key {active!r} is not in the key ring")
        for kid, key in keys.items():
            if len(key) != 32:
                raise UserError(f"data key {kid!r} must be 32 bytes (AES-256), got {len(key)}")
        self.keys, self.active, self.path = keys, active, path
        self._aead: dict[str, AESGCM] = {}

    def _cipher(self, kid: str) -> AESGCM:
        if kid not in self._aead:
            self._aead[kid] = AESGCM(self.keys[kid])
        return self._aead[kid]

    @classmethod
    def load(cls, home: Path, spec: str | None = None) -> "KeyRing":
        """From ``spec`` (the AIGC_DATA_KEYS format; None: read that setting), else the key-ring file under ``home``."""
        if spec is None:
            from aigc.settings import Settings

            spec = Settings(home=home).data_keys
        env = spec.strip()
        if env:
            keys: dict[str, bytes] = {}
            for part in env.split(","):
                kid, _, b64 = part.strip().partition(":")
                if not kid or not b64:
                    raise UserError("AIGC_DATA_KEYS must look like 'kid:base64key[,kid:base64key...]'")
                keys[kid] = _b64(b64, kid)
            return cls(keys, next(iter(keys)))
        path = Path(home) / "keys" / "data-keys.json"
        if not path.is_file():
            ring = cls({"k1": pysecrets.token_bytes(32)}, "k1", path)
            ring.save()
            return ring
        try:
            doc = json.loads(path.read_text())
            return cls({k: _b64(v, k) for k, v in doc["keys"].items()}, doc["active"], path)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a readable key ring ({exc})") from None

    def save(self) -> None:
        if self.path is None:
            raise UserError("the key ring comes from AIGC_DATA_KEYS; rotate it there")
        doc = {"active": self.active, "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()}}
        _private_write(self.path, json.dumps(doc, indent=1).encode())

    def rotate(self) -> str:
        """Add a fresh key and make it active; returns its id. Old keys stay for decryption."""
        n = 1 + max((int(k[1:]) for k in self.keys if k[1:].isdigit()), default=0)
        kid = f"k{n}"
        self.keys[kid] = pysecrets.token_bytes(32)
        self.active = kid
        self.save()
        return kid

    def encrypt(self, plaintext: str | bytes, aad: bytes = b"") -> bytes:
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        kid = self.active.encode()
        nonce = pysecrets.token_bytes(12)
        return MAGIC + bytes([len(kid)]) + kid + nonce + self._cipher(self.active).encrypt(nonce, data, aad)

    @staticmethod
    def key_id(blob: bytes) -> str:
        if len(blob) < 3 or blob[:2] != MAGIC:
            raise UserError("not an encrypted record (bad header)")
        return blob[3 : 3 + blob[2]].decode(errors="replace")

    def decrypt(self, blob: bytes, aad: bytes = b"") -> bytes:
        kid = self.key_id(blob)
        key = self.keys.get(kid)
        if key is None:
            raise UserError(f"this record was encrypted with data key {kid!r}, which is not in the key ring")
        body = blob[3 + blob[2] :]
        try:
            return self._cipher(kid).decrypt(body[:12], body[12:], aad)
        except (InvalidTag, ValueError):
            raise UserError(f"this record does not decrypt with key {kid!r}: it was altered or belongs to another row") from None


def _b64(text: str, kid: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise UserError(f"data key {kid!r} is not valid base64") from None
