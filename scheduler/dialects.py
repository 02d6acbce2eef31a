"""Each provider's rate-limit headers, read as the provider means them, into one internal form.

Providers state what is left of their limits in different dialects. This module turns one answer's headers into
a :class:`LimitReport` (per-minute limits, what is left, over which window, and what the server counts against
its token limit); :mod:`scheduler.refusals` reads their refusals and wait hints with the same rules. It is pure:
time comes in as ``now_unix`` (wall-clock seconds, because the providers' reset times and HTTP dates are
wall-clock times).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

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
    "Window",
    "detect_dialect",
    "read_limits",
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

# Larger counts than this are garbage, not limits (OpenAI's largest token limits are in the hundreds of millions).
_MAX_COUNT = 1e12
# Waits beyond a week are garbage, not advice.
MAX_WAIT_S = 7 * 86_400.0
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
    return _detect(lower_headers(headers))


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


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
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


def header_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def header_count(text: str | None) -> float | None:
    """A remaining count: 0 is a real answer (the bucket is empty)."""
    number = header_number(text)
    return number if number is not None and 0 <= number <= _MAX_COUNT else None


def _limit(text: str | None) -> float | None:
    """A limit: 0 or less means not stated (Azure sends -1), never "limit 0"."""
    number = header_number(text)
    return number if number is not None and 0 < number <= _MAX_COUNT else None


_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|μs|ns|m|s)")
_GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:h|ms|us|µs|μs|ns|m|s))+")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}


def duration_s(text: str) -> float | None:
    """Seconds from a bare number of seconds or a Go duration ("6m0s", "1.2s", "20ms")."""
    text = text.strip()
    seconds = header_number(text)
    if seconds is None and _GO_DURATION.fullmatch(text):
        seconds = sum(float(m[1]) * _GO_UNITS[m[2]] for m in _GO_PART.finditer(text))
    return seconds if seconds is not None and 0 <= seconds <= MAX_WAIT_S else None


def unix_time(text: str) -> float | None:
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
    number = header_number(text)
    if number is not None:
        seconds: float | None = number - now_unix if number >= _EPOCH_MIN else duration_s(text)
    else:
        seconds = duration_s(text)
        if seconds is None:
            moment = unix_time(text)
            seconds = None if moment is None else moment - now_unix
    if seconds is None or not math.isfinite(seconds) or seconds > MAX_WAIT_S:
        return None
    return max(0.0, seconds)


def _window(
    limit_text: str | None, remaining_text: str | None, reset_text: str | None, now_unix: float, *,
    window_s: float = 60.0, refill: Refill = "continuous", charges: Charges = "reservation", upstream: bool = False,
) -> Window | None:
    return _make_window(
        _limit(limit_text), header_count(remaining_text), _until_s(reset_text, now_unix),
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
            elif half == "remaining" and kind in remaining and (number := header_count(value)) is not None:
                remaining[kind].append(number)
            continue
        for kind in remaining:  # the key's per-model limits: x-litellm-key-remaining-{requests,tokens}-<model>
            if name.startswith(f"x-litellm-key-remaining-{kind}") and (number := header_count(value)) is not None:
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
            if (number := header_count(plain_left)) is not None:
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
    h = lower_headers(headers)
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
