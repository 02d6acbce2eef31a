"""The values a caller gets back: :class:`Result`, :class:`Usage` and :class:`ErrorInfo`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import OutputInvalid

__all__ = ["ErrorInfo", "Result", "Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage the server reported for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: prompt tokens served from the provider's prompt cache (billed at the cached-input price)
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_body(cls, body: Any) -> Usage | None:
        """Read ``usage`` from a chat, completions, embeddings or responses body (None when absent)."""
        if not isinstance(body, dict):
            return None
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return None
        prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
        completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return cls(prompt, completion, cached)


def _count(value: Any) -> int:
    """A token count from a server's usage: anything but a non-negative number counts 0 (never raises)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
        return 0
    return int(value)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a job failed: a stable ``code`` (see :mod:`scheduler.errors`) and a message without secrets."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one job, success or failure.

    ``ok`` tells which; on failure ``error`` says why and ``status``/``body`` hold the last HTTP answer, if any.
    """

    custom_id: str
    endpoint: str
    #: HTTP status of the last attempt (None when no HTTP answer came back)
    status: int | None
    #: the parsed JSON body of the last answer (the API's error body on HTTP failures)
    body: Any
    request_id: str | None = None
    usage: Usage | None = None
    #: attempts made, counting the first
    attempts: int = 1
    #: seconds from submit to result
    latency_s: float = 0.0
    error: ErrorInfo | None = None
    #: the model that answered (a fallback model when the primary failed)
    model: str | None = None
    #: cost of this job in US dollars, where the model's prices are known
    cost_usd: float | None = None
    #: True when the answer came from the response cache without an API call
    cached: bool = False
    #: the service tier that answered: "standard", "flex" or "batch" (None: not recorded)
    tier: str | None = None
    #: the Batch API batch whose output held this result (tier "batch")
    batch_id: str | None = None
    #: the endpoint that answered (its name, or host and a short key fingerprint; never the key)
    served_by: str | None = None
    #: embeddings: how many inputs the combined request that answered it carried (None: it went alone)
    coalesced: int | None = None
    #: the answer parsed into the ``response_format`` model given to ``submit`` (None: none given, or a refusal)
    parsed: Any = None
    #: the model's refusal, where it refused to answer a structured-output request (``parsed`` is then None)
    refusal: str | None = None
    #: how many of the chat's oldest messages were dropped to fit the context window (``trim``)
    trimmed: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def finish_reason(self) -> str | None:
        """The first choice's ``finish_reason`` (``length`` means the output was truncated)."""
        body = self.body
        if isinstance(body, dict):
            choices = body.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                reason = choices[0].get("finish_reason")
                return reason if isinstance(reason, str) else None
            if body.get("status") == "incomplete":
                return "length"
        return None

    @property
    def truncated(self) -> bool:
        """True when the model stopped at the output cap."""
        return self.finish_reason == "length"

    @property
    def text(self) -> str:
        """The generated text: the first choice of a chat or completions body, or a responses body's output
        (also of an ``output_invalid`` failure: the answer that did not parse)."""
        body = self.body
        if not isinstance(body, dict) or (self.error is not None and self.error.code != OutputInvalid.code):
            return ""
        choices = body.get("choices")
        if isinstance(choices, list) and choices:
            first = choices[0]
            message = first.get("message")
            if isinstance(message, dict):
                return message.get("content") or ""
            return first.get("text") or ""
        output = body.get("output")
        if isinstance(output, list):
            return "".join(
                part.get("text", "")
                for item in output
                if isinstance(item, dict)
                for part in item.get("content") or ()
                if isinstance(part, dict) and part.get("type") == "output_text"
            )
        return ""
