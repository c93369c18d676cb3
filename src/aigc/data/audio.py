"""Audio files: 16-bit PCM WAV read and written here, MP3, AAC (in M4A) and FLAC encoded and decoded with PyAV
(which bundles FFmpeg, LAME included). Audio in memory is float32 in [-1, 1], shaped (samples, channels)."""
from __future__ import annotations

import io
import wave

import numpy as np

from aigc.errors import UserError

NO_AUDIO = "the file has no audio"
# format -> (container, codec, MIME type)
FORMATS = {"wav": ("wav", "pcm_s16le", "audio/wav"), "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
           "aac": ("adts", "aac", "audio/aac"), "m4a": ("ipod", "aac", "audio/mp4"), "flac": ("flac", "flac", "audio/flac")}


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes -> ((samples, channels) float32 in [-1, 1], sample rate)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2:
                raise UserError("only 16-bit PCM WAV is supported")
            rate, ch = w.getframerate(), w.getnchannels()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, ch)
    except (wave.Error, EOFError) as exc:
        raise UserError(f"not a readable WAV file: {exc}") from None
    return pcm.astype(np.float32) / 32768.0, rate


def write_wav(audio: np.ndarray, rate: int) -> bytes:
    """(samples,) or (samples, channels) float in [-1, 1] -> 16-bit PCM WAV bytes."""
    a = audio if audio.ndim == 2 else audio[:, None]
    pcm = np.clip(np.rint(a * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(a.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def encode(audio: np.ndarray, rate: int, fmt: str, bitrate: int = 128_000) -> bytes:
    """``audio`` encoded as ``fmt`` (one of FORMATS; ``bitrate`` for MP3 and AAC)."""
    import av

    if fmt not in FORMATS:
        raise UserError(f"unknown audio format {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == "wav":
        return write_wav(audio, rate)
    container, codec, _ = FORMATS[fmt]
    a = audio if audio.ndim == 2 else audio[:, None]
    layout = "mono" if a.shape[1] == 1 else "stereo"
    pcm = np.clip(np.rint(a[:, :2] * 32767.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if fmt in ("mp3", "aac", "m4a"):
            stream.bit_rate = bitrate
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.reshape(1, -1)), format="s16", layout=layout)  # interleaved
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any audio file PyAV reads (WAV, MP3, AAC, M4A, FLAC, the audio of an MP4) -> ((samples, channels), rate)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.audio:
                raise UserError(NO_AUDIO)
            stream = c.streams.audio[0]
            rate = stream.rate
            chunks = []
            for frame in c.decode(stream):
                a = frame.to_ndarray()
                if frame.format.is_planar:
                    a = a.T
                else:
                    a = a.reshape(-1, len(frame.layout.channels))
                if a.dtype.kind == "i":
                    a = a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
                chunks.append(a.astype(np.float32))
    except av.error.FFmpegError as exc:
        raise UserError(f"not a readable audio file: {exc}") from None
    if not chunks:
        raise UserError("the audio stream is empty")
    return np.concatenate(chunks), rate
