"""Admission control: a request bucket and a token bucket, kept in step with the server's rate-limit headers.

Why not aiolimiter's ``AsyncLimiter`` here: the scheduler needs what it does not do. It wakes the smallest
waiter first (a large request can starve behind small ones; here the dispatcher holds the head job until it
fits), it cannot give capacity back (the refund option), and it cannot be told what the server says is left
(header sync, calibration). aiolimiter is the right tool for a plain client, and the benchmarks use it as one.

The buckets are pure: every method takes ``now``, so tests drive them with exact times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

__all__ = ["Limiter", "Limits", "LocalLimiter", "TokenBucket", "parse_limit_headers"]

log = structlog.get_logger("scheduler")


@dataclass(frozen=True, slots=True)
class Limits:
    """The rate limits to stay under. ``None`` for either means that dimension is not limited.

    Pass ``limits=None`` to :class:`~scheduler.Pool` instead to learn both from the first response's
    ``x-ratelimit-limit-*`` headers.
    """

    #: requests per minute
    rpm: int | None = None
    #: tokens per minute, counted as the server counts them (prompt estimate plus the output reservation)
    tpm: int | None = None
    #: the largest burst, in seconds of the rate. Providers enforce per-minute limits over short slices
    #: (60,000 RPM may be enforced as 1,000 per second), so a minute-sized burst would meet 429s.
    burst_s: float = 1.0
    #: give back the unused output reservation after each response, for providers that count real usage.
    #: OpenAI keeps the reservation, so the default is off.
    refund_unused: bool = False
    #: share of a burst kept in reserve below what the headers report, to absorb arrival jitter
    safety: float = 0.05

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"Limits.{name} must be a positive integer or None, got {value!r}")
        if not self.burst_s > 0:
            raise ValueError(f"Limits.burst_s must be positive, got {self.burst_s!r}")
        if not 0 <= self.safety < 1:
            raise ValueError(f"Limits.safety must be in [0, 1), got {self.safety!r}")


class TokenBucket:
    """A bucket refilled continuously at ``per_minute / 60`` per second, holding at most ``burst_s`` of it.

    A cost larger than the whole bucket is admitted from a full bucket and leaves it in debt, so a large
    request waits for a full bucket instead of forever.
    """

    __slots__ = ("capacity", "level", "per_minute", "rate", "updated")

    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        #: the limit, per minute
        self.per_minute = per_minute
        #: refill per second
        self.rate = per_minute / 60.0
        #: the most the bucket holds (at least one request's worth)
        self.capacity = max(1.0, self.rate * burst_s)
        #: what can be spent now; negative after an oversized admission
        self.level = self.capacity
        self.updated = now

    def set_rate(self, per_minute: float, burst_s: float, now: float) -> None:
        """Change the rate and the burst, keeping what is already spent."""
        self._refill(now)
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = min(self.level, self.capacity)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` can be charged (0.0: now)."""
        self._refill(now)
        need = min(cost, self.capacity)
        if self.level >= need - 1e-9:
            return 0.0
        return (need - self.level) / self.rate

    def charge(self, cost: float, now: float) -> None:
        self._refill(now)
        self.level -= cost

    def refund(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def lower_to(self, level: float, now: float) -> None:
        """Never raise: the server's view only ever takes capacity away from ours."""
        self._refill(now)
        self.level = min(self.level, level)


def _header_float(headers: Mapping[str, str], name: str, *, positive: bool) -> float | None:
    """A header's number; None when absent or unusable (garbage, NaN, infinite, negative; 0 where a limit is
    read: a limit of 0 is no limit anyone could keep, so it says nothing)."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        return None
    return number


@dataclass(frozen=True, slots=True)
class HeaderLimits:
    """What one response's ``x-ratelimit-*`` headers say (None where absent)."""

    limit_requests: float | None
    remaining_requests: float | None
    limit_tokens: float | None
    remaining_tokens: float | None


def parse_limit_headers(headers: Mapping[str, str]) -> HeaderLimits:
    """Read ``x-ratelimit-limit-*`` and ``x-ratelimit-remaining-*`` (reset times are not used: they say
    when a bucket is full again, not when the next request fits)."""
    limit_requests = _header_float(headers, "x-ratelimit-limit-requests", positive=True)
    limit_tokens = _header_float(headers, "x-ratelimit-limit-tokens", positive=True)
    return HeaderLimits(
        limit_requests,
        _header_float(headers, "x-ratelimit-remaining-requests", positive=False) if limit_requests else None,
        limit_tokens,
        _header_float(headers, "x-ratelimit-remaining-tokens", positive=False) if limit_tokens else None,
    )


class Limiter(Protocol):
    """The admission seam: in-process (:class:`LocalLimiter`) or shared through Redis."""

    def scale(self, estimate: int) -> int:
        """Our token estimate in the server's units (calibrated from its headers)."""

    async def acquire(self, tokens: int) -> float:
        """Charge one request and ``tokens`` if both fit now and return 0.0; else charge nothing and return
        the seconds to wait before asking again."""

    def on_wire(self, tokens: int) -> tuple[float, float]:
        """An admitted request charged ``tokens`` goes on the wire now. Returns the cumulative (requests,
        tokens) sent so far, this one included: the mark that its response is reconciled against."""

    async def observe(self, headers: Mapping[str, str] | None, sent_at: float, mark: tuple[float, float]) -> None:
        """Take in a response's headers (None: no HTTP answer) for the request sent at ``sent_at``."""

    async def refund(self, tokens: int) -> None:
        """Give back tokens charged but not spent."""

    async def rate_limited(self, kind: str | None, tokens: int) -> None:
        """A 429 came back for a request charged ``tokens``: the server's bucket (``requests``, ``tokens`` or
        None for both) is empty, and it charged nothing for that request."""

    def snapshot(self) -> Limits | None:
        """The limits in force (None while still unknown)."""


@dataclass(slots=True)
class _Calibration:
    """The anchor response that token calibration measures from."""

    sent_at: float
    deficit: float
    charged: float


@dataclass(slots=True)
class LocalLimiter:
    """RPM and TPM buckets for one process.

    Header sync: a response's ``remaining`` is the server's level when that request arrived. Subtracting what
    we charged since that request went on the wire, and adding the refill since, gives the most the server can
    have left now; our bucket is lowered to that (less a safety margin), never raised. Calibration: while the
    server's bucket is below full, its consumption between two responses (deficit change plus refill) over
    what we charged in between is the ratio between its token count and ours; estimates are scaled by it.
    """

    limits: Limits | None
    now: float
    requests: TokenBucket | None = field(init=False, default=None)
    tokens: TokenBucket | None = field(init=False, default=None)
    #: server tokens per token of our estimate, learned from the headers
    ratio: float = field(init=False, default=1.0)
    _charged_requests: float = field(init=False, default=0.0)
    _charged_tokens: float = field(init=False, default=0.0)
    # What has gone on the wire: a burst is admitted at once, but leaves over the SDK's CPU time per request,
    # and the server counts each one only when it arrives.
    _sent_requests: float = field(init=False, default=0.0)
    _sent_tokens: float = field(init=False, default=0.0)
    _probe_in_flight: bool = field(init=False, default=False)
    _anchor: _Calibration | None = field(init=False, default=None)
    _first_sent: float | None = field(init=False, default=None)
    _first_acquire: bool = field(init=False, default=True)
    _told_unknown: bool = field(init=False, default=False)
    #: a 429 halves the burst; successes widen it back
    _burst_factor: float = field(init=False, default=1.0)

    #: seconds between two calibration points
    calibration_window_s = 0.5

    def __post_init__(self) -> None:
        if self.limits is not None:
            self._build(self.limits, self.now)

    def _build(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.requests = TokenBucket(limits.rpm, limits.burst_s, now) if limits.rpm else None
        self.tokens = TokenBucket(limits.tpm, limits.burst_s, now) if limits.tpm else None
        if self.tokens is not None:
            # A cautious first burst: until the headers calibrate our estimates, the server may count more.
            self.tokens.level = self.tokens.capacity * self.initial_token_fill

    #: share of the token bucket available at the start
    initial_token_fill = 0.5

    def scale(self, estimate: int) -> int:
        return math.ceil(estimate * self.ratio) if self.ratio != 1.0 else estimate

    def clock_acquire(self, tokens: int, now: float) -> float:
        """:meth:`acquire` with an explicit time."""
        if self.limits is None:
            # Limits unknown: one probe request at a time until a response's headers tell them.
            if self._probe_in_flight:
                return 0.05
            self._probe_in_flight = True
            self._charged_requests += 1
            self._charged_tokens += tokens
            return 0.0
        requests, bucket = self.requests, self.tokens
        if self._first_acquire:
            # Time before the first request earns no refill: the cautious first burst stays cautious however
            # long start-up took.
            self._first_acquire = False
            for started in (requests, bucket):
                if started is not None:
                    started.updated = now
        wait = requests.wait_time(1, now) if requests is not None else 0.0
        if bucket is not None:
            wait = max(wait, bucket.wait_time(tokens, now))
        if wait > 0.0:
            return wait
        if requests is not None:
            requests.charge(1, now)
        if bucket is not None:
            bucket.charge(tokens, now)
        self._charged_requests += 1
        self._charged_tokens += tokens
        return 0.0

    def on_wire(self, tokens: int, now: float) -> tuple[float, float]:
        if self._first_sent is None:
            self._first_sent = now
        self._sent_requests += 1
        self._sent_tokens += tokens
        return (self._sent_requests, self._sent_tokens)

    def mark(self) -> tuple[float, float]:
        """Cumulative (requests, tokens) charged so far."""
        return (self._charged_requests, self._charged_tokens)

    def clock_observe(
        self, headers: Mapping[str, str] | None, sent_at: float, mark: tuple[float, float], now: float
    ) -> None:
        """:meth:`observe` with an explicit time."""
        if self.limits is None:
            self._probe_in_flight = False
            if headers is None:
                return  # no answer: the next request probes again
            seen = parse_limit_headers(headers)
            rpm = max(1, round(seen.limit_requests)) if seen.limit_requests else None
            tpm = max(1, round(seen.limit_tokens)) if seen.limit_tokens else None
            if rpm is None and tpm is None:
                # Not "unlimited": the next answer that carries the headers sets the limits; until then, probes.
                if not self._told_unknown:
                    self._told_unknown = True
                    log.warning("rate_limits_unknown", detail="no x-ratelimit-limit-* headers yet: sending one "
                                "request at a time until an answer carries them; give limits to go faster")
                return
            log.info("rate_limits_learned", rpm=rpm, tpm=tpm)
            self._build(Limits(rpm=rpm, tpm=tpm), now)
            return
        if not headers:
            return
        seen = parse_limit_headers(headers)
        elapsed = max(0.0, now - sent_at)
        self._sync(self.requests, seen.limit_requests, seen.remaining_requests, elapsed,
                   self._charged_requests - mark[0], now)
        self._sync(self.tokens, seen.limit_tokens, seen.remaining_tokens, elapsed,
                   self._charged_tokens - mark[1], now)
        if seen.limit_tokens and seen.remaining_tokens is not None:
            self._calibrate(seen.limit_tokens, seen.remaining_tokens, sent_at, mark[1])
        if self._burst_factor < 1.0:
            self._burst_factor = min(1.0, self._burst_factor + 0.01)
            self._apply_burst(now)

    def _burst_s(self) -> float:
        return (self.limits.burst_s if self.limits is not None else 1.0) * self._burst_factor

    def _apply_burst(self, now: float) -> None:
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.set_rate(bucket.per_minute, self._burst_s(), now)

    def _sync(
        self, bucket: TokenBucket | None, limit: float | None, remaining: float | None,
        elapsed: float, charged_since: float, now: float,
    ) -> None:
        if bucket is None or limit is None or remaining is None:
            return
        if limit < bucket.per_minute * 0.999:
            # The server's limit is lower than configured: it is the truth.
            log.warning("rate_limit_lowered", configured=bucket.per_minute, server=limit)
            bucket.set_rate(limit, self._burst_s(), now)
        most = remaining + elapsed * limit / 60.0 - charged_since - bucket.capacity * self._safety()
        bucket.lower_to(most, now)

    def _safety(self) -> float:
        return self.limits.safety if self.limits is not None else 0.0

    def _calibrate(self, limit: float, remaining: float, sent_at: float, charged: float) -> None:
        deficit = limit - remaining
        anchor = self._anchor
        if anchor is None and self._first_sent is not None:
            # First answer: measure from our first request, taking the server's bucket as full then. If it was
            # not (another client spent from it), the ratio comes out high: cautious, and the next window fixes it.
            anchor = _Calibration(self._first_sent, 0.0, 0.0)
        if anchor is None or deficit <= 0:
            self._anchor = _Calibration(sent_at, deficit, charged)
            return
        span = sent_at - anchor.sent_at
        if span < self.calibration_window_s and anchor.sent_at != self._first_sent:
            return  # out-of-order answers (span < 0) and short spans are too noisy to learn from
        ours = charged - anchor.charged
        refill = span * limit / 60.0
        if deficit < refill:
            # The server's bucket may have been full somewhere in the window, and refill beyond full is not
            # refill: the window says nothing (without this, an idle limit drives the ratio up).
            self._anchor = _Calibration(sent_at, deficit, charged)
            return
        theirs = deficit - anchor.deficit + refill
        self._anchor = _Calibration(sent_at, deficit, charged)
        if ours <= 0 or theirs <= 0:
            return
        # Multiplicative: charges in the window were already scaled by the old ratio. A step is capped so one
        # odd window (a burst of answers out of order) cannot swing it far.
        step = min(1.5, max(0.67, theirs / ours))
        self.ratio = min(4.0, max(0.25, self.ratio * step))

    def clock_refund(self, tokens: int, now: float) -> None:
        if self.tokens is not None and tokens > 0:
            self.tokens.refund(tokens, now)
            self._charged_tokens -= tokens
            self._sent_tokens -= tokens

    def clock_rate_limited(self, kind: str | None, tokens: int, now: float) -> None:
        """Empty the bucket the server says is empty, and halve the burst until successes widen it again."""
        # The server charged nothing for a refused request: keep our cumulative count in step with its.
        self._charged_requests -= 1
        self._charged_tokens -= tokens
        self._sent_requests -= 1
        self._sent_tokens -= tokens
        if self.limits is None:
            self._probe_in_flight = False  # the probe got no limits: the next request probes again
            return
        self._burst_factor = max(0.25, self._burst_factor * 0.5)
        self._apply_burst(now)
        for name, bucket, charge in (("requests", self.requests, 1), ("tokens", self.tokens, tokens)):
            if bucket is not None:
                # The refused request's charge is not owed (a large one left the bucket in debt); then the bucket
                # the server says is empty is empty.
                bucket.refund(charge, now)
                if kind in (None, name):
                    bucket.lower_to(0.0, now)

    def snapshot(self) -> Limits | None:
        return self.limits


class ClockedLimiter:
    """Adapts :class:`LocalLimiter` (pure, explicit times) to the async :class:`Limiter` seam with a clock."""

    __slots__ = ("_clock", "local")

    def __init__(self, limits: Limits | None, clock: _Clock) -> None:
        self._clock = clock
        self.local = LocalLimiter(limits, clock.now())

    def scale(self, estimate: int) -> int:
        return self.local.scale(estimate)

    async def acquire(self, tokens: int) -> float:
        return self.local.clock_acquire(tokens, self._clock.now())

    def on_wire(self, tokens: int) -> tuple[float, float]:
        return self.local.on_wire(tokens, self._clock.now())

    async def observe(self, headers: Mapping[str, str] | None, sent_at: float, mark: tuple[float, float]) -> None:
        self.local.clock_observe(headers, sent_at, mark, self._clock.now())

    async def refund(self, tokens: int) -> None:
        self.local.clock_refund(tokens, self._clock.now())

    async def rate_limited(self, kind: str | None, tokens: int) -> None:
        self.local.clock_rate_limited(kind, tokens, self._clock.now())

    def snapshot(self) -> Limits | None:
        return self.local.snapshot()


class _Clock(Protocol):
    def now(self) -> float: ...
