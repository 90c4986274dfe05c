"""A tiny WAV clip made with the standard library's `wave`, for the audio routes' tests."""

from __future__ import annotations

import io
import math
import wave


def wav_clip(seconds: float = 1.0, *, rate: int = 8000) -> bytes:
    """`seconds` of a 440 Hz tone, 16-bit mono: `seconds * rate * 2` bytes of samples after a 44-byte header."""
    frames = bytearray()
    for index in range(int(seconds * rate)):
        frames += int(8000 * math.sin(2 * math.pi * 440 * index / rate)).to_bytes(2, "little", signed=True)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(bytes(frames))
    return buffer.getvalue()
