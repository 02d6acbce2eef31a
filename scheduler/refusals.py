"""What a refused request means, and how long it asks us to wait, in each provider's dialect.

A 429 (or 503/529) is a rate limit, a spent window, a shortage of capacity, an exhausted quota or a request too
large: each asks for something else of the pool (pause, wait for the window, back off, stop, fail the job).
:func:`refusal_kind` tells them apart from the status, headers and body; :func:`retry_after_s` reads the wait a
refusal names, wherever the dialect puts it. Pure, like :mod:`scheduler.dialects`, whose docstring lists the
dialects and the sources these rules come from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .dialects import (
    MAX_WAIT_S,
    Dialect,
    Dimension,
    duration_s,
    header_count,
    header_number,
    lower_headers,
    unix_time,
)
from .retry import is_quota_code

__all__ = ["Refusal", "RefusalKind", "refusal_kind", "retry_after_s"]

#: what a refused request means:
#:
#: - ``rate_limit``: a limit is spent for now; slow down and retry after the server's wait
#: - ``window_spent``: a fixed window is spent (LiteLLM); wait for the next window, do not burn the job's attempts
#: - ``capacity``: the provider is short of capacity (flex ``Resource Unavailable``, Anthropic 529, 503, LiteLLM
#:   "No deployments available"); retry later, but it says nothing about our rate
#: - ``quota``: money, not rate (``insufficient_quota``, billing codes, Anthropic's spend cap); never retry
#: - ``too_large``: this request alone exceeds the whole limit; waiting cannot help
#: - ``other``: not a refusal this module knows
RefusalKind = Literal["rate_limit", "window_spent", "capacity", "quota", "too_large", "other"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a refused request means."""

    kind: RefusalKind
    #: the limit it was about, when the answer says
    dimension: Dimension | None = None
    #: a daily limit (OpenAI's RPD/TPD): the wait may be hours
    per_day: bool = False


# -- refusals ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Error:
    """The parts of an error body that tell what it means, lower-cased."""

    codes: tuple[str, ...]
    message: str


def _error(body: Any) -> _Error:
    if isinstance(body, bytes | bytearray | str):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body.decode("utf-8", "replace") if isinstance(body, bytes | bytearray) else body
            return _Error((), text[:4096].lower())
    codes: list[str] = []
    messages: list[str] = []
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            for key in ("code", "type"):
                _add_code(codes, err.get(key))
            details = err.get("details")
            if isinstance(details, dict):
                _add_code(codes, details.get("error_code"))
            _add_text(messages, err.get("message"))
        else:
            _add_text(messages, err)
        _add_text(messages, body.get("detail"))  # FastAPI's HTTPException shape
        _add_text(messages, body.get("message"))
    elif isinstance(body, list) and body and isinstance(body[0], dict):  # some gateways wrap the error in a list
        return _error(body[0])
    return _Error(tuple(codes), " ".join(messages)[:4096].lower())


def _add_code(codes: list[str], value: object) -> None:
    if isinstance(value, str | int) and not isinstance(value, bool):
        codes.append(str(value).lower())


def _add_text(messages: list[str], value: object) -> None:
    if isinstance(value, str):
        messages.append(value)


def _quota(err: _Error) -> bool:
    # retry.py owns the billing codes; Anthropic's spend cap rides on error.details.error_code.
    return any(is_quota_code(code) or code == "enforced_spend_limit_reached" for code in err.codes)


_CAPACITY_CODES = frozenset({"resource_unavailable", "overloaded_error", "server_is_overloaded", "capacity_exceeded"})
_CAPACITY_TEXT = ("resource unavailable", "no deployments available", "overloaded")
_LITELLM_LIMITER = re.compile(
    r"deployment over (?:defined|user-defined) (?:(rpm|tpm) limit|ratelimit)"
    r"|model rate limit exceeded"
    r"|rate limit exceeded for [a-z_]+: .*limit type: (requests|tokens|max_parallel_requests)"
    r"|max parallel request limit reached"
    r"|litellm rate limit handler"
)
_OPENAI_UNIT = re.compile(r"on (requests|tokens) per (min|day)")
_TRY_AGAIN_GO = re.compile(r"try again in ((?:\d+(?:\.\d+)?(?:h|ms|us|µs|μs|ns|m|s))+)(?![a-z])")
_TRY_AGAIN = re.compile(
    r"(?:try again in|retry after|retry in)\s+(\d+(?:\.\d+)?)\s*"
    r"(milliseconds?|ms|seconds?|secs?|s|minutes?|mins?)(?![a-z])"
)
_UNIT_S = {"ms": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3, "minute": 60.0, "minutes": 60.0, "min": 60.0,
           "mins": 60.0}


def _litellm_limiter(err: _Error) -> Refusal | None:
    """LiteLLM's own limiter and router refusals."""
    found = _LITELLM_LIMITER.search(err.message)
    if found is None:
        return None
    if found[2] == "max_parallel_requests":
        return Refusal("rate_limit", "in_flight")
    hint = found[1] or found[2] or ""
    dimension: Dimension | None = "requests" if hint in ("rpm", "requests") else "tokens" if hint else None
    if dimension is None:
        dimension = _litellm_v1_dimension(err.message) or ("tokens" if "tpm" in err.message else None)
    return Refusal("window_spent", dimension)


# LiteLLM 1.108.7's router, its minute spent (benchmarks/litellm/observed.md): "litellm.RateLimitError: No
# deployments available for selected model. ... Deployments={'<id>': {'current_tpm': N, 'tpm_limit': N,
# 'current_rpm': N, 'rpm_limit': N}}". It refuses when count + 1 reaches the RPM, so 599 of 600 is "spent".
_ROUTER_COUNTS = re.compile(r"'current_(rpm|tpm)': (\d+), '\1_limit': (\d+)")


def _litellm_router_spent(err: _Error) -> Refusal | None:
    if "no deployments available" not in err.message:
        return None
    counts = {unit: (int(current), int(limit)) for unit, current, limit in _ROUTER_COUNTS.findall(err.message)}
    if not counts:
        return None  # the router's cool-down ("Try again in N seconds"): capacity, not our rate
    rpm = counts.get("rpm", (0, 0))
    dimension: Dimension | None = "requests" if rpm[1] and rpm[0] + 1 >= rpm[1] else "tokens" if (
        counts.get("tpm", (0, 0))[1]) else None
    return Refusal("window_spent", dimension)


_V1_COUNTS = re.compile(r"current (rpm|tpm): (\d+), \1 limit: (\d+)")


def _litellm_v1_dimension(message: str) -> Dimension | None:
    for unit, current, limit in _V1_COUNTS.findall(message):
        if int(current) >= int(limit):
            return "requests" if unit == "rpm" else "tokens"
    return None


def _dimension(err: _Error, h: Mapping[str, str]) -> tuple[Dimension | None, bool]:
    """Which limit a rate-limit refusal was about, and whether it is a daily one."""
    text = err.message
    unit = _OPENAI_UNIT.search(text)
    if unit is not None:  # OpenAI: "on tokens per min (TPM)", "on requests per day (RPD)"
        return ("requests" if unit[1] == "requests" else "tokens"), unit[2] == "day"
    for code in err.codes:  # OpenAI's error.type
        if code in ("requests", "tokens") or code.startswith("tokens_"):
            return ("requests" if code == "requests" else "tokens"), False
    # Anthropic names the bucket in words; Azure says "token rate limit" / "call rate limit".
    for needle, dimension in _WORDED:
        if needle in text:
            return dimension, False
    policy = h.get("policy-id", "")
    if policy.startswith("DeploymentRatelimit"):
        return ("tokens" if policy.endswith("Token") else "requests"), False
    empty = [dim for dim, name in _REMAINING_HEADERS if header_count(h.get(name)) == 0]
    return (empty[0] if len(set(empty)) == 1 else None), False


_WORDED: tuple[tuple[str, Dimension], ...] = (
    ("input tokens per minute", "input_tokens"), ("output tokens per minute", "output_tokens"),
    ("requests per minute", "requests"), ("token rate limit", "tokens"), ("call rate limit", "requests"),
)
_REMAINING_HEADERS: tuple[tuple[Dimension, str], ...] = (
    ("requests", "x-ratelimit-remaining-requests"), ("tokens", "x-ratelimit-remaining-tokens"),
    ("requests", "anthropic-ratelimit-requests-remaining"),
    ("input_tokens", "anthropic-ratelimit-input-tokens-remaining"),
    ("output_tokens", "anthropic-ratelimit-output-tokens-remaining"),
)


def refusal_kind(status: int, headers: Mapping[str, str], body: Any, dialect: Dialect | None) -> Refusal:
    """What a 429, 503 or 529 means (see :data:`RefusalKind`); any other status is ``other``.

    Args:
        status: the HTTP status.
        headers: the answer's headers.
        body: the parsed JSON body, or its raw text/bytes.
        dialect: the endpoint's dialect, if known.
    """
    if status not in (429, 503, 529):
        return Refusal("other")
    h = lower_headers(headers)
    err = _error(body)
    if _quota(err):
        return Refusal("quota")
    if "slow_down" in err.codes:  # OpenAI: traffic ramped too fast (429, formerly 503): a sign to slow down
        return Refusal("rate_limit")
    spent = _litellm_router_spent(err)
    if spent is not None:
        return spent
    if any(code in _CAPACITY_CODES for code in err.codes) or any(t in err.message for t in _CAPACITY_TEXT):
        return Refusal("capacity")
    if status != 429:
        return Refusal("capacity")
    limiter = _litellm_limiter(err)
    if limiter is not None:
        return limiter
    dimension, per_day = _dimension(err, h)
    if "request too large" in err.message:
        return Refusal("too_large", dimension or "tokens", per_day)
    relayed = "ratelimiterror" in err.message or any(name.startswith("llm_provider-") for name in h)
    if dialect == "litellm" and dimension is None and not relayed:
        # LiteLLM's own 429s carry no x-ratelimit-* and no retry-after: its window is spent. A 429 with the
        # provider's headers (llm_provider-*) or LiteLLM's RateLimitError wrapper is the provider's, relayed.
        return Refusal("window_spent")
    return Refusal("rate_limit", dimension, per_day)


# -- waits ---------------------------------------------------------------------------------------------------------


def _ms(text: str | None) -> float | None:
    number = header_number(text)
    return number / 1000.0 if number is not None and 0 <= number <= MAX_WAIT_S * 1000 else None


def _seconds_or_date(text: str | None, now_unix: float) -> float | None:
    if text is None:
        return None
    number = header_number(text)
    if number is not None:
        return number if 0 <= number <= MAX_WAIT_S else None
    moment = unix_time(text)
    if moment is None:
        return None
    wait = moment - now_unix
    return max(0.0, wait) if wait <= MAX_WAIT_S else None


def _first(values: Iterable[float | None]) -> float | None:
    return next((value for value in values if value is not None), None)


def _body_hint_s(message: str) -> float | None:
    """The wait a message names: "Please try again in 1.146s" (OpenAI), "Please retry after 33 seconds" (Azure),
    "Try again in 27.5 seconds" (LiteLLM's router)."""
    found = _TRY_AGAIN_GO.search(message)
    if found is not None:
        return duration_s(found[1])
    found = _TRY_AGAIN.search(message)
    if found is None:
        return None
    seconds = float(found[1]) * _UNIT_S.get(found[2], 1.0)
    return seconds if math.isfinite(seconds) and 0 <= seconds <= MAX_WAIT_S else None


def _next_minute_s(h: Mapping[str, str]) -> float | None:
    """Seconds from the answer's ``date`` to the next calendar minute (LiteLLM counts per calendar minute)."""
    moment = unix_time(h.get("date", "")) if h.get("date") else None
    if moment is None:
        return None
    return 60.0 - moment % 60.0


def retry_after_s(
    headers: Mapping[str, str], body: Any, dialect: Dialect | None, *, now_unix: float
) -> float | None:
    """Seconds a refusal asks us to wait, or None when it does not say.

    In order: ``retry-after-ms`` and ``x-ms-retry-after-ms`` (milliseconds), ``retry-after`` (seconds or an
    HTTP date), LiteLLM's relayed ``llm_provider-retry-after(-ms)``, Azure's ``x-rate-limit-reset-tokens`` (the
    only hint some of its 429s carry), the wait the body's message names, and for a LiteLLM window-spent refusal
    without any of these, the seconds until the next calendar minute by the answer's ``date``.

    Args:
        headers: the answer's headers.
        body: the parsed JSON body, or its raw text/bytes.
        dialect: the endpoint's dialect, if known.
        now_unix: wall-clock seconds now, for HTTP dates.
    """
    h = lower_headers(headers)
    err = _error(body)
    if _litellm_router_spent(err) is not None or _litellm_limiter(err) is not None:
        # LiteLLM counts per calendar minute and says "60" whatever is left of it: the minute's turn, by our
        # clock (its `date` lags by seconds), is the wait.
        return 60.0 - now_unix % 60.0 + 0.5
    wait = _first((
        _ms(h.get("retry-after-ms")),
        _ms(h.get("x-ms-retry-after-ms")),
        _seconds_or_date(h.get("retry-after"), now_unix),
        _ms(h.get("llm_provider-retry-after-ms")),
        _seconds_or_date(h.get("llm_provider-retry-after"), now_unix),
    ))
    if wait is not None:
        return wait
    if dialect == "azure" and h.get("x-rate-limit-reset-tokens"):
        wait = duration_s(h["x-rate-limit-reset-tokens"])
        if wait is not None:
            return wait
    wait = _body_hint_s(err.message)
    if wait is not None:
        return wait
    if dialect == "litellm":
        return _next_minute_s(h)
    return None
