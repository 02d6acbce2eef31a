"""Logging: the library only calls ``structlog.get_logger``; applications (and the CLI) configure it.

:func:`redact_secrets` is a structlog processor that masks anything that looks like an API key, and
:func:`redact` does the same to a message. The pool runs every message that came from a server or an exception
through :func:`redact` before it reaches a log, a result or an error.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

__all__ = ["configure_logging", "redact", "redact_secrets", "redact_value", "traceback_text"]

# OpenAI keys (sk-..., sk-proj-...), bearer tokens, and key=value pairs that name a key.
_SECRET = re.compile(
    r"(sk-[A-Za-z0-9_\-*]{6,})|(Bearer\s+[A-Za-z0-9._\-*]{6,})|((?:api[_-]?key|authorization)\W{1,3})[^\s,;\"']{6,}",
    re.IGNORECASE,
)
_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this exact value too (the pool registers the client's key, whatever its shape)."""
    if value and len(value) >= 6:
        _extra_secrets.add(value)


def redact(text: str) -> str:
    """``text`` with anything that looks like a key replaced by ``***``."""
    for secret in _extra_secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return _SECRET.sub(lambda m: (m.group(3) or "") + "***", text)


def redact_value(value: Any) -> Any:
    """``value`` (a JSON-like body) with every string in it redacted, keys included; other values as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(item) for item in value]
    return value


def traceback_text(exc: BaseException) -> str:
    """The exception's traceback as text, redacted: logged as a plain field, so no key reaches a log however the
    application renders exceptions."""
    import traceback

    return redact("".join(traceback.format_exception(exc)))


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact every string of an event, nested ones and formatted tracebacks included."""
    for key, value in event_dict.items():
        if isinstance(value, str | dict | list):
            event_dict[key] = redact_value(value)
    return event_dict


def configure_logging(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """The CLI's logging set-up: console lines on a terminal, JSON lines (orjson) otherwise, to stderr."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    logger_factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer) if json else structlog.PrintLoggerFactory(
        sys.stderr
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks become text before redaction, so a key quoted in an exception is masked too.
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
