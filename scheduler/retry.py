"""What to do with a failed attempt: the classification table (README, "Errors and retries"), and the backoff."""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Backoff", "Outcome", "answer_problem", "classify", "error_code", "is_quota_code"]

# Billing codes that 429 carries when money, not rate, is the problem: retrying cannot help.
_QUOTA_CODES = frozenset({"insufficient_quota", "credit_balance_exhausted", "billing_hard_limit_reached"})
_JOB_FATAL = frozenset({400, 404, 413, 422})
_RETRYABLE = frozenset({408, 409})


class Outcome(enum.Enum):
    """How the pool treats one attempt's answer."""

    SUCCESS = "success"
    RETRY = "retry"  # 408, 409, 5xx, connection error, timeout
    RATE_LIMITED = "rate_limited"  # 429 rate_limit_exceeded: retry and pause all dispatch
    JOB_FATAL = "job_fatal"  # error result, no retry
    QUOTA = "quota"  # run-fatal: stop admitting
    AUTH = "auth"  # run-fatal: the key was refused


def error_code(body: Any) -> str | None:
    """The ``error.code`` (or ``error.type``) of an OpenAI error body."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = err.get("code") or err.get("type")
            return str(code) if code is not None else None
    return None


def is_quota_code(code: str | None) -> bool:
    return code is not None and (
        code in _QUOTA_CODES or code.endswith("_spend_limit_exceeded") or code.endswith("_usage_limit_exceeded")
    )


def classify(status: int, headers: Mapping[str, str], body: Any) -> Outcome:
    """Classify one HTTP answer."""
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status in (401, 403):
        return Outcome.AUTH
    code = error_code(body)
    if status == 429 and is_quota_code(code):
        return Outcome.QUOTA
    should_retry = headers.get("x-should-retry")
    if should_retry == "false":
        return Outcome.JOB_FATAL
    if status == 429:
        return Outcome.RATE_LIMITED
    if should_retry == "true" or status in _RETRYABLE or status >= 500:
        return Outcome.RETRY
    if status in _JOB_FATAL:
        return Outcome.JOB_FATAL
    # Other 4xx are the request's own fault; other statuses are odd enough not to hammer the server with.
    return Outcome.JOB_FATAL


# The list that holds the answer, by endpoint: a 200 without it is not the API's answer (a proxy's page, a health
# check, another API's body). Endpoints not listed are not checked.
_ANSWER_KEY = {
    "chat/completions": "choices", "completions": "choices", "embeddings": "data", "responses": "output",
    "moderations": "results",
}


def answer_problem(endpoint: str, body: Any, is_json: bool = True) -> str | None:
    """What is wrong with a 2xx body as the answer of ``endpoint`` (None: it is one)."""
    if not is_json:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        return f"the API answered 200 with a body that is not JSON: {message or 'unreadable'}"
    key = _ANSWER_KEY.get(endpoint.removeprefix("/").removeprefix("v1/"))
    if key is None:
        return None
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        found = ", ".join(sorted(map(str, body))[:8]) if isinstance(body, dict) else type(body).__name__
        return f"the API answered 200 with JSON that is not a {endpoint} answer (no '{key}' list; found: {found})"
    return None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: ``random(0, min(cap_s, base_s * 2**(attempt-1)))``.

    Full jitter spreads the retries of a burst of failures over the whole window, so they do not come back
    as a second burst (see AWS' "Exponential Backoff And Jitter").
    """

    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before retry number ``attempt`` (1 for the first retry)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** min(attempt - 1, 60))
        return rng.uniform(0, ceiling)
