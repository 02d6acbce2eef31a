"""Adaptive concurrency for servers that state no limits: how many requests to keep in flight, found by probing.

vLLM, Ollama and llama.cpp send no rate-limit headers: what limits them is how many requests they work on at
once (batch slots, KV-cache memory, ``OLLAMA_NUM_PARALLEL``, ``--parallel``). Past that point a request waits in
the server's queue: throughput stays flat while latency grows, until the queue overflows (Ollama answers 503
past ``OLLAMA_MAX_QUEUE``, ollama/ollama#4144) or requests time out. A fixed ``workers`` is either below that
point (capacity wasted) or above it (queueing, timeouts). :class:`AdaptiveConcurrency` finds it, the way TCP
congestion control finds a path's window and Netflix's concurrency-limits finds a service's
(https://github.com/Netflix/concurrency-limits; "Performance Under Load",
https://netflixtechblog.medium.com/performance-under-load-3e6fa9a60581):

- **Baseline**: the first round, at ``initial`` in flight, measures the unloaded latency over at least
  ``min_samples`` answers; nothing grows before it. After that the baseline is the lowest round mean of the last
  ``baseline_rounds`` rounds (a windowed minimum, like Vegas' ``rtt_noload`` and BBR's min-RTT filter; the
  oscillation around the knee keeps re-measuring it). Round means, not single answers: the minimum of noisy
  single latencies sits well below the typical one and would read as congestion.
- **Rounds**: a round ends when ``max(limit, min_samples)`` requests sent after it began have answered (a server's
  FIFO queue answers the first requests of a burst at once; only the rest show the wait), so each round measures
  one limit.
- **Additive increase**: a round without latency growth, in which the pool kept at least half the limit in
  flight, adds 1 (AIMD's +1 per round trip, as ``AIMDLimit``; a limit the pool does not use says nothing).
  Until the first sign of congestion every success adds 1 instead, doubling per round trip (TCP's slow start),
  until a smoothed latency of all answers passes ``tolerance`` times the baseline (as HyStart leaves slow start
  on delay growth): a fresh pool reaches a large server's knee in a few round trips.
- **Latency growth**: a round whose mean latency passes ``tolerance`` times the baseline means the server is
  queueing: the limit is multiplied by ``baseline / recent`` (Little's law: the in-flight count a server serves
  without a queue is its throughput times its unloaded latency; ``Gradient2Limit`` applies the same ratio),
  never by less than ``backoff``. So the limit settles between the knee and ``tolerance`` times it: a little
  queueing keeps the server busy, and ``tolerance`` trades that latency for robustness to noisy latencies.
- **Failures**: a 429, 503/529, timeout or dropped connection multiplies the limit by ``backoff``, at most once
  per latency window, so one burst of failures from a single overload does not collapse the limit to its minimum.

Latency can be normalised by the work a request asked for (``work=``, e.g. its output tokens), since an LLM's
latency grows with the length of what it writes, not only with load.

The controller is pure: every method takes ``now``, so tests drive it with exact times.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigurationError

__all__ = ["AdaptiveConcurrency", "ConcurrencyStats", "Failure"]

#: how an attempt failed: ``rate_limited`` (429), ``overloaded`` (503, 529), ``timeout``, ``connection`` (reset,
#: refused, dropped) are overload signals; ``error`` (any other failure) leaves the limit alone
Failure = Literal["rate_limited", "overloaded", "timeout", "connection", "error"]
_OVERLOAD = frozenset({"rate_limited", "overloaded", "timeout", "connection"})


@dataclass(frozen=True, slots=True)
class ConcurrencyStats:
    """A snapshot of the controller."""

    #: requests allowed in flight now
    limit: int
    #: the unrounded estimate behind it
    estimate: float
    #: the unloaded latency per unit of work (None until a round has ended)
    baseline_s: float | None
    #: the last round's mean latency per unit of work
    recent_s: float | None
    #: still doubling: no sign of congestion seen yet
    slow_start: bool


class AdaptiveConcurrency:
    """The number of requests to keep in flight to a server that states no limits; see the module docstring.

    Args:
        initial: the limit to start from. Start low: the first round's latency becomes the baseline, and a
            start already past the server's knee would measure a queue as "unloaded".
        min_limit: the limit never goes below this.
        max_limit: nor above this.
        tolerance: latency this many times the baseline means the server is queueing.
        backoff: the factor a failure multiplies the limit by, and the most a latency decrease cuts.
        min_samples: the fewest answers a round's mean (and the baseline) is taken over.
        baseline_rounds: how many rounds the baseline's minimum looks back over.
        default_window_s: the latency window before any latency is known (for spacing failure decreases).

    Raises:
        ConfigurationError: a bound or factor out of range.
    """

    __slots__ = (
        "_decreased_at", "_estimate", "_history", "_recent", "_round_n", "_round_needed", "_round_start",
        "_round_sum", "_round_used", "_rtt", "_short", "_slow_start", "backoff", "default_window_s", "max_limit",
        "min_limit", "min_samples", "tolerance",
    )

    def __init__(
        self, *, initial: int = 1, min_limit: int = 1, max_limit: int = 256, tolerance: float = 1.5,
        backoff: float = 0.5, min_samples: int = 8, baseline_rounds: int = 50, default_window_s: float = 1.0,
    ) -> None:
        if not isinstance(min_limit, int) or min_limit < 1:
            raise ConfigurationError(f"AdaptiveConcurrency: min_limit must be an integer >= 1, got {min_limit!r}")
        if not isinstance(max_limit, int) or max_limit < min_limit:
            raise ConfigurationError(
                f"AdaptiveConcurrency: max_limit must be an integer >= min_limit ({min_limit}), got {max_limit!r}"
            )
        if not isinstance(initial, int) or not min_limit <= initial <= max_limit:
            raise ConfigurationError(
                f"AdaptiveConcurrency: initial must be an integer in [{min_limit}, {max_limit}], got {initial!r}"
            )
        if not tolerance > 1.0:
            raise ConfigurationError(f"AdaptiveConcurrency: tolerance must be above 1, got {tolerance!r}")
        if not 0.0 < backoff < 1.0:
            raise ConfigurationError(f"AdaptiveConcurrency: backoff must be in (0, 1), got {backoff!r}")
        if not isinstance(min_samples, int) or min_samples < 1:
            raise ConfigurationError(f"AdaptiveConcurrency: min_samples must be an integer >= 1, got {min_samples!r}")
        if not isinstance(baseline_rounds, int) or baseline_rounds < 1:
            raise ConfigurationError(
                f"AdaptiveConcurrency: baseline_rounds must be an integer >= 1, got {baseline_rounds!r}"
            )
        if not default_window_s > 0:
            raise ConfigurationError(
                f"AdaptiveConcurrency: default_window_s must be positive, got {default_window_s!r}"
            )
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.tolerance = tolerance
        self.backoff = backoff
        self.min_samples = min_samples
        self.default_window_s = default_window_s
        self._estimate = float(initial)
        self._slow_start = True
        #: round means per unit of work, newest last
        self._history: collections.deque[float] = collections.deque(maxlen=baseline_rounds)
        self._recent: float | None = None
        #: smoothed latency per unit of all answers, whenever sent: the slow-start exit signal
        self._short: float | None = None
        #: smoothed raw latency: the window within which failures count as one overload
        self._rtt: float | None = None
        self._decreased_at: float | None = None
        # Only requests sent after a round began measure it: earlier ones ran under the previous limit.
        self._round_start = -math.inf
        self._round_sum = 0.0
        self._round_n = 0
        #: the pool kept at least half the limit in flight during the round: a limit it used
        self._round_used = False
        self._round_needed = self._needed()

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return max(self.min_limit, min(self.max_limit, math.floor(self._estimate + 1e-9)))

    def _needed(self) -> int:
        return max(self.limit, self.min_samples)

    def on_success(self, latency_s: float, now: float, *, in_flight: int | None = None, work: float = 1.0) -> None:
        """A request answered successfully.

        Args:
            latency_s: how long it took, sending to answer.
            now: the time it answered (``now - latency_s`` is when it was sent).
            in_flight: requests in flight when it answered, itself included (None: assume the pool keeps the
                limit full).
            work: what the request asked of the server (e.g. its output tokens); latency is compared per unit.
        """
        if not (math.isfinite(latency_s) and latency_s >= 0 and math.isfinite(work) and work > 0
                and math.isfinite(now)):
            return  # a sample that cannot be measured says nothing
        per_unit = latency_s / work
        self._rtt = latency_s if self._rtt is None else 0.8 * self._rtt + 0.2 * latency_s
        self._short = per_unit if self._short is None else 0.8 * self._short + 0.2 * per_unit
        used = in_flight is None or 2 * in_flight >= self.limit
        if self._slow_start and self._history:  # no growth before the baseline is measured
            if self._short > min(self._history) * self.tolerance:
                self._slow_start = False  # queueing has begun: stop doubling now, the round's end cuts back
            elif used:
                self._estimate = min(float(self.max_limit), self._estimate + 1.0)
        if now - latency_s > self._round_start:
            self._round_used = self._round_used or used
            self._round_sum += per_unit
            self._round_n += 1
            if self._round_n >= self._round_needed:
                self._end_round(now)

    def on_failure(self, kind: Failure, now: float) -> None:
        """A request failed; overload signals lower the limit, at most once per latency window.

        Args:
            kind: how it failed (see :data:`Failure`).
            now: when it failed.
        """
        if kind not in _OVERLOAD or not math.isfinite(now):
            return
        window = self._rtt if self._rtt is not None else self.default_window_s
        if self._decreased_at is not None and now - self._decreased_at < window:
            return  # the same overload, answered by requests sent before the last decrease
        self._decrease(self.backoff, now)

    def _end_round(self, now: float) -> None:
        recent = self._round_sum / self._round_n
        baseline = min(self._history) if self._history else None
        self._history.append(recent)
        self._recent = recent
        if baseline is not None and recent > baseline * self.tolerance:
            self._decrease(max(self.backoff, baseline / recent), now)
            return
        if not self._slow_start and self._round_used:
            self._estimate = min(float(self.max_limit), self._estimate + 1.0)
        self._new_round(now)

    def _decrease(self, factor: float, now: float) -> None:
        self._estimate = max(float(self.min_limit), self._estimate * factor)
        self._slow_start = False
        self._decreased_at = now
        self._new_round(now)

    def _new_round(self, now: float) -> None:
        self._round_start = now
        self._round_sum = 0.0
        self._round_n = 0
        self._round_used = False
        self._round_needed = self._needed()

    def stats(self) -> ConcurrencyStats:
        """A snapshot of the controller's state."""
        baseline = min(self._history) if self._history else None
        return ConcurrencyStats(self.limit, self._estimate, baseline, self._recent, self._slow_start)

    def __repr__(self) -> str:
        return f"<AdaptiveConcurrency limit={self.limit} estimate={self._estimate:.2f} slow_start={self._slow_start}>"
