"""C2PA signing with a local CA chain, validation states and bad input."""
import io
import wave

import numpy as np
import pytest
from cryptography import x509
from PIL import Image

from aigc.errors import UserError
from aigc.govern import c2pa
from aigc.govern.c2pa import Provenance, create_dev_ca


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def prov(tmp_path_factory):
    return Provenance.from_home(tmp_path_factory.mktemp("home"))


def test_dev_ca_is_a_chain_not_a_self_signed_leaf(tmp_path):
    paths = create_dev_ca(tmp_path / "ca")
    leaf, inter = x509.load_pem_x509_certificates(paths["chain"].read_bytes())
    root = x509.load_pem_x509_certificate(paths["root"].read_bytes())
    assert leaf.issuer == inter.subject and inter.issuer == root.subject and leaf.issuer != leaf.subject
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (paths["key"].stat().st_mode & 0o777) == 0o600
    with pytest.raises(UserError, match="already holds"):
        create_dev_ca(tmp_path / "ca")


def test_signed_png_is_trusted_with_the_anchor_and_valid_without(prov):
    signed = prov.sign(_png(), "image/png", prov.manifest("a.png", "shapes", "abc123", {"generation_id": "g-1"}))
    v = prov.verify(signed)
    assert v.state == "Trusted", v.reason
    m = v.manifest
    assert m["digital_source_type"] == c2pa.DIGITAL_SOURCE_TYPE and m["action"] == "c2pa.created"
    assert m["model"] == "shapes" and m["model_version"] == "abc123" and m["generation_id"] == "g-1"
    plain = c2pa.verify(signed)  # no trust anchor: the signature is fine, the signer unknown
    assert plain.state == "Valid" and "untrusted" in plain.reason


def test_tampered_stripped_and_garbage(prov):
    signed = prov.sign(_png(), "image/png", prov.manifest("a.png", "m", "v"))
    raw = bytearray(signed)
    i = raw.find(b"IDAT")
    raw[i + 12] ^= 0xFF
    assert prov.verify(bytes(raw)).state == "Invalid"
    img = Image.open(io.BytesIO(signed))
    buf = io.BytesIO()
    img.save(buf, "PNG")  # re-encoding drops the manifest
    v = prov.verify(buf.getvalue())
    assert v.state == "Absent" and "stripped" in v.reason
    assert prov.verify(b"hello world").state == "Invalid"
    assert prov.verify(signed[: len(signed) // 2]).state == "Invalid"  # truncated file: an answer, not a crash


def wav_bytes() -> bytes:
    """A tenth of a second of a sine tone, 16-bit mono WAV."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes((np.sin(np.arange(4410) / 7) * 3000).astype("<i2").tobytes())
    return buf.getvalue()


def test_wav_is_signed(prov):
    signed = prov.sign(wav_bytes(), "audio/wav", prov.manifest("a.wav", "music", "v1"))
    assert c2pa.sniff_mime(signed) == "audio/wav" and prov.verify(signed).state == "Trusted"


def test_production_credentials_from_environment(tmp_path, monkeypatch):
    paths = create_dev_ca(tmp_path / "prod")
    monkeypatch.setenv("AIGC_C2PA_CERT", str(paths["chain"]))
    monkeypatch.setenv("AIGC_C2PA_KEY", str(paths["key"]))
    monkeypatch.setenv("AIGC_C2PA_TRUST_ANCHORS", str(paths["root"]))
    p = Provenance.from_home(tmp_path / "home")
    assert not (tmp_path / "home" / "c2pa").exists()  # no development CA is made when credentials are given
    assert p.verify(p.sign(_png(), "image/png", p.manifest("x", "m", "v"))).state == "Trusted"
    monkeypatch.setenv("AIGC_C2PA_KEY", str(tmp_path / "missing.key"))
    with pytest.raises(UserError, match="cannot read"):
        Provenance.from_home(tmp_path / "home")
    monkeypatch.delenv("AIGC_C2PA_KEY")
    monkeypatch.setenv("AIGC_C2PA_SIGNER", "no_such_module:sign")
    with pytest.raises(UserError, match="could not be loaded"):
        Provenance.from_home(tmp_path / "home")
