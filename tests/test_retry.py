from __future__ import annotations

import random

import pytest

from scheduler.refusals import retry_after_s
from scheduler.retry import Backoff, Outcome, classify


def _body(code: str | None) -> dict[str, object]:
    return {"error": {"message": "m", "type": "x", "code": code}}


@pytest.mark.parametrize(
    ("status", "headers", "code", "outcome"),
    [
        (200, {}, None, Outcome.SUCCESS),
        (429, {}, "rate_limit_exceeded", Outcome.RATE_LIMITED),
        (429, {}, None, Outcome.RATE_LIMITED),
        (429, {}, "insufficient_quota", Outcome.QUOTA),
        (429, {}, "credit_balance_exhausted", Outcome.QUOTA),
        (429, {}, "monthly_spend_limit_exceeded", Outcome.QUOTA),
        (429, {}, "org_usage_limit_exceeded", Outcome.QUOTA),
        (408, {}, None, Outcome.RETRY),
        (409, {}, None, Outcome.RETRY),
        (500, {}, None, Outcome.RETRY),
        (503, {}, None, Outcome.RETRY),
        (529, {}, None, Outcome.RETRY),
        (400, {}, "context_length_exceeded", Outcome.JOB_FATAL),
        (404, {}, "model_not_found", Outcome.JOB_FATAL),
        (413, {}, None, Outcome.JOB_FATAL),
        (422, {}, None, Outcome.JOB_FATAL),
        (401, {}, "invalid_api_key", Outcome.AUTH),
        (403, {}, None, Outcome.AUTH),
        (500, {"x-should-retry": "false"}, None, Outcome.JOB_FATAL),
        (400, {"x-should-retry": "true"}, None, Outcome.RETRY),
    ],
)
def test_classification_table(status: int, headers: dict[str, str], code: str | None, outcome: Outcome) -> None:
    assert classify(status, headers, _body(code)) is outcome


def test_retry_after_prefers_milliseconds() -> None:
    def wait(headers: dict[str, str], now_unix: float = 0.0) -> float | None:
        return retry_after_s(headers, None, None, now_unix=now_unix)

    assert wait({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert wait({"retry-after": "3"}) == 3.0
    assert wait({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, now_unix=1445412480) == 5.0
    assert wait({"retry-after": "soon"}) is None
    assert wait({}) is None


def test_full_jitter_backoff_draws_from_the_whole_window() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0)
    rng, expected = random.Random(7), random.Random(7)
    delays = [backoff.delay(attempt, rng) for attempt in range(1, 7)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert delays == [expected.uniform(0, c) for c in ceilings]
