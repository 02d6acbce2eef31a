"""Built-in OpenAI-compatible mock server that enforces rate limits like the real OpenAI API."""

from __future__ import annotations

from .config import MockConfig, add_mock_arguments, config_from_args
from .ratelimit import RateLimiter, Refusal, TokenBucket, format_duration
from .server import MockServer, serve

__all__ = [
    "MockConfig",
    "MockServer",
    "RateLimiter",
    "Refusal",
    "TokenBucket",
    "add_mock_arguments",
    "config_from_args",
    "format_duration",
    "serve",
]
