"""Built-in OpenAI-compatible mock server that enforces rate limits like the real OpenAI API.

It also speaks other providers' rate-limit dialects (Azure OpenAI, Anthropic, a LiteLLM proxy, self-hosted
servers without limits), limits per API key and per model, and injects faults on demand: at rates, or scripted
with `MockServer.inject()` / ``POST /mock/faults``.
"""

from __future__ import annotations

from .config import KeyLimits, MockConfig, add_mock_arguments, config_from_args
from .faults import FAULTS
from .parse import embedding_of
from .ratelimit import RateLimiter, Refusal, TokenBucket, format_duration
from .server import MockServer, serve

__all__ = [
    "FAULTS",
    "KeyLimits",
    "MockConfig",
    "MockServer",
    "RateLimiter",
    "Refusal",
    "TokenBucket",
    "add_mock_arguments",
    "config_from_args",
    "embedding_of",
    "format_duration",
    "serve",
]
