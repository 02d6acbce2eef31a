"""Each provider's rate-limit headers and refusals, read as the provider means them, into one internal form.

Providers state what is left of their limits in different dialects. This module turns one answer's headers into
a :class:`LimitReport` (per-minute limits, what is left, over which window, and what the server counts against
its token limit), its wait hints into seconds (:func:`retry_after_s`), and a 429/503/529 into what it means
(:func:`refusal_kind`). It is pure: time comes in as ``now_unix`` (wall-clock seconds, because the providers'
reset times and HTTP dates are wall-clock times).

The dialects, in short:

- ``openai``: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; one-minute token buckets; reset is a Go
  duration ("6m0s", "20ms"); the token limit is charged the admission estimate (prompt + max_tokens), kept.
- ``azure``: the same names, but ``limit-requests`` counts a 10 s window (RPM / 6) and limits may be absent
  (remaining only) or -1; tokens per minute, charged the estimate including max_tokens; reset in integer
  seconds; 429s add ``retry-after-ms`` / ``x-ms-retry-after-ms``.
- ``anthropic``: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}``;
  one-minute token buckets; reset is an RFC 3339 time; input tokens counted as sent, output tokens estimated from
  max_tokens and corrected to what was generated.
- ``litellm``: the proxy's own ``x-ratelimit-<scope>-{remaining,limit}-{requests,tokens}`` over a fixed 60 s
  window, tokens counted from usage after the answer; plain ``x-ratelimit-*`` copy the provider behind it and
  ``llm_provider-*`` are the provider's raw headers.
- ``none``: nothing (vLLM, Ollama, llama.cpp): concurrency is the limit, see :mod:`scheduler.concurrency`.

Sources (read 2026-11):

- OpenAI: rate-limit guide, "Rate limits in headers"
  (https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers): limit/remaining/reset for
  requests and tokens, reset as "1s", "6m0s". 429 bodies: ``{"error": {"message": "Rate limit reached for gpt-4o
  in organization org-... on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000. Please try again in
  2s. ...", "type": "tokens", "code": "rate_limit_exceeded"}}``; "Request too large for ... on tokens per min
  (TPM): Limit 30000, Requested 34307" when one request exceeds the whole limit; ``slow_down`` (429, formerly
  503) when traffic ramps too fast; 503 ``server_is_overloaded``
  (https://learn.microsoft.com/microsoft-cloud/dev/dev-proxy/concepts/openai-rate-limit-reached).
- OpenAI flex processing (https://developers.openai.com/api/docs/guides/flex-processing, "Resource unavailable
  errors"): "Flex processing may sometimes lack sufficient resources to handle your requests, resulting in a
  ``429 Resource Unavailable`` error code. You will not be charged when this occurs." The guide names no JSON
  ``code``; client code in the wild matches ``error.code == "resource_unavailable"``, so both are matched.
- Azure OpenAI: quota guide (https://learn.microsoft.com/azure/ai-services/openai/how-to/quota, "Understanding
  rate limits"): RPM is evaluated "over a small period of time, typically 1 or 10 seconds"; TPM counts an
  estimate including max_tokens. A 120 RPM deployment answers ``x-ratelimit-limit-requests: 20``
  (https://learn.microsoft.com/answers/questions/2265464) and a 300 RPM one starts at
  ``x-ratelimit-remaining-requests: 50`` (https://learn.microsoft.com/answers/questions/2156987): the request
  headers count a 10 s window. Older API versions send only ``x-ratelimit-remaining-{requests,tokens}``
  (Azure/azure-rest-api-specs#26884, with a recorded response: ``apim-request-id``, ``x-ms-region``,
  ``azureml-model-session``, ``x-ms-rai-invoked``); the Responses API has sent ``-1`` for limit and remaining
  (openai/openai-dotnet#838). 429s carry ``retry-after``/``retry-after-ms`` (the openai SDK reads both), at times
  only ``x-rate-limit-reset-tokens`` with ``policy-id: DeploymentRatelimit-Token`` (openai/openai-python#937),
  and bodies such as ``{"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation
  under Azure OpenAI API version 2024-02-15-preview have exceeded token rate limit of your current OpenAI S0
  pricing tier. Please retry after 33 seconds. ..."}}`` ("call rate limit" for requests).
  ``x-ms-retry-after-ms`` is Azure's common throttling header (milliseconds, as documented for Cosmos DB).
- Anthropic: rate-limit guide (https://docs.anthropic.com/en/api/rate-limits, now
  https://platform.claude.com/docs/en/api/rate-limits): token-bucket limits per minute on requests, input tokens
  (ITPM) and output tokens (OTPM); "OTPM rate limits are estimated based on max_tokens at the beginning of each
  request, and the estimate is adjusted at the end of the request to reflect the actual number of output tokens
  used"; cache reads do not count toward ITPM for most models; token ``remaining`` is "rounded to the nearest
  thousand"; reset is "provided in RFC 3339 format", the time the bucket is full again. A recorded response
  (tidyllm test fixture, 2025-08-21) shows ``tokens-limit: 96000`` beside input 80000 and output 16000: the
  combined header is their sum. 429 ``rate_limit_error`` ("This request would exceed the rate limit for your
  organization (...) of 40,000 input tokens per minute. ..."), ``error.details.error_code ==
  "enforced_spend_limit_reached"`` for the monthly spend cap (do not retry), 529 ``overloaded_error``
  (https://learn.microsoft.com/microsoft-cloud/dev/dev-proxy/concepts/anthropic-529-overloaded-error).
- LiteLLM proxy: response headers (https://docs.litellm.ai/docs/proxy/response_headers); source
  (BerriAI/litellm): ``litellm_core_utils/llm_response_utils/get_headers.py`` copies the provider's
  ``x-ratelimit-{limit,remaining}-{requests,tokens}`` (no reset) and forwards every provider header as
  ``llm_provider-<name>``; ``proxy/hooks/_rate_limit_headers.py`` and ``parallel_request_limiter_v3.py`` add
  ``x-ratelimit-<scope>-{remaining,limit}-{requests,tokens,max_parallel_requests}`` for the key/user/team limits,
  counted over a 60 s window (``LITELLM_RATE_LIMIT_WINDOW_SIZE``), tokens counted from usage after the answer;
  ``common_request_processing.py`` adds ``x-litellm-*`` (call id, model id, key rpm/tpm limits, cost). Router
  deployment limits count per calendar minute (keys ``...:rpm:%H-%M``, UTC) and refuse with "Deployment over
  defined rpm limit=N. current usage=M"; all deployments cooling down gives "No deployments available for
  selected model, Try again in 60 seconds. Passed model=...". Key limits refuse with "Rate limit exceeded for
  api_key: ... Limit type: tokens. Current limit: N, Remaining: 0. Limit resets at: ..." (v3) or "... Max
  parallel request limit reached ..." (v1).

Garbage never raises: a non-numeric, NaN, infinite, negative or absurd value is ignored; a limit of 0 or less
means "not stated" (Azure's ``-1``), never "limit 0".
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import orjson

from .retry import _is_quota_code

__all__ = [
    "AZURE_REQUEST_WINDOW_S",
    "DIALECTS",
    "LITELLM_WINDOW_S",
    "Charges",
    "Dialect",
    "DialectTracker",
    "Dimension",
    "LimitReport",
    "Refill",
    "Refusal",
    "RefusalKind",
    "Window",
    "detect_dialect",
    "read_limits",
    "refusal_kind",
    "retry_after_s",
]

Dialect = Literal["openai", "azure", "anthropic", "litellm", "none"]
#: every dialect, for validating ``Endpoint(dialect=...)``
DIALECTS: tuple[Dialect, ...] = get_args(Dialect)

#: ``continuous``: a token bucket refilled at limit/60 per second; ``fixed_window``: a counter emptied when its
#: window ends (``reset_s`` says when, if the server says)
Refill = Literal["continuous", "fixed_window"]
#: what the server counts against a token limit: ``reservation`` keeps the admission estimate (prompt plus the
#: output cap); ``usage`` ends up counting what was really used (unused output given back)
Charges = Literal["reservation", "usage"]
#: which limit a refusal was about; ``in_flight`` is a concurrency cap (LiteLLM's ``max_parallel_requests``)
Dimension = Literal["requests", "tokens", "input_tokens", "output_tokens", "in_flight"]
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

# Larger counts than this are garbage, not limits (OpenAI's largest token limits are in the hundreds of millions).
_MAX_COUNT = 1e12
# Waits beyond a week are garbage, not advice.
_MAX_WAIT_S = 7 * 86_400.0
# A bare number this large in a reset header is a Unix time, not a duration.
_EPOCH_MIN = 1e9
# Azure's request headers count this window (RPM / 6); its token headers count a minute.
AZURE_REQUEST_WINDOW_S = 10.0
# LiteLLM's limiter window (LITELLM_RATE_LIMIT_WINDOW_SIZE, default 60) and its router's calendar minute.
LITELLM_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Window:
    """One limit as one answer reports it.

    ``limit`` is per minute whatever the window; ``remaining`` counts against :attr:`capacity`, the most the
    server's counter holds (a minute's worth for a one-minute bucket, a sixth of the RPM for Azure's 10 s request
    window). Either half may be missing (the server did not say, or said garbage).
    """

    #: the rate, per minute (None: not stated)
    limit: float | None
    #: what the server had left when it answered, requests or tokens out of :attr:`capacity` (None: not stated)
    remaining: float | None
    #: the span the server's counter covers, in seconds
    window_s: float = 60.0
    #: seconds until the bucket is full again or the window resets (information only: it does not say when the
    #: next request fits)
    reset_s: float | None = None
    refill: Refill = "continuous"
    charges: Charges = "reservation"
    #: the figures are the provider's behind a gateway: shared with the gateway's other clients, and perhaps one
    #: of several deployments; information, not a limit to adopt
    upstream: bool = False

    @property
    def capacity(self) -> float | None:
        """The most ``remaining`` can be: the limit over the counter's window."""
        return None if self.limit is None else self.limit * self.window_s / 60.0


@dataclass(frozen=True, slots=True)
class LimitReport:
    """What one answer says about the limits, in per-minute units."""

    dialect: Dialect
    requests: Window | None = None
    #: combined input and output tokens (OpenAI, Azure, LiteLLM). Anthropic's combined header is the sum of its
    #: input and output limits: admit against ``input_tokens`` and ``output_tokens`` when they are present
    tokens: Window | None = None
    #: Anthropic's ITPM
    input_tokens: Window | None = None
    #: Anthropic's OTPM
    output_tokens: Window | None = None
    #: a cap on requests in flight (LiteLLM's ``max_parallel_requests``)
    max_in_flight: int | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a refused request means."""

    kind: RefusalKind
    #: the limit it was about, when the answer says
    dimension: Dimension | None = None
    #: a daily limit (OpenAI's RPD/TPD): the wait may be hours
    per_day: bool = False


# -- detection ---------------------------------------------------------------------------------------------------

_AZURE_SIGNS = frozenset({
    "apim-request-id", "x-ms-region", "x-ms-client-request-id", "x-ms-rai-invoked", "x-ms-deployment-name",
    "x-ms-retry-after-ms", "x-rate-limit-reset-tokens", "x-rate-limit-reset-requests",
})
_OPENAI_RATE_HEADERS = frozenset(
    f"x-ratelimit-{half}-{dim}" for half in ("limit", "remaining", "reset") for dim in ("requests", "tokens")
)
_LITELLM_SCOPED = re.compile(
    r"x-ratelimit-([a-z0-9_]+)-(remaining|limit)-(requests|tokens|max_parallel_requests)"
)


def detect_dialect(headers: Mapping[str, str]) -> Dialect | None:
    """The dialect an answer's headers show, or None when they show none.

    None means "cannot tell", not "none": an error page from an OpenAI server carries no sign either. Use
    :class:`DialectTracker` to learn an endpoint's dialect over several answers.
    """
    return _detect(_lower(headers))


def _detect(h: Mapping[str, str]) -> Dialect | None:
    names = list(h)
    # Gateways first: LiteLLM forwards its provider's headers too, renamed llm_provider-*.
    if any(n.startswith(("x-litellm-", "llm_provider-")) or _LITELLM_SCOPED.fullmatch(n) for n in names):
        return "litellm"
    if any(n.startswith("anthropic-") for n in names):
        return "anthropic"
    if (
        any(n in _AZURE_SIGNS or n.startswith("azureml-") for n in names)
        or h.get("policy-id", "").startswith("DeploymentRatelimit")
    ):
        return "azure"
    if any(n.startswith("openai-") or n in _OPENAI_RATE_HEADERS for n in names):
        return "openai"
    return None


@dataclass(slots=True)
class DialectTracker:
    """Learns an endpoint's dialect from its answers; ``forced`` (``Endpoint(dialect=...)``) overrides.

    A sign in the headers sets the dialect. Answers without any sign never undo a learned dialect (an OpenAI
    error page has none); only ``settle_after`` successful answers in a row without a sign, before any sign was
    seen, conclude ``"none"``.
    """

    forced: Dialect | None = None
    #: unsigned successes that make the dialect "none"
    settle_after: int = 3
    learned: Dialect | None = field(init=False, default=None)
    _unsigned: int = field(init=False, default=0)

    @property
    def dialect(self) -> Dialect | None:
        """The dialect in force (None while still unknown)."""
        return self.forced if self.forced is not None else self.learned

    def observe(self, status: int, headers: Mapping[str, str]) -> Dialect | None:
        """Take in one answer; return the dialect in force after it."""
        if self.forced is not None or (self.learned is not None and (self.learned != "none" or not headers)):
            return self.dialect  # a sign, once seen, stays: no need to look again on every answer
        sign = detect_dialect(headers)
        if sign is not None:
            self.learned = sign
            self._unsigned = 0
        elif 200 <= status < 300 and self.learned is None:
            self._unsigned += 1
            if self._unsigned >= self.settle_after:
                self.learned = "none"
        return self.dialect


# -- values --------------------------------------------------------------------------------------------------------


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """Header names lower-cased, values stripped; anything that is not a string is dropped."""
    out: dict[str, str] = {}
    try:
        items = list(headers.items())
    except Exception:  # a broken mapping reads as no headers
        return out
    for name, value in items:
        if isinstance(name, str) and isinstance(value, str):
            out[name.strip().lower()] = value.strip()
    return out


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _count(text: str | None) -> float | None:
    """A remaining count: 0 is a real answer (the bucket is empty)."""
    number = _number(text)
    return number if number is not None and 0 <= number <= _MAX_COUNT else None


def _limit(text: str | None) -> float | None:
    """A limit: 0 or less means not stated (Azure sends -1), never "limit 0"."""
    number = _number(text)
    return number if number is not None and 0 < number <= _MAX_COUNT else None


_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|μs|ns|m|s)")
_GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:h|ms|us|µs|μs|ns|m|s))+")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}


def _duration_s(text: str) -> float | None:
    """Seconds from a bare number of seconds or a Go duration ("6m0s", "1.2s", "20ms")."""
    text = text.strip()
    seconds = _number(text)
    if seconds is None and _GO_DURATION.fullmatch(text):
        seconds = sum(float(m[1]) * _GO_UNITS[m[2]] for m in _GO_PART.finditer(text))
    return seconds if seconds is not None and 0 <= seconds <= _MAX_WAIT_S else None


def _unix_time(text: str) -> float | None:
    """A wall-clock time from RFC 3339 or an HTTP date (UTC when no zone is given)."""
    text = text.strip()
    try:
        moment = _dt.datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        moment = None
    if moment is not None:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_dt.UTC)
        try:
            return moment.timestamp()
        except (ValueError, OverflowError, OSError):
            return None
    try:
        parsed = email.utils.parsedate_tz(text)
        return None if parsed is None else float(email.utils.mktime_tz(parsed))
    except (ValueError, TypeError, OverflowError, IndexError):
        return None


def _until_s(text: str | None, now_unix: float) -> float | None:
    """Seconds until a reset stated as a duration, a Unix time, an RFC 3339 time or an HTTP date."""
    if not text:
        return None
    number = _number(text)
    if number is not None:
        seconds: float | None = number - now_unix if number >= _EPOCH_MIN else _duration_s(text)
    else:
        seconds = _duration_s(text)
        if seconds is None:
            moment = _unix_time(text)
            seconds = None if moment is None else moment - now_unix
    if seconds is None or not math.isfinite(seconds) or seconds > _MAX_WAIT_S:
        return None
    return max(0.0, seconds)


def _window(
    limit_text: str | None, remaining_text: str | None, reset_text: str | None, now_unix: float, *,
    window_s: float = 60.0, refill: Refill = "continuous", charges: Charges = "reservation", upstream: bool = False,
) -> Window | None:
    return _make_window(
        _limit(limit_text), _count(remaining_text), _until_s(reset_text, now_unix),
        window_s=window_s, refill=refill, charges=charges, upstream=upstream,
    )


def _make_window(
    limit: float | None, remaining: float | None, reset_s: float | None, *,
    window_s: float, refill: Refill, charges: Charges, upstream: bool,
) -> Window | None:
    """``limit`` is per ``window_s``; the window states it per minute."""
    if limit is None and remaining is None:
        return None
    if limit is not None and remaining is not None:
        remaining = min(remaining, limit)  # a counter never holds more than its size
    per_minute = None if limit is None else limit * 60.0 / window_s
    return Window(per_minute, remaining, window_s, reset_s, refill, charges, upstream)


# -- limits --------------------------------------------------------------------------------------------------------

_Windows = dict[str, Window]


def _read_openai(h: Mapping[str, str], now_unix: float, upstream: bool = False) -> _Windows:
    out: _Windows = {}
    for dim in ("requests", "tokens"):
        window = _window(
            h.get(f"x-ratelimit-limit-{dim}"), h.get(f"x-ratelimit-remaining-{dim}"),
            h.get(f"x-ratelimit-reset-{dim}"), now_unix, upstream=upstream,
        )
        if window is not None:
            out[dim] = window
    return out


def _read_azure(h: Mapping[str, str], now_unix: float, upstream: bool = False) -> _Windows:
    out: _Windows = {}
    requests = _window(
        h.get("x-ratelimit-limit-requests"), h.get("x-ratelimit-remaining-requests"),
        h.get("x-ratelimit-reset-requests") or h.get("x-rate-limit-reset-requests"), now_unix,
        # The 10 s window is what the headers count; converting it keeps a 120 RPM deployment at 120, not 20.
        window_s=AZURE_REQUEST_WINDOW_S, refill="fixed_window", upstream=upstream,
    )
    tokens = _window(
        h.get("x-ratelimit-limit-tokens"), h.get("x-ratelimit-remaining-tokens"),
        h.get("x-ratelimit-reset-tokens") or h.get("x-rate-limit-reset-tokens"), now_unix, upstream=upstream,
    )
    if requests is not None:
        out["requests"] = requests
    if tokens is not None:
        out["tokens"] = tokens
    return out


def _read_anthropic(h: Mapping[str, str], now_unix: float, upstream: bool = False) -> _Windows:
    out: _Windows = {}
    for dim in ("requests", "tokens", "input_tokens", "output_tokens"):
        prefix = "anthropic-ratelimit-" + dim.replace("_", "-")
        window = _window(
            h.get(f"{prefix}-limit"), h.get(f"{prefix}-remaining"), h.get(f"{prefix}-reset"), now_unix,
            charges="reservation" if dim == "requests" else "usage", upstream=upstream,
        )
        if window is not None:
            out[dim] = window
    return out


def _read_litellm(h: Mapping[str, str], now_unix: float) -> tuple[_Windows, int | None]:
    """The proxy's own limits where it states them, else its provider's (marked upstream)."""
    limits: dict[str, list[float]] = {"requests": [], "tokens": [], "max_parallel_requests": []}
    remaining: dict[str, list[float]] = {"requests": [], "tokens": []}
    for name, value in h.items():
        scoped = _LITELLM_SCOPED.fullmatch(name)
        if scoped is not None:
            half, kind = scoped[2], scoped[3]
            if half == "limit" and (number := _limit(value)) is not None:
                limits[kind].append(number)
            elif half == "remaining" and kind in remaining and (number := _count(value)) is not None:
                remaining[kind].append(number)
            continue
        for kind in remaining:  # the key's per-model limits: x-litellm-key-remaining-{requests,tokens}-<model>
            if name.startswith(f"x-litellm-key-remaining-{kind}") and (number := _count(value)) is not None:
                remaining[kind].append(number)
    for kind, name in (("requests", "x-litellm-key-rpm-limit"), ("tokens", "x-litellm-key-tpm-limit")):
        number = _limit(h.get(name))
        if number is not None:
            limits[kind].append(number)

    # Plain x-ratelimit-* are copies of the provider's when they equal the forwarded llm_provider-* twins;
    # otherwise they are the proxy's own key limits (its older limiter).
    provider = {name[len("llm_provider-"):]: value for name, value in h.items() if name.startswith("llm_provider-")}
    for kind in ("requests", "tokens"):
        plain_limit, plain_left = h.get(f"x-ratelimit-limit-{kind}"), h.get(f"x-ratelimit-remaining-{kind}")
        copied = (
            (plain_limit is None or plain_limit == provider.get(f"x-ratelimit-limit-{kind}"))
            and (plain_left is None or plain_left == provider.get(f"x-ratelimit-remaining-{kind}"))
        )
        if not copied:
            if (number := _limit(plain_limit)) is not None:
                limits[kind].append(number)
            if (number := _count(plain_left)) is not None:
                remaining[kind].append(number)

    out: _Windows = {}
    for kind in ("requests", "tokens"):
        # Several scopes (key, user, team, model) may limit one request: the tightest of each half governs.
        window = _make_window(
            min(limits[kind], default=None), min(remaining[kind], default=None),
            _until_s(h.get(f"x-ratelimit-reset-{kind}"), now_unix), window_s=LITELLM_WINDOW_S,
            refill="fixed_window", charges="reservation" if kind == "requests" else "usage", upstream=False,
        )
        if window is not None:
            out[kind] = window
    if provider:
        upstream_dialect = _detect(provider)
        reader = _READERS.get(upstream_dialect or "openai", _read_openai)
        for kind, window in reader(provider, now_unix, True).items():
            out.setdefault(kind, window)
    parallel = min(limits["max_parallel_requests"], default=None)
    return out, None if parallel is None else max(1, int(parallel))


_READERS: dict[str, Callable[[Mapping[str, str], float, bool], _Windows]] = {
    "openai": _read_openai, "azure": _read_azure, "anthropic": _read_anthropic,
}


def read_limits(headers: Mapping[str, str], dialect: Dialect | None, *, now_unix: float) -> LimitReport | None:
    """What one answer's headers say about the limits, or None when they carry no usable limit headers.

    Args:
        headers: the answer's headers (any case).
        dialect: the endpoint's dialect; None reads it from these headers.
        now_unix: wall-clock seconds now, for reset times stated as wall-clock times.
    """
    h = _lower(headers)
    if dialect is None:
        dialect = _detect(h)
    if dialect is None or dialect == "none":
        return None
    max_in_flight: int | None = None
    if dialect == "litellm":
        windows, max_in_flight = _read_litellm(h, now_unix)
    else:
        windows = _READERS[dialect](h, now_unix, False)
    if not windows and max_in_flight is None:
        return None
    return LimitReport(
        dialect, windows.get("requests"), windows.get("tokens"), windows.get("input_tokens"),
        windows.get("output_tokens"), max_in_flight,
    )


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
    return any(_is_quota_code(code) or code == "enforced_spend_limit_reached" for code in err.codes)


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
    empty = [dim for dim, name in _REMAINING_HEADERS if _count(h.get(name)) == 0]
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
    h = _lower(headers)
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
    number = _number(text)
    return number / 1000.0 if number is not None and 0 <= number <= _MAX_WAIT_S * 1000 else None


def _seconds_or_date(text: str | None, now_unix: float) -> float | None:
    if text is None:
        return None
    number = _number(text)
    if number is not None:
        return number if 0 <= number <= _MAX_WAIT_S else None
    moment = _unix_time(text)
    if moment is None:
        return None
    wait = moment - now_unix
    return max(0.0, wait) if wait <= _MAX_WAIT_S else None


def _first(values: Iterable[float | None]) -> float | None:
    return next((value for value in values if value is not None), None)


def _body_hint_s(message: str) -> float | None:
    """The wait a message names: "Please try again in 1.146s" (OpenAI), "Please retry after 33 seconds" (Azure),
    "Try again in 27.5 seconds" (LiteLLM's router)."""
    found = _TRY_AGAIN_GO.search(message)
    if found is not None:
        return _duration_s(found[1])
    found = _TRY_AGAIN.search(message)
    if found is None:
        return None
    seconds = float(found[1]) * _UNIT_S.get(found[2], 1.0)
    return seconds if math.isfinite(seconds) and 0 <= seconds <= _MAX_WAIT_S else None


def _next_minute_s(h: Mapping[str, str]) -> float | None:
    """Seconds from the answer's ``date`` to the next calendar minute (LiteLLM counts per calendar minute)."""
    moment = _unix_time(h.get("date", "")) if h.get("date") else None
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
    h = _lower(headers)
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
        wait = _duration_s(h["x-rate-limit-reset-tokens"])
        if wait is not None:
            return wait
    wait = _body_hint_s(err.message)
    if wait is not None:
        return wait
    if dialect == "litellm":
        return _next_minute_s(h)
    return None
