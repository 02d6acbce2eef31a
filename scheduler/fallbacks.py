"""Fallback models: where a job goes when its model is unavailable (404) or keeps failing (retries exhausted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .limits import Limits

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from .transport import Transport

__all__ = ["Fallback"]


@dataclass(frozen=True, slots=True)
class Fallback:
    """A model to try when the one before it is unavailable (404) or keeps failing (retries exhausted).

    Each fallback has its own rate-limit buckets. ``client`` points it at another endpoint (default: the
    pool's); ``limits`` are its limits (default: learned from its first response's headers).
    """

    model: str
    client: AsyncOpenAI | None = None
    limits: Limits | None = None
    #: a seam for tests, like Pool(transport=...)
    transport: Transport | None = None
