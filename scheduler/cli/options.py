"""What the commands share: argument types, defaults, the API key and base URL, and how errors are said."""

from __future__ import annotations

import argparse
import os
import sys

from ..logs import register_secret

__all__ = ["DEFAULT_MODEL", "UsageError", "api_settings", "dollars", "fail", "positive_int", "seconds"]

DEFAULT_MODEL = "gpt-4o-mini"


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


def dollars(text: str) -> float:
    """argparse type: a number of US dollars, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of dollars: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def api_settings(base_url: str | None) -> tuple[str, str | None]:
    """The API key (from ``OPENAI_API_KEY``, registered for redaction) and base URL (the flag, else
    ``OPENAI_BASE_URL``, else the SDK's default).

    Raises:
        UsageError: no key is set.
    """
    key = os.environ.get("OPENAI_API_KEY", "")
    if not key:
        raise UsageError("set OPENAI_API_KEY to your API key (or try the built-in mock server: --mock)")
    register_secret(key)
    return key, base_url or os.environ.get("OPENAI_BASE_URL") or None


def fail(command: str, message: str, code: int = 2) -> int:
    """Say ``message`` as the command's error on stderr; returns ``code``."""
    print(f"scheduler {command}: error: {message}", file=sys.stderr)
    return code
