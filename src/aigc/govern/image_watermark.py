"""Invisible image watermark: a 32-bit generation id, CRC-16 protected, Hamming(7,4) coded, embedded with
invisible-watermark's ``dwtDctSvd`` method (the one Stable Diffusion uses; it survives JPEG quality 75),
on the luma channel (measured: the library's default, chroma U, lost the mark under JPEG's 4:2:0
chroma subsampling at 256x256; luma kept 100% of the bits).

Payload (``govern.payload``, shared with the audio mark): 32-bit id + CRC-16/CCITT of the id = 48 bits, coded as
12 Hamming(7,4) codewords = 84 bits, interleaved so that a codeword's bits sit in distant blocks. ``dwtDctSvd`` writes the 84 bits
cyclically into the 4x4 blocks of the Haar LL band of the Y channel, so every bit is repeated many
times (about 12 times on a 256x256 image). Decoding keeps the soft vote of each bit (the fraction of
its blocks that read 1) and decodes the payload from those votes (``govern.payload.decode_payload``).

Needs at least 256x256 pixels (the library's floor; smaller images carry too few blocks).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from aigc.errors import UserError
from aigc.govern.payload import CODED_BITS, Extracted, decode_payload, encode_payload

MIN_SIDE = 256
SCALE = 24  # quantisation step of the largest singular value (the library's default is 36 on U)
CHANNEL = 0  # Y: JPEG keeps luma at full resolution but halves chroma (4:2:0), which erased U marks at 256x256
def _codec(bits: np.ndarray | None = None):
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    return EmbedDwtDctSvd(watermarks=list(bits) if bits is not None else [], wmLen=CODED_BITS, scales=[0, SCALE, 0], block=4)


def _check_size(img: Image.Image) -> None:
    if min(img.size) < MIN_SIDE:
        raise UserError(f"the image watermark needs at least {MIN_SIDE}x{MIN_SIDE} pixels; this image is {img.size[0]}x{img.size[1]}")


def embed(img: Image.Image, wm_id: int) -> Image.Image:
    """A copy of ``img`` (RGB) carrying ``wm_id``."""
    import cv2
    import pywt

    _check_size(img)
    bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8)[:, :, ::-1])
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV).astype(np.float64)  # float: writing back into uint8 would wrap around
    row, col = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
    ca1, (h1, v1, d1) = pywt.dwt2(yuv[:row, :col, CHANNEL], "haar")
    _codec(encode_payload(wm_id)).encode_frame(ca1, SCALE)
    yuv[:row, :col, CHANNEL] = pywt.idwt2((ca1, (v1, h1, d1)), "haar")  # (v, h) swapped back exactly as the library does
    out = cv2.cvtColor(np.clip(np.rint(yuv), 0, 255).astype(np.uint8), cv2.COLOR_YUV2RGB)
    return Image.fromarray(out, "RGB")


def soft_bits(img: Image.Image) -> np.ndarray:
    import cv2
    import pywt

    _check_size(img)
    bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8)[:, :, ::-1])
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    row, col = yuv.shape[:2]
    ca1, _ = pywt.dwt2(yuv[: row // 4 * 4, : col // 4 * 4, CHANNEL], "haar")
    codec = _codec()
    votes = [[] for _ in range(CODED_BITS)]
    num = 0
    for i in range(ca1.shape[0] // 4):
        for j in range(ca1.shape[1] // 4):
            votes[num % CODED_BITS].append(codec.infer_dct_svd(ca1[i * 4 : i * 4 + 4, j * 4 : j * 4 + 4], SCALE))
            num += 1
    return np.array([np.mean(v) for v in votes])


def extract(img: Image.Image) -> Extracted:
    return decode_payload(soft_bits(img))


def bit_accuracy(img: Image.Image, wm_id: int) -> float:
    """Fraction of the 84 coded bits read correctly (before error correction)."""
    return float(((soft_bits(img) > 0.5).astype(int) == encode_payload(wm_id)).mean())
