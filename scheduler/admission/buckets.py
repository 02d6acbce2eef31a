"""The state a store keeps for one limit scope, and the few transitions a store applies to it.

This is all the arithmetic a store does: refill at the rates it is given, admit (all dimensions or none) leaving
the floors it is given, count what was admitted and sent, lower levels to the bounds it is given, give charges
back, shrink and widen the burst. What the rates, bursts, floors and bounds are (the policy: header sync,
calibration, reservations) is decided by :mod:`scheduler.admission.model`, once, for every store. The in-process
store runs these methods; the Redis store runs the same transitions as Lua scripts (``lua/*.lua``), and
``tests/test_admission_stores.py`` drives both with one trace to prove they agree.

Dimensions are ``requests``, ``tokens``, ``input_tokens`` and ``output_tokens``; counters also keep ``raw`` (our
uncalibrated token estimate, what calibration compares the server's count with).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["COUNTERS", "DIMENSIONS", "BucketParams", "BucketState", "Hold"]

#: the limits a scope can have
DIMENSIONS = ("requests", "tokens", "input_tokens", "output_tokens")
#: what is counted as admitted and as sent: the dimensions, and our raw token estimate
COUNTERS = (*DIMENSIONS, "raw")
# Float refills drift by a few ulps: a request that waited exactly the time asked for must fit.
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class BucketParams:
    """What the model asks of a store for one scope.

    ``rates`` are the configured rates per second of the limited dimensions (a dimension not listed is not
    limited); a lower limit the server reported (``learned``, shared in the store) wins. A bucket holds
    ``burst_s`` of its rate, less the ``keep`` share, times the burst factor (halved by 429s, widened back by
    answers), and at least one request. A new bucket starts at ``fill`` of that, and with at least one unit (a
    slow limit's first request goes at once).
    """

    rates: Mapping[str, float]
    burst_s: float = 1.0
    keep: float = 0.0
    fill: Mapping[str, float] = field(default_factory=dict)
    #: seconds a scope's state outlives its last use (the Redis keys expire; longer than a full refill)
    ttl_s: float = 120.0


@dataclass(slots=True)
class Hold:
    """A waiter's claim: the owner's large request waits for room that other owners' admissions leave free."""

    owner: str
    needs: dict[str, float]
    expires: float


@dataclass(slots=True)
class BucketState:
    """One scope's levels, counters, burst factor, learned limits and hold."""

    levels: dict[str, float] = field(default_factory=dict)
    updated: float | None = None
    burst: float = 1.0
    #: the lowest per-minute limit the server reported, by dimension
    learned: dict[str, float] = field(default_factory=dict)
    charged: dict[str, float] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)
    hold: Hold | None = None
    # (rate, cap) by dimension for the params they were worked out for: they change only with the params, the
    # burst factor or a learned limit, and every admission needs them.
    _table: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False, compare=False)
    _table_for: tuple[BucketParams, float] | None = field(default=None, repr=False, compare=False)

    # -- derived -----------------------------------------------------------------------------------------------

    def rates_and_caps(self, p: BucketParams) -> dict[str, tuple[float, float]]:
        """:meth:`rate` and :meth:`cap` of every dimension."""
        table_for = self._table_for
        if table_for is None or table_for[0] is not p or table_for[1] != self.burst:
            self._table = {dim: (self.rate(p, dim), self.cap(p, dim)) for dim in p.rates}
            self._table_for = (p, self.burst)
        return self._table

    def rate(self, p: BucketParams, dim: str) -> float:
        """Refill per second: the configured rate, or the server's lower limit."""
        learned = self.learned.get(dim)
        return p.rates[dim] if learned is None else min(p.rates[dim], learned / 60.0)

    def cap(self, p: BucketParams, dim: str) -> float:
        """The most the bucket holds now."""
        return max(1.0, self.rate(p, dim) * p.burst_s * (1.0 - p.keep) * self.burst)

    # -- transitions -------------------------------------------------------------------------------------------

    def refill(self, p: BucketParams, now: float) -> None:
        """Bring the levels to ``now`` (a new scope starts part full; time never runs backwards)."""
        table, levels = self.rates_and_caps(p), self.levels
        if self.updated is None:
            for dim, (_, cap) in table.items():
                levels[dim] = _start(cap, p.fill.get(dim, 1.0))
            self.updated = now
            return
        elapsed = now - self.updated
        for dim, (rate, cap) in table.items():
            level = levels.get(dim)
            if level is None:
                levels[dim] = _start(cap, p.fill.get(dim, 1.0))
            elif elapsed > 0:
                levels[dim] = min(cap, level + elapsed * rate)
            else:
                levels[dim] = min(cap, level)
        if elapsed > 0:
            self.updated = now

    def acquire(
        self, p: BucketParams, costs: Mapping[str, float], floor: float, owner: str, claim: bool, grace_s: float,
        now: float,
    ) -> tuple[float, str | None]:
        """Charge ``costs`` if every limited dimension has room for them above ``floor`` (a share of each
        bucket kept for more urgent work) and above another owner's hold; else charge nothing.

        A cost larger than a whole bucket needs a full bucket (and leaves it in debt), so it waits instead of
        forever. Returns ``(0.0, None)`` when charged, else the seconds to wait and the dimension that binds; a
        refused owner with ``claim`` holds what it needs, so later admissions of other owners leave it room.
        """
        self.refill(p, now)
        hold = self.hold
        if hold is not None and hold.expires <= now:
            hold = self.hold = None
        other = hold.needs if hold is not None and hold.owner != owner else None
        levels, wait, binding = self.levels, 0.0, None
        for dim, (rate, cap) in self.rates_and_caps(p).items():
            need = costs.get(dim, 0.0)
            if floor:
                need = min(need, cap * (1.0 - floor)) + cap * floor
            elif need > cap:
                need = cap
            if other is not None:
                need += other.get(dim, 0.0)
            level = levels[dim]
            if level < need - _EPS:
                dim_wait = (need - level) / rate
                if dim_wait > wait:
                    wait, binding = dim_wait, dim
        if wait > 0.0:
            if claim and other is None:
                needs = {dim: min(costs.get(dim, 0.0), cap * (1.0 - floor)) + cap * floor
                         for dim, (_, cap) in self.rates_and_caps(p).items()}
                own = max(((needs[d] - levels[d]) / self.rate(p, d) for d in p.rates), default=0.0)
                self.hold = Hold(owner, needs, now + max(0.0, own) + grace_s)
            return wait, binding
        for dim in p.rates:
            levels[dim] -= costs.get(dim, 0.0)
        charged = self.charged
        for name, value in costs.items():
            charged[name] = charged.get(name, 0.0) + value
        if hold is not None and hold.owner == owner:
            self.hold = None
        return 0.0, None

    def wire(self, costs: Mapping[str, float]) -> dict[str, float]:
        """Count ``costs`` as sent; returns the cumulative counts sent, these included (the request's mark)."""
        for name, value in costs.items():
            self.sent[name] = self.sent.get(name, 0.0) + value
        return dict(self.sent)

    def sync(
        self, p: BucketParams, bounds: Mapping[str, float], marks: Mapping[str, float],
        learned: Mapping[str, float], widen: float, now: float,
    ) -> None:
        """Lower each level to what the server can have left: ``bounds[dim]`` (its remaining when a request
        arrived, plus refill since, less a safety share) less what was sent after that request (``marks``).
        Never raises a level. Keep the lowest limit the server reported; widen the burst by ``widen``."""
        for dim, value in learned.items():
            if value > 0 and value < self.learned.get(dim, math.inf):
                self.learned[dim] = value
                self._table_for = None
        self.refill(p, now)
        for dim, bound in bounds.items():
            if dim in self.levels:
                after = self.sent.get(dim, 0.0) - marks.get(dim, 0.0)
                self.levels[dim] = min(self.levels[dim], bound - after)
        if self.burst < 1.0 and widen > 0.0:
            self.burst = min(1.0, self.burst + widen)
            self.refill(p, now)

    def give_back(
        self, p: BucketParams, amounts: Mapping[str, float], uncount: bool, empty: tuple[str, ...],
        shrink: float, min_burst: float, now: float,
    ) -> None:
        """Give ``amounts`` back to the buckets (a refund, or the charge of a refused request), and with
        ``uncount`` take them out of the admitted and sent counters too (the server never counted them). Then
        empty the ``empty`` buckets (the server says they are empty) and multiply the burst factor by
        ``shrink`` (1.0: unchanged), not below ``min_burst``."""
        self.refill(p, now)
        if shrink != 1.0:
            self.burst = max(min_burst, self.burst * shrink)
            self.refill(p, now)  # levels above the smaller bucket are capped
        for dim in p.rates:
            amount = amounts.get(dim, 0.0)
            if amount:
                self.levels[dim] = min(self.cap(p, dim), self.levels[dim] + amount)
        if uncount:
            for name, value in amounts.items():
                self.charged[name] = self.charged.get(name, 0.0) - value
                self.sent[name] = self.sent.get(name, 0.0) - value
        for dim in empty:
            if dim in self.levels:
                self.levels[dim] = min(self.levels[dim], 0.0)


def _start(cap: float, fill: float) -> float:
    """A new bucket's level: ``fill`` of its cap, and at least one unit."""
    return max(cap * fill, min(cap, 1.0))
