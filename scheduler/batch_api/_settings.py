"""What a batch run is told (its settings, how it polls) and what it tells (its statistics, each part's batch)."""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

from .. import errors
from ..clock import Clock
from ..cost import PriceTable
from ..retry import Backoff
from ._plan import BatchLimits

__all__ = ["BatchProgress", "BatchRunStatistics", "Estimate", "Polling", "Settings"]

#: estimates a request's tokens (prompt and output reservation): ``TokenEstimator().estimate`` fits
Estimate = Callable[[str, Mapping[str, Any]], int]


@dataclass(frozen=True, slots=True)
class Polling:
    """How often running batches are polled: ``first_s``, growing by ``factor`` a quiet round up to ``cap_s``,
    each delay jittered by ``±jitter`` (a share), back to ``first_s`` whenever a batch changes status."""

    first_s: float = 2.0
    cap_s: float = 60.0
    factor: float = 1.5
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.first_s <= 0 or self.cap_s < self.first_s or self.factor < 1 or not 0 <= self.jitter < 1:
            raise errors.ConfigurationError(
                "Polling needs first_s > 0, cap_s >= first_s, factor >= 1 and 0 <= jitter < 1"
            )

    def delay(self, quiet_rounds: int, rng: random.Random) -> float:
        """The delay before the next poll after ``quiet_rounds`` polls without a status change."""
        base = min(self.cap_s, self.first_s * self.factor ** min(quiet_rounds, 60))
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """One part of the run: its batch, status and request counts."""

    part: int
    #: the batch now or last running for it (None: not submitted yet)
    batch_id: str | None
    #: the batch's status; "pending" before submission, "held" after a token-limit refusal
    status: str
    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class BatchRunStatistics:
    """A snapshot of a batch run (see :meth:`BatchRun.statistics`)."""

    #: requests planned into batches (input lines, each once), this run and earlier ones
    requests: int
    #: requests with a final result, this run and earlier ones
    finished: int
    #: results yielded by this run: successes and errors
    succeeded: int
    failed: int
    #: results not yielded because the caller had them already (``done``)
    skipped: int
    #: lines put into a later batch after failing or not running in theirs
    retried: int
    #: batches refused for the enqueued-token limit
    refusals: int
    #: US dollars of the successes so far, this run and earlier ones, at Batch API prices
    cost_usd: float
    #: requests without a final result yet, less the lines running batches have completed (what a cut-over would
    #: leave to run online), and their estimated tokens (0 without an estimator)
    requests_left: int
    tokens_left: int
    #: every part, in order
    batches: tuple[BatchProgress, ...]


@dataclass(frozen=True, slots=True)
class Settings:
    """What :func:`~scheduler.batch_api.run_batch` was told (checked there)."""

    done: Container[str]
    model: str | None
    max_attempts: int
    limits: BatchLimits
    polling: Polling
    refusal_backoff: Backoff
    prices: PriceTable
    estimate: Estimate | None
    metadata: Mapping[str, str]
    clock: Clock
    rng: random.Random
