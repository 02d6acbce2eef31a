"""What the commands share: argument types, defaults, the API key and base URL, and how errors are said."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

from ..limits import Limits
from ..logs import register_secret

__all__ = [
    "DEFAULT_MODEL", "NO_KEY", "TIER_CHOICES", "UsageError", "api_settings", "batch_state", "deadline", "dollars",
    "fail", "model_limit", "positive_int", "reserve_share", "seconds", "share",
]

DEFAULT_MODEL = "gpt-4o-mini"
#: the key sent to a server of your own when OPENAI_API_KEY is not set (vLLM's documentation uses it)
NO_KEY = "EMPTY"


#: what ``--tier`` takes: a service tier, or ``auto`` (the Batch API, then online before a deadline)
TIER_CHOICES = ("standard", "flex", "batch", "auto")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_S = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0}


class UsageError(Exception):
    """Unusable input or arguments: the command exits 2 with this message."""


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def model_limit(text: str) -> tuple[str, Limits]:
    """argparse type: ``MODEL=RPM,TPM`` (either may be empty: ``gpt-4o=,2000000``), a model's own limits."""
    model, sep, numbers = text.partition("=")
    rpm, comma, tpm = numbers.partition(",")
    try:
        if not model or not sep or not comma:
            raise ValueError
        limits = Limits(rpm=int(rpm) if rpm.strip() else None, tpm=int(tpm) if tpm.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL=RPM,TPM with positive integers, got {text!r}") from None
    if limits.rpm is None and limits.tpm is None:
        raise argparse.ArgumentTypeError(f"{text!r} gives no limit")
    return model, limits


def reserve_share(text: str) -> tuple[int, float]:
    """argparse type: ``PRIORITY=SHARE`` (``0=0.2``: a fifth of each limit kept for jobs of priority 0 or lower)."""
    priority, sep, share = text.partition("=")
    try:
        if not sep:
            raise ValueError
        level, value = int(priority), float(share)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRIORITY=SHARE, e.g. 0=0.2, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"the share must be between 0 and 1 (exclusive), got {share}")
    return level, value


def dollars(text: str) -> float:
    """argparse type: a number of US dollars, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of dollars: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def share(text: str) -> float:
    """argparse type: a share between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def deadline(text: str) -> float:
    """argparse type: when work must be done, as Unix time: a duration from now (``6h``, ``90m``, ``45s``,
    ``1h30m``, ``2d``) or an ISO 8601 time (``2025-06-01T18:00``, local time unless it names its zone)."""
    compact = text.strip().lower().replace(" ", "")
    if compact and _DURATION.sub("", compact) == "":
        return time.time() + sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION.findall(compact))
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration (6h, 90m, 45s, 1h30m) nor an ISO time (2025-06-01T18:00): {text!r}") from None
    return moment.timestamp()  # a naive time is local time


def batch_state(output: str | os.PathLike[str]) -> str:
    """The batch journal beside an output file: ``OUT.batches`` (its request files go in ``OUT.batches.parts``)."""
    return os.fspath(output) + ".batches"


def api_settings(base_url: str | None) -> tuple[str, str | None]:
    """The API key (from ``OPENAI_API_KEY``, registered for redaction) and base URL (the flag, else
    ``OPENAI_BASE_URL``, else the SDK's default).

    A server of your own (vLLM, Ollama, a gateway: a base URL is given) may need no key: without
    ``OPENAI_API_KEY`` it gets :data:`NO_KEY`, a placeholder the SDK accepts.

    Raises:
        UsageError: no key is set, and the API is OpenAI's.
    """
    key = os.environ.get("OPENAI_API_KEY", "")
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    if not key:
        if base_url is None:
            raise UsageError("set OPENAI_API_KEY to your API key (or try the built-in mock server: --mock)")
        return NO_KEY, base_url
    register_secret(key)
    return key, base_url


def fail(command: str, message: str, code: int = 2) -> int:
    """Say ``message`` as the command's error on stderr; returns ``code``."""
    print(f"scheduler {command}: error: {message}", file=sys.stderr)
    return code
