"""The payload every watermark of this product carries (images, video frames, audio): a 32-bit generation id,
CRC-16 protected, Hamming(7,4) coded.

32-bit id + CRC-16/CCITT of the id = 48 bits, coded as 12 Hamming(7,4) codewords = 84 bits, interleaved so that a
codeword's bits sit far apart in the medium. A reader gives each of the 84 bits a soft vote in [0, 1] (the
fraction of its carriers that read 1, or a likelihood); each codeword is decoded by maximum correlation over the
16 codewords (soft-decision decoding: one or two weak bits per codeword are corrected); the CRC then rejects
anything that is not one of our payloads (a false match on unmarked content needs the CRC to pass by chance:
about 1 in 65,536, and the id must also exist in the generation log).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ID_BITS, CRC_BITS = 32, 16
N_WORDS = (ID_BITS + CRC_BITS) // 4  # 12 Hamming(7,4) codewords
CODED_BITS = N_WORDS * 7  # 84

_G = np.array([[1, 0, 0, 0, 1, 1, 0],
               [0, 1, 0, 0, 1, 0, 1],
               [0, 0, 1, 0, 0, 1, 1],
               [0, 0, 0, 1, 1, 1, 1]])
_NIBBLES = np.array([[(n >> (3 - i)) & 1 for i in range(4)] for n in range(16)])
_CODEWORDS = _NIBBLES @ _G % 2  # (16, 7)
_ORDER = np.array([w * 7 + j for j in range(7) for w in range(N_WORDS)])  # interleaved position -> coded bit


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def encode_payload(wm_id: int) -> np.ndarray:
    if not 0 <= wm_id < 2**ID_BITS:
        raise ValueError("a watermark id is a 32-bit unsigned integer")
    word = (wm_id << CRC_BITS) | crc16(wm_id.to_bytes(4, "big"))
    nibbles = [(word >> (4 * (N_WORDS - 1 - k))) & 0xF for k in range(N_WORDS)]
    coded = np.concatenate([_CODEWORDS[n] for n in nibbles])
    return coded[_ORDER]


@dataclass
class Extracted:
    found: bool
    watermark_id: int | None
    corrected_bits: int  # coded bits whose hard reading disagreed with the decoded codeword
    confidence: float  # mean distance of the bit votes from 0.5, scaled to [0, 1]

    def to_dict(self) -> dict:
        return {"found": self.found, "watermark_id": self.watermark_id, "corrected_bits": self.corrected_bits,
                "confidence": round(self.confidence, 3)}


def decode_payload(soft: np.ndarray) -> Extracted:
    """soft: (84,) votes in [0, 1] in embedded order."""
    coded = np.empty(CODED_BITS)
    coded[_ORDER] = soft
    signed = 2 * coded.reshape(N_WORDS, 7) - 1  # +1 reads 1, -1 reads 0
    corr = signed @ (2 * _CODEWORDS.T - 1)  # (12, 16)
    best = corr.argmax(1)
    word = 0
    for n in best:
        word = (word << 4) | int(n)
    hard = (coded.reshape(N_WORDS, 7) > 0.5).astype(int)
    corrected = int((hard != _CODEWORDS[best]).sum())
    wm_id, crc = word >> CRC_BITS, word & 0xFFFF
    ok = crc16(wm_id.to_bytes(4, "big")) == crc
    confidence = float(np.abs(soft - 0.5).mean() * 2)
    return Extracted(ok, wm_id if ok else None, corrected, confidence)
