"""C2PA provenance: sign generated PNG / JPEG / WAV / MP4 files with a manifest that states AI
generation, and validate manifests (Trusted / Valid / Invalid).

Signing credentials, in order of preference:

1. ``AIGC_C2PA_CERT`` + ``AIGC_C2PA_KEY``: PEM files of a production certificate chain (leaf first,
   then intermediates; not the root) and its private key, issued by a CA that validators trust
   (one on the C2PA trust list for public verification). ``AIGC_C2PA_ALG`` names the algorithm
   (es256, es384, es512, ps256, ps384, ps512, ed25519; default es256).
2. ``AIGC_C2PA_SIGNER=module:function`` with ``AIGC_C2PA_CERT`` only: an external signer (an HSM or
   a cloud KMS). The function receives the bytes to sign and returns the raw signature; the private
   key never enters this process.
3. Otherwise a local development CA under ``HOME/c2pa/`` (``aigc admin c2pa init`` or first use):
   a root, an intermediate and a leaf signing certificate. Validators reject self-signed leaf
   certificates, so the chain matters; with the local root configured as a trust anchor the manifests
   validate as Trusted here, and as Valid (signature fine, signer unknown) anywhere else.

``AIGC_C2PA_TRUST_ANCHORS`` (PEM file) adds trust anchors for verification; the development root is
always added when present. No timestamp authority is used (it needs the network); validators then
check the certificate against the current time.
"""
from __future__ import annotations

import datetime as dt
import importlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from aigc.errors import UserError

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".wav": "audio/wav", ".mp4": "video/mp4"}
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


def sniff_mime(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[4:8] == b"ftyp":
        return "video/mp4"
    if data[:4] == b"fLaC":
        return "audio/flac"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE6 == 0xE2):  # MPEG audio layer III
        return "audio/mpeg"
    return None


# ---------------------------------------------------------------- development CA


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AIGC development")])


def _cert(subject: str, issuer_name, issuer_key, public_key, *, ca: bool, days: int, path_len: int | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = (b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                           encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False))
    return b.sign(issuer_key, hashes.SHA256())


def create_dev_ca(folder: Path, name: str = "AIGC", overwrite: bool = False) -> dict[str, Path]:
    """Root CA -> intermediate CA -> signing certificate (ECDSA P-256), written as PEM files (keys 0600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    paths = {k: folder / f for k, f in {"root": "root-ca.pem", "chain": "signer-chain.pem", "key": "signer.key",
                                         "root_key": "root-ca.key"}.items()}
    if paths["chain"].exists() and not overwrite:
        raise UserError(f"{folder} already holds a signing certificate (use --overwrite to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    root_key, int_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert(f"{name} development root CA", _name(f"{name} development root CA"), root_key, root_key.public_key(),
                 ca=True, days=3650, path_len=1)
    inter = _cert(f"{name} development intermediate CA", root.subject, root_key, int_key.public_key(), ca=True, days=1825, path_len=0)
    leaf = _cert(f"{name} content signer", inter.subject, int_key, leaf_key.public_key(), ca=False, days=365)
    pem = serialization.Encoding.PEM

    def key_bytes(k) -> bytes:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    from aigc.govern.crypto import _private_write

    paths["root"].write_bytes(root.public_bytes(pem))
    paths["chain"].write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    _private_write(paths["key"], key_bytes(leaf_key))
    _private_write(paths["root_key"], key_bytes(root_key))
    return paths


# ---------------------------------------------------------------- signing and validation


@dataclass
class Verdict:
    state: str  # Trusted | Valid | Invalid | Absent
    reason: str
    manifest: dict | None = None

    def to_dict(self) -> dict:
        return {"state": self.state, "reason": self.reason, "manifest": self.manifest}


class Provenance:
    def __init__(self, chain_pem: str, key_pem: str | None, trust_anchors: str = "", alg: str = "es256",
                 callback=None, generator: str = "aigc"):
        if alg not in ALGORITHMS:
            raise UserError(f"unknown C2PA signing algorithm {alg!r}: use one of {', '.join(ALGORITHMS)}")
        if key_pem is None and callback is None:
            raise UserError("C2PA signing needs a private key or an external signer")
        self.chain, self.key, self.alg, self.callback = chain_pem, key_pem, alg, callback
        self.trust_anchors, self.generator = trust_anchors, generator

    @classmethod
    def from_home(cls, home: Path) -> "Provenance":
        """Credentials for the data folder ``home``, with the AIGC_C2PA_* settings from the environment."""
        from aigc.settings import Settings

        return cls.from_settings(Settings(home=home))

    @classmethod
    def from_settings(cls, settings) -> "Provenance":
        cert, key, signer = settings.c2pa_cert, settings.c2pa_key, settings.c2pa_signer
        alg = settings.c2pa_alg.lower()
        anchors = anchors_from_settings(settings)
        dev = Path(settings.home) / "c2pa"
        if cert:
            callback = None
            if signer:
                mod, _, fn = signer.partition(":")
                try:
                    callback = getattr(importlib.import_module(mod), fn)
                except (ImportError, AttributeError) as exc:
                    raise UserError(f"AIGC_C2PA_SIGNER={signer!r} could not be loaded: {exc}") from None
            elif not key:
                raise UserError("AIGC_C2PA_CERT is set but neither AIGC_C2PA_KEY nor AIGC_C2PA_SIGNER is")
            return cls(_read(cert), _read(key) if key else None, anchors, alg, callback)
        if not (dev / "signer-chain.pem").is_file():
            create_dev_ca(dev)
            anchors += (dev / "root-ca.pem").read_text()
        return cls((dev / "signer-chain.pem").read_text(), (dev / "signer.key").read_text(), anchors, "es256")

    def _signer(self):
        import c2pa

        alg = getattr(c2pa.C2paSigningAlg, self.alg.upper())
        if self.callback is not None:
            return c2pa.Signer.from_callback(self.callback, alg, self.chain, None)
        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, self.chain.encode(), self.key.encode(), None))

    def manifest(self, title: str, model: str, version: str, extra: dict | None = None) -> dict:
        from aigc import __version__

        return {
            "claim_generator_info": [{"name": self.generator, "version": __version__}],
            "title": title,
            "assertions": [
                {"label": "c2pa.actions.v2", "data": {"actions": [{
                    "action": "c2pa.created",
                    "digitalSourceType": DIGITAL_SOURCE_TYPE,
                    "softwareAgent": {"name": f"{self.generator} model {model}", "version": version},
                }]}},
                {"label": "org.aigc.generation", "data": {"model": model, "model_version": version, **(extra or {})}},
            ],
        }

    def sign(self, data: bytes, mime: str, manifest: dict) -> bytes:
        import c2pa

        ctx = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}, "verify": {"verify_after_sign": False}})
        try:
            with c2pa.Builder(manifest, context=ctx) as builder:
                signer = self._signer()
                try:
                    out = io.BytesIO()
                    builder.sign(signer, mime, io.BytesIO(data), out)
                finally:
                    signer.close()
            return out.getvalue()
        except c2pa.C2paError as exc:
            raise UserError(f"C2PA signing failed: {exc}") from None

    def verify(self, data: bytes, mime: str | None = None) -> Verdict:
        return verify(data, mime, self.trust_anchors)


def anchors_from_settings(settings) -> str:
    """The PEM trust anchors verification uses: AIGC_C2PA_TRUST_ANCHORS and the home's development CA (never created here)."""
    anchors = _read(settings.c2pa_trust_anchors) if settings.c2pa_trust_anchors else ""
    dev_root = Path(settings.home) / "c2pa" / "root-ca.pem"
    if dev_root.is_file():
        anchors += dev_root.read_text()
    return anchors


def verify(data: bytes, mime: str | None = None, trust_anchors: str = "") -> Verdict:
    import c2pa

    mime = mime or sniff_mime(data)
    if mime is None:
        return Verdict("Invalid", "not a PNG, JPEG, WAV or MP4 file")
    settings: dict = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if trust_anchors:
        settings["trust"] = {"user_anchors": trust_anchors}
    try:
        ctx = c2pa.Context.from_dict(settings)
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, ctx)
    except c2pa.C2paError as exc:
        return Verdict("Invalid", f"the file or its manifest is unreadable: {exc}")
    if reader is None:
        return Verdict("Absent", "no C2PA manifest (never signed, or its metadata was stripped)")
    with reader:
        doc = json.loads(reader.json())
    state = doc.get("validation_state") or "Invalid"
    results = doc.get("validation_results", {}).get("activeManifest", {})
    failures = [f"{f.get('code')}: {f.get('explanation', '')}".strip() for f in results.get("failure", [])]
    active = doc.get("manifests", {}).get(doc.get("active_manifest", ""), {})
    summary = _summary(active)
    if state == "Trusted":
        reason = "signature valid and the signing certificate chains to a trusted anchor"
    elif state == "Valid":
        reason = "signature valid, but the signer is not trusted here" + (f" ({'; '.join(failures)})" if failures else "")
    else:
        reason = "; ".join(failures) or "the manifest did not validate"
    return Verdict(state, reason, summary)


def _summary(active: dict) -> dict:
    out: dict = {"title": active.get("title"), "signer": (active.get("signature_info") or {}).get("issuer")}
    for a in active.get("assertions", []):
        if a.get("label", "").startswith("c2pa.actions"):
            acts = a.get("data", {}).get("actions", [])
            if acts:
                out["action"] = acts[0].get("action")
                out["digital_source_type"] = acts[0].get("digitalSourceType")
        elif a.get("label") == "org.aigc.generation":
            out.update(a.get("data", {}))
    return out


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
