"""What images, audio and files in a request cost in tokens, read cheaply from the parts themselves.

Images follow OpenAI's published rules ("Images and vision" guide, "Calculating costs"), by model family:

- **Tiles** (gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, unknown models): ``detail: "low"`` costs the base tokens;
  ``high``/``auto`` scale the image to fit 2048x2048, then its shortest side down to 768 px, and add one tile
  price per 512-px tile. Base/tile: 85/170 (gpt-4o, gpt-4.1, gpt-4.5 and the default), 2833/5667 (gpt-4o-mini:
  its image tokens are multiplied so that an image costs the same dollars as on gpt-4o), 75/150 (o1, o3),
  70/140 (gpt-5), 65/129 (computer-use-preview).
- **Patches** (gpt-4.1-mini 1.62, gpt-4.1-nano 2.46, o4-mini 1.72, gpt-5-mini 1.62, gpt-5-nano 2.46): one patch
  per 32x32 px, at most 1,536 (larger images are scaled down to fit), times the model's multiplier; ``detail``
  does not lower it. Later gpt-5.x models: 2,500 patches times 1.2 (measurements published on OpenAI's
  developer forum, 2026; the documented gpt-5-mini multiplier, 1.62, is above the measured 1.2: we keep the
  documented, higher figure).

The size is read from a ``data:`` URL's first bytes (PNG, GIF, WebP, JPEG headers): at most a few kilobytes are
decoded. An image whose size cannot be known (an ``https`` URL, a ``file_id``) is counted at the most its model
can charge: 8 tiles (a 2048x768 image) or the whole patch budget. That bound is what the token bucket is
charged; the context-window check uses the least instead (see ``lower``), so that it never refuses a request
that would fit.

Audio input (``input_audio``) costs 10 tokens a second (OpenAI: "1 token per 100 ms" of user audio). A WAV
header gives the byte rate, so the duration is the data's size over it; other formats are assumed to run at
16 kbit/s (2,000 bytes a second), a low speech bitrate, so that the duration is overestimated rather than under.

Files (``file``/``input_file`` parts, e.g. PDFs) are counted at 1 token per 4 bytes of file data: OpenAI puts each
PDF page's text and an image of the page in the context, which for text PDFs comes to about that; scanned PDFs
cost less. A file given by ``file_id`` is not counted (its size is unknown here).
"""

from __future__ import annotations

import binascii
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["audio_tokens", "file_tokens", "image_size", "image_tokens"]

_TILE_PX = 512
_FIT_PX = 2048
_SHORT_SIDE_PX = 768
# The most tiles an image can take: after scaling it is at most 2048 x 768 px.
_MAX_TILES = math.ceil(_FIT_PX / _TILE_PX) * math.ceil(_SHORT_SIDE_PX / _TILE_PX)
_PATCH_PX = 32

_AUDIO_TOKENS_PER_S = 10
_UNKNOWN_AUDIO_BYTES_PER_S = 2_000
_FILE_BYTES_PER_TOKEN = 4

# Base64 characters decoded to find an image's size: 4 KB holds every format's header but a JPEG's frame
# header, which follows its metadata segments (EXIF, ICC profiles): those take one more, longer look.
_HEAD_CHARS = 4096
_JPEG_HEAD_CHARS = 1 << 20
_JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})


@dataclass(frozen=True, slots=True)
class _Tiles:
    """Base tokens plus a price per 512-px tile."""

    base: int
    tile: int

    def tokens(self, size: tuple[int, int] | None, detail: str, lower: bool) -> int:
        if detail == "low" or (lower and (size is None or detail != "high")):
            return self.base
        tiles = _MAX_TILES if size is None else _tiles(*size)
        return self.base + self.tile * tiles


@dataclass(frozen=True, slots=True)
class _Patches:
    """One token per 32-px patch, up to a budget, times a multiplier."""

    budget: int
    multiplier: float

    def tokens(self, size: tuple[int, int] | None, detail: str, lower: bool) -> int:
        if lower and (size is None or detail != "high"):
            return math.ceil(self.multiplier)
        if size is None:
            patches = self.budget
        else:
            width, height = size
            # Scaling a larger image down to the budget leaves at most the budget: the cap is the upper bound.
            patches = min(self.budget, math.ceil(width / _PATCH_PX) * math.ceil(height / _PATCH_PX))
        return math.ceil(patches * self.multiplier)


_DEFAULT_RULE = _Tiles(85, 170)
# Longest matching prefix wins, as for prices: "gpt-4o-mini-2024-07-18" takes "gpt-4o-mini".
_RULES: Mapping[str, _Tiles | _Patches] = {
    "gpt-4o": _DEFAULT_RULE,
    "gpt-4o-mini": _Tiles(2833, 5667),
    "gpt-4.1": _DEFAULT_RULE,
    "gpt-4.1-mini": _Patches(1536, 1.62),
    "gpt-4.1-nano": _Patches(1536, 2.46),
    "gpt-4.5": _DEFAULT_RULE,
    "o1": _Tiles(75, 150),
    "o3": _Tiles(75, 150),
    "o4-mini": _Patches(1536, 1.72),
    "gpt-5": _Tiles(70, 140),
    "gpt-5-mini": _Patches(1536, 1.62),
    "gpt-5-nano": _Patches(1536, 2.46),
    "gpt-5.": _Patches(2500, 1.2),
    "computer-use-preview": _Tiles(65, 129),
}


@functools.lru_cache(maxsize=256)
def _rule(model: str) -> _Tiles | _Patches:
    name = model.rsplit("/", 1)[-1].lower().removeprefix("ft:")
    best = max((prefix for prefix in _RULES if name.startswith(prefix)), key=len, default=None)
    return _RULES[best] if best is not None else _DEFAULT_RULE


def _tiles(width: int, height: int) -> int:
    scale = min(1.0, _FIT_PX / max(width, height))
    width_f, height_f = width * scale, height * scale
    short = min(width_f, height_f)
    if short > _SHORT_SIDE_PX:
        width_f, height_f = width_f * _SHORT_SIDE_PX / short, height_f * _SHORT_SIDE_PX / short
    return math.ceil(width_f / _TILE_PX) * math.ceil(height_f / _TILE_PX)


def image_tokens(part: Mapping[str, Any], model: str, lower: bool = False) -> int:
    """Tokens of an image part: chat's ``{"type": "image_url", "image_url": {"url", "detail"}}`` or the
    Responses API's ``{"type": "input_image", "image_url": "...", "detail"}``.

    Args:
        part: the content part.
        model: the request's model, which decides the rule.
        lower: count the least the image can cost (unknown size or ``auto`` detail at their cheapest), for
            checks that must not refuse a request that fits; by default, the most.
    """
    spec = part.get("image_url")
    detail = part.get("detail")
    url = spec
    if isinstance(spec, Mapping):
        url = spec.get("url")
        detail = spec.get("detail", detail)
    size = image_size(url) if isinstance(url, str) else None
    return _rule(model).tokens(size, detail if isinstance(detail, str) else "auto", lower)


def image_size(url: str) -> tuple[int, int] | None:
    """Width and height of the image in a base64 ``data:`` URL, read from its header; None when unknown."""
    data = _data_url_payload(url)
    if data is None:
        return None
    head = _decode_head(data, _HEAD_CHARS)
    if head is None:
        return None
    size = _header_size(head)
    if size is None and head.startswith(b"\xff\xd8") and len(data) > _HEAD_CHARS:
        head = _decode_head(data, _JPEG_HEAD_CHARS)
        size = _header_size(head) if head is not None else None
    return size


def _data_url_payload(url: str) -> str | None:
    """The base64 payload of a ``data:...;base64,`` URL, without copying it."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 5, 256)
    if comma < 0 or ";base64" not in url[5:comma]:
        return None
    return url[comma + 1 :] if comma + 1 < len(url) else None


def _decode_head(data: str, chars: int) -> bytes | None:
    """The bytes of the first ``chars`` base64 characters (whole 4-character groups only)."""
    head = data[: min(len(data), chars) // 4 * 4]
    try:
        return binascii.a2b_base64(head)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        return None


def _header_size(data: bytes) -> tuple[int, int] | None:
    width = height = 0
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    elif data.startswith(b"RIFF") and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
            width = int.from_bytes(data[26:28], "little") & 0x3FFF
            height = int.from_bytes(data[28:30], "little") & 0x3FFF
        elif chunk == b"VP8L":  # lossless: 14 bits of width - 1, then 14 of height - 1
            bits = int.from_bytes(data[21:25], "little")
            width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif chunk == b"VP8X":  # extended: 24 bits each of canvas width - 1 and height - 1
            width, height = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    elif data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return (width, height) if width > 0 and height > 0 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG's segments to its frame header (SOFn), which holds height and width."""
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            return None
        if marker in _JPEG_FRAME_MARKERS:
            if i + 9 > end:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height) if width > 0 and height > 0 else None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def audio_tokens(part: Mapping[str, Any], lower: bool = False) -> int:
    """Tokens of an ``input_audio`` part (``{"input_audio": {"data": base64, "format": "wav" | "mp3"}}``).

    Args:
        part: the content part.
        lower: count nothing for audio of unknown duration (the least it can cost) instead of the most.
    """
    spec = part.get("input_audio")
    data = spec.get("data") if isinstance(spec, Mapping) else None
    if not isinstance(data, str):
        return 0
    size = _decoded_size(data)
    byte_rate = _wav_byte_rate(data)
    if byte_rate:
        seconds = size / byte_rate
    elif lower:
        return 0
    else:
        seconds = size / _UNKNOWN_AUDIO_BYTES_PER_S
    return math.ceil(seconds * _AUDIO_TOKENS_PER_S)


def _wav_byte_rate(data: str) -> int | None:
    """Bytes per second from a base64 WAV's ``fmt`` chunk; None for anything else."""
    if not data.startswith("UklGR"):  # "RIFF", base64-encoded
        return None
    head = _decode_head(data, 512)
    if head is None or head[8:12] != b"WAVE":
        return None
    i = 12
    while i + 16 <= len(head):
        chunk, length = head[i : i + 4], int.from_bytes(head[i + 4 : i + 8], "little")
        if chunk == b"fmt ":
            rate = int.from_bytes(head[i + 16 : i + 20], "little") if i + 20 <= len(head) else 0
            return rate or None
        i += 8 + length + (length & 1)  # chunks are padded to an even size
    return None


def file_tokens(spec: Mapping[str, Any], lower: bool = False) -> int:
    """Tokens of a file's data (``file_data``, a base64 data URL); the caller counts its text fields.

    Args:
        spec: chat's ``file`` object, or a Responses API ``input_file`` part.
        lower: count nothing (a file's cost cannot be bounded from below without reading it).
    """
    data = spec.get("file_data")
    if lower or not isinstance(data, str):
        return 0
    payload = _data_url_payload(data)
    return math.ceil(_decoded_size(payload if payload is not None else data) / _FILE_BYTES_PER_TOKEN)


def _decoded_size(data: str) -> int:
    """Bytes that base64 text decodes to, without decoding it."""
    return max(0, len(data) * 3 // 4 - data.count("=", -2))
