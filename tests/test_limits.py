"""The buckets and the header sync, driven with exact times."""

from __future__ import annotations

import pytest

from scheduler.limits import Limits, LocalLimiter, TokenBucket, parse_limit_headers


def test_bucket_refills_continuously_and_caps_the_burst() -> None:
    bucket = TokenBucket(per_minute=60, burst_s=1.0, now=0.0)  # 1 per second, holds 1
    assert bucket.capacity == 1.0
    assert bucket.wait_time(1, 0.0) == 0.0
    bucket.charge(1, 0.0)
    assert bucket.wait_time(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_time(1, 0.25) == pytest.approx(0.75)
    # A long idle period does not bank more than the burst.
    assert bucket.wait_time(1, 100.0) == 0.0
    bucket.charge(1, 100.0)
    assert bucket.wait_time(1, 100.0) == pytest.approx(1.0)


def test_oversized_cost_waits_for_a_full_bucket_then_leaves_debt() -> None:
    bucket = TokenBucket(per_minute=600, burst_s=1.0, now=0.0)  # 10 per second, holds 10
    bucket.charge(5, 0.0)
    assert bucket.wait_time(25, 0.0) == pytest.approx(0.5)  # needs the full 10, not 25
    bucket.charge(25, 0.5)
    assert bucket.level == pytest.approx(-15)
    assert bucket.wait_time(1, 0.5) == pytest.approx(1.6)


def test_limiter_admits_both_buckets_or_neither() -> None:
    limiter = LocalLimiter(Limits(rpm=60, tpm=1200), now=0.0)  # the token bucket starts half full: 10 of 20
    assert limiter.clock_acquire(8, 0.0) == 0.0
    # The request bucket is empty: nothing is charged, tokens included.
    assert limiter.clock_acquire(1, 0.0) == pytest.approx(1.0)
    assert limiter.tokens is not None and limiter.tokens.level == pytest.approx(2)
    assert limiter.mark() == (1, 8)


def test_header_sync_lowers_the_bucket_to_what_the_server_has_left() -> None:
    limiter = LocalLimiter(Limits(rpm=6000, tpm=600_000), now=0.0)  # 100 req/s, 10,000 tok/s
    assert limiter.clock_acquire(100, 0.0) == 0.0
    mark = limiter.on_wire(100, 0.0)
    assert limiter.clock_acquire(100, 0.0) == 0.0  # admitted after the first, before its answer
    headers = {
        "x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "20",
        "x-ratelimit-limit-tokens": "600000", "x-ratelimit-remaining-tokens": "1000",
    }
    limiter.clock_observe(headers, sent_at=0.0, mark=mark, now=0.1)
    assert limiter.requests is not None and limiter.tokens is not None
    # remaining + refill over 0.1 s - charged since the request left - 5% of the burst in reserve
    assert limiter.requests.level == pytest.approx(20 + 10 - 1 - 5)
    assert limiter.tokens.level == pytest.approx(1000 + 1000 - 100 - 500)


def test_header_sync_never_raises_the_bucket_or_trusts_more_than_configured() -> None:
    limiter = LocalLimiter(Limits(rpm=6000), now=0.0)
    limiter.clock_acquire(1, 0.0)
    mark = limiter.on_wire(1, 0.0)
    for _ in range(50):
        limiter.clock_acquire(1, 0.0)
    assert limiter.requests is not None
    level = limiter.requests.level
    # The server reports its per-minute bucket nearly full: that is no reason to send more.
    limiter.clock_observe({"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "5990"},
                          sent_at=0.0, mark=mark, now=0.0)
    assert limiter.requests.level == level


def test_a_lower_server_limit_replaces_the_configured_one() -> None:
    limiter = LocalLimiter(Limits(rpm=6000), now=0.0)
    limiter.clock_observe({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "600"},
                          sent_at=0.0, mark=(0, 0), now=0.0)
    assert limiter.requests is not None and limiter.requests.per_minute == 600
    assert limiter.requests.capacity == 10


def test_limits_are_learned_from_the_first_response() -> None:
    limiter = LocalLimiter(None, now=0.0)
    assert limiter.clock_acquire(10, 0.0) == 0.0  # the probe
    assert limiter.clock_acquire(10, 0.0) > 0  # nothing more until its answer
    limiter.clock_observe({"x-ratelimit-limit-requests": "500", "x-ratelimit-limit-tokens": "30000"},
                          sent_at=0.0, mark=(1, 10), now=0.2)
    assert limiter.snapshot() == Limits(rpm=500, tpm=30000)
    assert limiter.clock_acquire(10, 0.2) == 0.0


def test_a_429_on_the_probe_lets_the_next_request_probe() -> None:
    limiter = LocalLimiter(None, now=0.0)
    assert limiter.clock_acquire(10, 0.0) == 0.0
    limiter.on_wire(10, 0.0)
    limiter.clock_rate_limited(None, 10, now=0.0)
    assert limiter.clock_acquire(10, 0.0) == 0.0


def test_calibration_learns_how_much_more_the_server_counts() -> None:
    """The server counts 1.5 tokens for each of ours: the ratio converges there."""
    limit = 60_000.0  # 1,000 tokens/s
    limiter = LocalLimiter(Limits(tpm=int(limit), burst_s=60.0), now=0.0)
    server_level = limit
    t = 0.0
    for _ in range(400):  # 20 s at 20 requests/s, 50 tokens each by our count
        t += 0.05
        server_level = min(limit, server_level + 0.05 * limit / 60)
        charge = limiter.scale(50)
        assert limiter.clock_acquire(charge, t) == 0.0
        server_level -= 50 * 1.5
        limiter.clock_observe({"x-ratelimit-limit-tokens": str(limit),
                               "x-ratelimit-remaining-tokens": str(int(server_level))},
                              sent_at=t, mark=limiter.on_wire(charge, t), now=t)
    assert limiter.ratio == pytest.approx(1.5, rel=0.02)


def test_a_429_empties_the_named_bucket_and_halves_the_burst() -> None:
    limiter = LocalLimiter(Limits(rpm=6000, tpm=600_000), now=0.0)
    limiter.clock_rate_limited("tokens", 0, now=0.0)
    assert limiter.tokens is not None and limiter.requests is not None
    assert limiter.tokens.level == 0
    assert limiter.tokens.capacity == pytest.approx(5000)
    assert limiter.requests.level == pytest.approx(50)  # not emptied, but capped by the halved burst


def test_a_429_is_taken_out_of_the_cumulative_charge() -> None:
    limiter = LocalLimiter(Limits(rpm=6000, tpm=600_000), now=0.0)
    limiter.clock_acquire(300, 0.0)
    limiter.on_wire(300, 0.0)
    limiter.clock_acquire(200, 0.0)
    limiter.on_wire(200, 0.0)
    limiter.clock_rate_limited(None, 200, now=0.0)
    assert limiter.mark() == (1, 300)
    assert limiter.on_wire(10, 0.0) == (2, 310)


def test_marks_count_what_went_on_the_wire_not_what_was_admitted() -> None:
    """A burst is admitted at once but leaves one by one: the first answer reflects only what had arrived."""
    limiter = LocalLimiter(Limits(rpm=6000, tpm=600_000, safety=0.0), now=0.0)
    for _ in range(10):
        limiter.clock_acquire(100, 0.0)
    mark = limiter.on_wire(100, 0.0)
    assert mark == (1, 100)
    headers = {"x-ratelimit-limit-tokens": "600000", "x-ratelimit-remaining-tokens": "600"}
    limiter.clock_observe(headers, sent_at=0.0, mark=mark, now=0.0)
    assert limiter.tokens is not None
    # The nine admitted after it are still to reach the server: 600 - 900.
    assert limiter.tokens.level == pytest.approx(-300)  # not emptied, but capped by the halved burst


def test_parse_limit_headers_ignores_garbage() -> None:
    seen = parse_limit_headers({"x-ratelimit-limit-requests": "abc", "x-ratelimit-remaining-requests": "5",
                                "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "12"})
    assert seen.limit_requests is None and seen.remaining_requests is None  # a remaining without its limit
    assert seen.limit_tokens == 100 and seen.remaining_tokens == 12


@pytest.mark.parametrize("bad", [{"rpm": 0}, {"tpm": -5}, {"burst_s": 0}, {"safety": 1.0}])
def test_limits_reject_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)  # type: ignore[arg-type]
