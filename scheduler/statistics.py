"""What a pool has done: counters kept as it works, and the snapshot :meth:`Pool.statistics` returns."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .limits import Limits

__all__ = ["Counters", "EndpointStatistics", "PoolStatistics", "RateMeter", "ScopeStatistics"]


@dataclass(frozen=True, slots=True)
class ScopeStatistics:
    """One limit scope: an endpoint's model with its own buckets."""

    #: the endpoint's name (as in :class:`EndpointStatistics`)
    endpoint: str
    model: str | None
    #: the limits in force (None while still unknown)
    limits: Limits | None
    #: server tokens per token of our estimate, as learned from the headers
    token_ratio: float


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """One endpoint of the pool."""

    #: its name (host and a short key fingerprint unless named)
    name: str
    #: attempts sent to it
    requests: int
    #: 5xx, timeouts and dropped connections
    failures: int
    in_flight: int
    #: its circuit breaker: "closed", "open" or "half-open"
    circuit: str
    #: why it left the run (a refused key, a spent quota), or None
    retired: str | None
    #: its rate-limit dialect, as recognised (None: not yet)
    dialect: str | None
    #: requests it may have in flight, where no limits are stated and concurrency adapts (else None)
    concurrency: int | None


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool's counters (see :meth:`Pool.statistics`)."""

    submitted: int
    queued: int
    in_flight: int
    succeeded: int
    failed: int
    #: attempts that will be (or were) made again
    retries: int
    #: 429 rate_limit_exceeded answers (a shortage of capacity is counted in ``capacity_refused``)
    rate_limited: int
    #: HTTP attempts made, answered or not
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    #: tokens charged against the token limit (our estimates, calibrated)
    charged_tokens: int
    #: admissions over the last 10 seconds, per minute
    requests_per_minute: float
    tokens_per_minute: float
    limits: Limits | None
    #: server tokens per token of our estimate, as learned from the headers
    token_ratio: float
    #: results whose output hit the cap (finish_reason "length")
    truncated: int
    #: US dollars spent, from usage and the price table (models without a price count nothing)
    cost_usd: float
    #: why admission stopped, if it did
    stopped: str | None
    budget_usd: float | None = None
    #: worst-case cost held for jobs in flight, under a budget
    reserved_usd: float = 0.0
    #: worst-case cost of attempts that got no answer (the server may have billed them), counted against a budget
    uncertain_usd: float = 0.0
    #: answers served from the response cache, or shared with an identical request in flight
    cache_hits: int = 0
    #: cacheable requests that went to the API
    cache_misses: int = 0
    #: what the cache hits would have cost
    cache_saved_usd: float = 0.0
    #: times a job moved on to a fallback model
    fallbacks: int = 0
    #: times a 429 paused all dispatch
    pauses: int = 0
    #: jobs ended by an unexpected exception (code internal_error)
    internal_errors: int = 0
    #: combined embeddings requests answered, and the jobs they answered
    coalesced_requests: int = 0
    coalesced_jobs: int = 0
    #: structured outputs asked again because the answer did not parse (not counted in ``retries``)
    parse_retries: int = 0
    #: jobs whose chat was trimmed to fit the context window
    trimmed_jobs: int = 0
    #: every limit scope used so far (an endpoint's model with its own buckets)
    scopes: tuple[ScopeStatistics, ...] = ()
    #: every endpoint of the pool
    endpoints: tuple[EndpointStatistics, ...] = ()
    #: 429s for a shortage of capacity (flex ``resource_unavailable``, an overloaded server): backed off, not a
    #: sign to slow down
    capacity_refused: int = 0
    #: flex jobs sent at the standard tier after a capacity 429 (``Pool(flex_fallback="standard")``)
    flex_fallbacks: int = 0


class Counters:
    """The running tallies behind :class:`PoolStatistics` (plain attributes: they are bumped on the hot path)."""

    __slots__ = (
        "attempts",
        "cache_hits",
        "cache_misses",
        "cache_saved_usd",
        "capacity_refused",
        "charged_tokens",
        "coalesced_jobs",
        "coalesced_requests",
        "completion_tokens",
        "cost_usd",
        "failed",
        "fallbacks",
        "flex_fallbacks",
        "in_flight",
        "internal_errors",
        "parse_retries",
        "pauses",
        "prompt_tokens",
        "rate_limited",
        "retries",
        "submitted",
        "succeeded",
        "trimmed",
        "truncated",
    )

    def __init__(self) -> None:
        self.submitted = self.succeeded = self.failed = self.retries = self.rate_limited = 0
        self.attempts = self.in_flight = self.prompt_tokens = self.completion_tokens = 0
        self.charged_tokens = self.truncated = self.internal_errors = self.pauses = 0
        self.cache_hits = self.cache_misses = self.fallbacks = 0
        self.coalesced_requests = self.coalesced_jobs = 0
        self.capacity_refused = self.flex_fallbacks = 0
        self.parse_retries = self.trimmed = 0
        self.cost_usd = self.cache_saved_usd = 0.0


class RateMeter:
    """Admissions per second over a sliding window, for the rates in statistics()."""

    __slots__ = ("_seconds", "window")

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._seconds: deque[list[float]] = deque()  # [second, requests, tokens]

    def add(self, now: float, tokens: int) -> None:
        second = math.floor(now)
        if self._seconds and self._seconds[-1][0] == second:
            entry = self._seconds[-1]
            entry[1] += 1
            entry[2] += tokens
        else:
            self._seconds.append([second, 1, tokens])
            while self._seconds[0][0] <= second - self.window:
                self._seconds.popleft()

    def per_minute(self, now: float) -> tuple[float, float]:
        horizon = math.floor(now) - self.window
        recent = [entry for entry in self._seconds if entry[0] > horizon]
        scale = 60.0 / self.window
        return sum(e[1] for e in recent) * scale, sum(e[2] for e in recent) * scale
