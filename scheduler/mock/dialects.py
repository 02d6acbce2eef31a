"""Provider dialects: how each provider counts, which rate-limit headers it sends, and its 429s.

Answers keep OpenAI's bodies in every dialect (all of these serve OpenAI-compatible endpoints); what changes is
the limiter's arithmetic, the rate-limit headers of every answer, and the headers and body of a 429.

- ``openai``: token buckets refilling continuously, bursts quantized to ``quantum_s``; output cap charged up
  front, never refunded; ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (reset as "1m30s");
  429 with ``retry-after``/``retry-after-ms`` and "Rate limit reached for MODEL in organization ...".
- ``azure``: requests counted per fixed window of ``azure_window_s`` (10 s: a 120 RPM deployment allows and
  reports 20), tokens per fixed minute, both charged up front (prompt + max_tokens);
  ``x-ratelimit-{limit,remaining}-{requests,tokens}`` (requests: the short window) and
  ``x-ratelimit-reset-{requests,tokens}`` in whole seconds; 429 with ``retry-after``, ``retry-after-ms``,
  ``x-ms-retry-after-ms`` and ``{"error": {"code": "429", "message": "Requests to the ChatCompletions_Create
  Operation under Azure OpenAI API version ... have exceeded token rate limit ..."}}``.
- ``anthropic``: token buckets for requests, input tokens (``tpm``) and output tokens (``otpm``); output reserved
  from max_tokens at the start and settled to the real count at the end (or counted only at the end);
  ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`` with RFC 3339
  resets (token remainders rounded to the thousand, as documented; ``tokens-*`` adds input and output up, as
  a recorded response shows); 429 with ``retry-after`` and ``{"type": "error", "error": {"type":
  "rate_limit_error", "message": "This request would exceed your organization's rate limit of ..."},
  "request_id": ...}``.
- ``litellm``: a LiteLLM proxy's router limits: fixed windows (the calendar minute), requests counted when
  admitted, tokens counted from real usage when the answer ends (admission checks used + prompt <= tpm);
  ``x-ratelimit-{limit,remaining}-{requests,tokens}`` and no reset headers; 429 without ``retry-after`` or
  ``x-ratelimit-*`` but with ``llm_provider-retry-after``, body "litellm.RateLimitError: Deployment over defined
  rpm limit=N. current usage=M", then "No deployments available for selected model" during a cooldown.
- ``none``: no limits and no rate-limit headers (vLLM, Ollama, llama.cpp): only ``capacity`` limits.
"""

from __future__ import annotations

import math
import time
import uuid
from email.utils import formatdate
from typing import Protocol

from aiohttp import web

from .config import MockConfig
from .parse import Job
from .ratelimit import FixedWindow, Limit, RateLimiter, Refusal, format_duration
from .respond import error_response, json_response, request_id

ORG = "org-mock"
_LIMITS_URL = "Visit https://platform.openai.com/account/rate-limits to learn more."


class Scope(Protocol):
    """The limits of one scope (key x model) in one dialect."""

    def check_in(self, job: Job, now: float) -> Refusal | None:
        """Charge `job` if every limit has room, else say why not (charging nothing)."""

    def settle(self, job: Job, now: float) -> None:
        """Count what the answer really used (dialects that count usage after the fact)."""

    def write_headers(self, now: float, out: dict[str, str]) -> None:
        """Add this scope's rate-limit headers as of `now`."""


def _worst(refusal: Refusal | None, candidate: Refusal | None) -> Refusal | None:
    # Report the limit that makes the client wait longest: retrying earlier is useless.
    if candidate is None:
        return refusal
    if refusal is None or candidate.retry_after_s > refusal.retry_after_s:
        return candidate
    return refusal


class Dialect:
    """The OpenAI dialect; the others override what differs."""

    name = "openai"
    settles = False  # whether scopes count usage at the end (skips a call on the common path)

    def __init__(self, cfg: MockConfig) -> None:
        self.cfg = cfg

    def scope(self, rpm: int | None, tpm: int | None, otpm: int | None, now: float) -> Scope:
        """New limits for one scope, full at `now`."""
        return _OpenAIScope(RateLimiter(rpm, tpm, self.cfg.quantum_s, now))

    def base_headers(self, now: float) -> dict[str, str]:
        """Headers of every answer (request ids, date) before the rate-limit headers."""
        return {"x-request-id": request_id()}

    def rate_limited(
        self, refusal: Refusal, job: Job, headers: dict[str, str], request: web.Request
    ) -> web.StreamResponse:
        """The 429 for `refusal`."""
        unit = "requests per min (RPM)" if refusal.kind == "requests" else "tokens per min (TPM)"
        where = f"for {job.model} in organization {ORG} on {unit}"
        if refusal.too_large:
            q = self.cfg.quantum_s
            burst = refusal.limit * q / 60.0
            message = (
                f"Request too large {where}: Limit {refusal.limit} ({burst:g} per {q:g}s burst), "
                f"Requested {refusal.requested}. The input or output tokens must be reduced in order to run "
                f"successfully. {_LIMITS_URL}"
            )
            # No retry-after: waiting cannot make this request fit.
        else:
            retry_ms = max(1, math.ceil(refusal.retry_after_s * 1000))
            message = (
                f"Rate limit reached {where}: Limit {refusal.limit}, Used {refusal.used}, "
                f"Requested {refusal.requested}. Please try again in {format_duration(retry_ms / 1000)}. "
                + _LIMITS_URL
            )
            headers["retry-after-ms"] = str(retry_ms)
            headers["retry-after"] = str(math.ceil(retry_ms / 1000))
        kind = "tokens" if refusal.kind != "requests" else "requests"
        return error_response(429, message, kind, None, "rate_limit_exceeded", headers)

    def overloaded(self, status: int, headers: dict[str, str]) -> web.StreamResponse:
        """The answer when more requests wait than `max_queue` allows."""
        if status == 503:
            message = "The engine is currently overloaded, please try again later."
            return error_response(503, message, "server_error", None, None, headers)
        message = "Too many requests are waiting for this model. Please try again later."
        return error_response(429, message, "server_error", None, "server_overloaded", headers)


class _OpenAIScope:
    __slots__ = ("limiter",)

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def check_in(self, job: Job, now: float) -> Refusal | None:
        return self.limiter.admit(job.cost, now)

    def settle(self, job: Job, now: float) -> None:
        pass

    def write_headers(self, now: float, out: dict[str, str]) -> None:
        self.limiter.write_headers(now, out)


# -- Azure OpenAI ----------------------------------------------------------------------------------


class _AzureScope:
    __slots__ = ("requests", "tokens")

    def __init__(self, rpm: int | None, tpm: int | None, window_s: float) -> None:
        # Azure evaluates RPM over short windows: rpm * window / 60 per window, and reports that figure.
        self.requests = FixedWindow(max(1, int(rpm * window_s / 60)), window_s) if rpm else None
        self.tokens = FixedWindow(tpm, 60.0) if tpm else None

    def check_in(self, job: Job, now: float) -> Refusal | None:
        worst: Refusal | None = None
        if self.requests is not None:
            wait = self.requests.wait_s(1, now)
            if wait > 0:
                worst = Refusal("requests", self.requests.limit, self.requests.used, 1, wait, math.isinf(wait))
        if self.tokens is not None:
            wait = self.tokens.wait_s(job.cost, now)
            if wait > 0:
                refusal = Refusal("tokens", self.tokens.limit, self.tokens.used, job.cost, wait, math.isinf(wait))
                worst = _worst(worst, refusal)
        if worst is not None:
            return worst
        if self.requests is not None:
            self.requests.take(1, now)
        if self.tokens is not None:
            self.tokens.take(job.cost, now)
        return None

    def settle(self, job: Job, now: float) -> None:
        pass

    def write_headers(self, now: float, out: dict[str, str]) -> None:
        for kind, window in (("requests", self.requests), ("tokens", self.tokens)):
            if window is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(window.limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(window.remaining(now))
                out[f"x-ratelimit-reset-{kind}"] = str(math.ceil(window.reset_s(now)))


_AZURE_OPERATIONS = {"chat": "ChatCompletions_Create", "embeddings": "Embeddings_Create",
                     "responses": "Responses_Create"}
_AZURE_API_VERSION = "2024-10-21"
_AZURE_NEVER_S = 86_400  # what Azure says when a request can never fit its TPM limit


class AzureDialect(Dialect):
    """Azure OpenAI: short request windows, per-minute tokens, retry-after-ms, Azure's 429 body."""

    name = "azure"

    def scope(self, rpm: int | None, tpm: int | None, otpm: int | None, now: float) -> Scope:
        return _AzureScope(rpm, tpm, self.cfg.azure_window_s)

    def base_headers(self, now: float) -> dict[str, str]:
        rid = str(uuid.uuid4())
        return {"x-request-id": rid, "apim-request-id": rid, "x-ms-region": "East US", "date": _http_date(now)}

    def rate_limited(
        self, refusal: Refusal, job: Job, headers: dict[str, str], request: web.Request
    ) -> web.StreamResponse:
        seconds = _AZURE_NEVER_S if refusal.too_large else max(1, math.ceil(refusal.retry_after_s))
        ms = _AZURE_NEVER_S * 1000 if refusal.too_large else max(1, math.ceil(refusal.retry_after_s * 1000))
        headers["retry-after"] = str(seconds)
        headers["retry-after-ms"] = str(ms)
        headers["x-ms-retry-after-ms"] = str(ms)
        operation = _AZURE_OPERATIONS.get(job.endpoint, "ChatCompletions_Create")
        version = request.query.get("api-version", _AZURE_API_VERSION)
        what = "call rate limit" if refusal.kind == "requests" else "token rate limit"
        message = (
            f"Requests to the {operation} Operation under Azure OpenAI API version {version} have exceeded "
            f"{what} of your current OpenAI S0 pricing tier. Please retry after {seconds} seconds. Please go here: "
            "https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
        )
        return json_response({"error": {"code": "429", "message": message}}, 429, headers)


# -- Anthropic -------------------------------------------------------------------------------------

_ANTHROPIC_ROUNDING = 1000  # Anthropic's docs: token remainders are rounded to the nearest thousand
_ANTHROPIC_ORG = "00000000-0000-4000-8000-00000000ab0c"
_ANTHROPIC_UNITS = {"requests": "requests", "input_tokens": "input tokens", "output_tokens": "output tokens",
                    "tokens": "tokens"}


class _AnthropicScope:
    __slots__ = ("input", "output", "requests", "reserve")

    def __init__(self, rpm: int | None, itpm: int | None, otpm: int | None, cfg: MockConfig, now: float) -> None:
        q = cfg.quantum_s
        self.requests = Limit("requests", rpm, q, now) if rpm else None
        self.input = Limit("input_tokens", itpm, q, now) if itpm else None
        self.output = Limit("output_tokens", otpm, q, now) if otpm else None
        self.reserve = cfg.anthropic_output_reserve

    def check_in(self, job: Job, now: float) -> Refusal | None:
        # Without the reserve, output is counted only when answers end: a new request needs the bucket not
        # to be in debt (cost 0).
        out_cost = job.reserve if self.reserve else 0
        worst: Refusal | None = None
        for lim, cost in ((self.requests, 1), (self.input, job.prompt_tokens), (self.output, out_cost)):
            if lim is not None:
                worst = _worst(worst, lim.check(cost, now))
        if worst is not None:
            return worst
        for lim, cost in ((self.requests, 1), (self.input, job.prompt_tokens), (self.output, out_cost)):
            if lim is not None:
                lim.take(cost, now)
        return None

    def settle(self, job: Job, now: float) -> None:
        if self.output is None:
            return
        used = job.completion_tokens * job.n
        if not self.reserve:
            self.output.take(used, now)
        elif job.reserve > used:
            self.output.give(job.reserve - used, now)
        else:
            self.output.take(used - job.reserve, now)

    def write_headers(self, now: float, out: dict[str, str]) -> None:
        tokens: list[tuple[int, float, float]] = []  # (limit, remaining, seconds until full)
        for name, lim in (("requests", self.requests), ("input-tokens", self.input), ("output-tokens", self.output)):
            if lim is None:
                continue
            level = max(0.0, lim.reporting.level_at(now))
            full_in = lim.reporting.until_full_s(now)
            out[f"anthropic-ratelimit-{name}-limit"] = str(lim.limit)
            if name == "requests":
                out[f"anthropic-ratelimit-{name}-remaining"] = str(math.floor(level + 1e-9))
            else:
                out[f"anthropic-ratelimit-{name}-remaining"] = str(_round_k(level))
                tokens.append((lim.limit, level, full_in))
            out[f"anthropic-ratelimit-{name}-reset"] = _rfc3339(now + full_in)
        if tokens:
            # Observed: the combined tokens-* headers add up the input and output limits.
            out["anthropic-ratelimit-tokens-limit"] = str(sum(t[0] for t in tokens))
            out["anthropic-ratelimit-tokens-remaining"] = str(_round_k(sum(t[1] for t in tokens)))
            out["anthropic-ratelimit-tokens-reset"] = _rfc3339(now + max(t[2] for t in tokens))


def _round_k(value: float) -> int:
    return int(round(value / _ANTHROPIC_ROUNDING) * _ANTHROPIC_ROUNDING)


class AnthropicDialect(Dialect):
    """Anthropic: RPM, ITPM and OTPM buckets, anthropic-ratelimit-* headers, Anthropic's 429 body."""

    name = "anthropic"
    settles = True

    def scope(self, rpm: int | None, tpm: int | None, otpm: int | None, now: float) -> Scope:
        return _AnthropicScope(rpm, tpm, otpm, self.cfg, now)

    def base_headers(self, now: float) -> dict[str, str]:
        return {"request-id": "req_" + uuid.uuid4().hex, "anthropic-organization-id": _ANTHROPIC_ORG,
                "date": _http_date(now)}

    def rate_limited(
        self, refusal: Refusal, job: Job, headers: dict[str, str], request: web.Request
    ) -> web.StreamResponse:
        if not refusal.too_large:
            headers["retry-after"] = str(max(1, math.ceil(refusal.retry_after_s)))
        unit = _ANTHROPIC_UNITS[refusal.kind]
        message = (
            f"This request would exceed your organization's rate limit of {refusal.limit:,} {unit} per minute "
            f"(org: {_ANTHROPIC_ORG}, model: {job.model}). For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. "
            "Please reduce the prompt length or the maximum tokens requested, or try again later. You may also "
            "contact sales at https://claude.com/contact-sales to discuss your options for a rate limit increase."
        )
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": message},
                "request_id": headers.get("request-id")}
        return json_response(body, 429, headers)


# -- LiteLLM proxy ---------------------------------------------------------------------------------

#: The header LiteLLM's 429s carry (always "60", as observed of LiteLLM 1.108.7: benchmarks/litellm/observed.md).
LITELLM_RETRY_HEADER = "llm_provider-retry-after"


class _LiteLLMScope:
    __slots__ = ("cooldown_s", "cooldown_until", "requests", "tokens")

    def __init__(self, rpm: int | None, tpm: int | None, cfg: MockConfig) -> None:
        w = cfg.litellm_window_s
        self.requests = FixedWindow(rpm, w) if rpm else None
        self.tokens = FixedWindow(tpm, w) if tpm else None
        self.cooldown_s = cfg.litellm_cooldown_s
        self.cooldown_until = -math.inf

    def check_in(self, job: Job, now: float) -> Refusal | None:
        if now < self.cooldown_until:
            return Refusal("requests", 0, 0, 1, self.cooldown_until - now, False, "cooldown")
        worst: Refusal | None = None
        if self.requests is not None:
            # LiteLLM refuses when the count + 1 reaches the RPM: 599 of 600 a minute pass (observed).
            wait = self.requests.wait_s(min(2, self.requests.limit), now)
            if wait > 0:
                worst = Refusal("requests", self.requests.limit, self.requests.used, 1, wait, False)
        if self.tokens is not None:
            # The router checks tokens used so far plus this request's input: the output is not known yet.
            used = self.tokens.used_at(now)
            if used + job.prompt_tokens > self.tokens.limit:
                wait = self.tokens.reset_s(now)
                worst = _worst(worst, Refusal("tokens", self.tokens.limit, used, job.prompt_tokens, wait, False))
        if worst is not None:
            if self.cooldown_s > 0:
                self.cooldown_until = now + self.cooldown_s
            return worst
        if self.requests is not None:
            self.requests.take(1, now)
        return None

    def settle(self, job: Job, now: float) -> None:
        if self.tokens is not None:
            self.tokens.take(job.prompt_tokens + job.completion_tokens * job.n, now)

    def write_headers(self, now: float, out: dict[str, str]) -> None:
        for kind, window in (("requests", self.requests), ("tokens", self.tokens)):
            if window is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(window.limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(window.remaining(now))


class LiteLLMDialect(Dialect):
    """A LiteLLM proxy: calendar-minute windows on real usage, no reset headers, LiteLLM's 429s."""

    name = "litellm"
    settles = True

    def scope(self, rpm: int | None, tpm: int | None, otpm: int | None, now: float) -> Scope:
        return _LiteLLMScope(rpm, tpm, self.cfg)

    def base_headers(self, now: float) -> dict[str, str]:
        return {"x-litellm-call-id": str(uuid.uuid4()), "x-litellm-version": "1.108.7", "date": _http_date(now)}

    def rate_limited(
        self, refusal: Refusal, job: Job, headers: dict[str, str], request: web.Request
    ) -> web.StreamResponse:
        # As LiteLLM 1.108.7's router answers a spent window (benchmarks/litellm/observed.md): no retry-after and
        # no x-ratelimit-*, llm_provider-retry-after always 60, one message for both limits whose numbers say
        # which was hit, type "throttling_error", code the string "429".
        out = {k: v for k, v in headers.items() if not k.startswith("x-ratelimit-") and k != "x-litellm-version"}
        out[LITELLM_RETRY_HEADER] = "60"
        if refusal.detail == "cooldown":
            message = (
                f"No deployments available for selected model, Try again in {math.ceil(refusal.retry_after_s)} "
                f"seconds. Passed model={job.model}. pre-call-checks=False, allowed_model_region=n/a"
            )
            return error_response(429, message, "None", "None", 429, out)
        requests, tokens = self._counts(refusal)
        message = (
            f"litellm.RateLimitError: No deployments available for selected model. Passed model={job.model}. "
            f"Deployments={{'mock-deployment': {{'current_tpm': {tokens[0]}, 'tpm_limit': {tokens[1]}, "
            f"'current_rpm': {requests[0]}, 'rpm_limit': {requests[1]}}}}}\n\nLiteLLM: model group "
            f"'{job.model}' failed with the error above. No fallback was attempted."
        )
        return error_response(429, message, "throttling_error", None, "429", out)

    @staticmethod
    def _counts(refusal: Refusal) -> tuple[tuple[int, int], tuple[int, int]]:
        """(current, limit) of requests and of tokens, as the message shows them."""
        hit = (refusal.used, refusal.limit)
        if refusal.kind == "requests":
            return hit, (0, 0)
        return (0, 0), hit


# -- no limits (vLLM, Ollama, llama.cpp) -----------------------------------------------------------


class _NoLimits:
    __slots__ = ()

    def check_in(self, job: Job, now: float) -> Refusal | None:
        return None

    def settle(self, job: Job, now: float) -> None:
        pass

    def write_headers(self, now: float, out: dict[str, str]) -> None:
        pass


class NoneDialect(Dialect):
    """A self-hosted server: no rate limits, no rate-limit headers; only its capacity limits it."""

    name = "none"

    def scope(self, rpm: int | None, tpm: int | None, otpm: int | None, now: float) -> Scope:
        return _NoLimits()

    def rate_limited(
        self, refusal: Refusal, job: Job, headers: dict[str, str], request: web.Request
    ) -> web.StreamResponse:
        message = "Too many requests. Please try again later."
        return error_response(429, message, "api_error", None, None, headers)

    def overloaded(self, status: int, headers: dict[str, str]) -> web.StreamResponse:
        # Ollama's words when OLLAMA_MAX_QUEUE is full; its OpenAI layer types such errors api_error.
        message = "server busy, please try again.  maximum pending requests exceeded"
        return error_response(status, message, "api_error", None, None, headers)


DIALECT_TYPES: dict[str, type[Dialect]] = {
    "openai": Dialect,
    "azure": AzureDialect,
    "anthropic": AnthropicDialect,
    "litellm": LiteLLMDialect,
    "none": NoneDialect,
}


def _http_date(now: float) -> str:
    return formatdate(now, usegmt=True)


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(t)))
