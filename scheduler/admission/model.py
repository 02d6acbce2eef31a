"""The policy of admission for one limit scope, written once for every store.

A scope (an endpoint, a key and a model) has a bucket per limited dimension. This module decides everything
about them that is not bucket arithmetic: the rates and bursts to enforce (configured, or learned from the first
answer that states them), what a request costs in each dimension (our estimate, calibrated to the server's
count), the share of each bucket held for urgent work, what each answer's headers allow (header sync), how the
server counts (a continuously refilled bucket charged the reservation is calibrated; a fixed window or a server
that counts real usage is refunded instead), and what a 429 does (empty the bucket, halve the burst). The
stores (:mod:`scheduler.admission.stores`) only apply the resulting numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from ..dialects import LimitReport, Window
from ..limits import Limits
from .buckets import BucketParams
from .calibration import Calibration

__all__ = ["ScopeModel", "SyncPlan"]

log = structlog.get_logger("scheduler")

# A new bucket starts half full: until the headers calibrate our estimates the server may count more tokens than
# we do, and the first requests reach the server spread over new connections while the bucket refills on our
# clock (a full first burst met ~1% 429s at 3,000 RPM against a server enforcing one-second bursts).
_FILL = {"requests": 0.5, "tokens": 0.5, "input_tokens": 0.5, "output_tokens": 0.5}
# A 429 halves the burst, down to a quarter; every answer synced widens it back by this much.
_SHRINK, _MIN_BURST, _WIDEN = 0.5, 0.25, 0.01
_TOKEN_DIMS = frozenset({"tokens", "input_tokens", "output_tokens"})


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What one answer allows: ``bounds`` to lower the buckets to, ``learned`` lower limits."""

    bounds: Mapping[str, float]
    learned: Mapping[str, float]


class ScopeModel:
    """Admission policy for one scope in one process.

    Args:
        limits: the limits to stay under; None learns them from the first answer that states them (one request
            at a time until then).
        keep: share of each burst never held (several processes share the bucket: their requests leave in a
            slightly different order and timing than they were admitted in).
        reserve: the capacity held for urgent work once limits are learned (configured limits carry their own
            ``Limits.reserve``).
    """

    __slots__ = ("_lowered", "_params", "_reserve", "_told_unknown", "_usage", "calibration", "keep", "limits")

    def __init__(self, limits: Limits | None, *, keep: float = 0.0, reserve: Mapping[int, float] | None = None
                 ) -> None:
        self.limits = limits
        self.keep = keep
        self._reserve = dict(reserve or {})
        self.calibration = Calibration()
        #: dimensions the server counts by real usage: their unused charge is given back on each answer
        self._usage: frozenset[str] = frozenset({"tokens"}) if limits is not None and limits.refund_unused else (
            frozenset())
        self._told_unknown = False
        self._lowered: dict[str, float] = {}
        self._params: BucketParams | None = None

    # -- what the store enforces ---------------------------------------------------------------------------

    def params(self) -> BucketParams | None:
        """The buckets' rates and burst (None while the limits are unknown)."""
        if self._params is None and self.limits is not None:
            per_minute = self.limits.per_minute()
            self._params = BucketParams(
                rates={dim: limit / 60.0 for dim, limit in per_minute.items()},
                burst_s=self.limits.burst_s, keep=self.keep,
                fill={dim: _FILL[dim] for dim in per_minute}, ttl_s=2 * self.limits.burst_s + 60.0,
            )
        return self._params

    @property
    def ratio(self) -> float:
        """Server tokens per token of our estimate."""
        return self.calibration.ratio

    def costs(self, estimate: int, output: int) -> dict[str, float]:
        """What a request of ``estimate`` tokens (``output`` of them its output reservation) costs in each
        dimension, in the server's units; ``raw`` keeps our own count for calibration."""
        ratio = self.calibration.ratio
        prompt = max(0, estimate - output)
        return {"requests": 1.0, "tokens": math.ceil(estimate * ratio), "input_tokens": math.ceil(prompt * ratio),
                "output_tokens": float(output), "raw": float(estimate)}

    def floor(self, priority: int) -> float:
        """The share of each bucket a job of ``priority`` must leave for more urgent work."""
        reserve = self.limits.reserve if self.limits is not None else None
        if not reserve:
            return 0.0
        return min(0.95, sum(share for level, share in reserve.items() if priority > level))

    def too_large(self, estimate: int) -> int | None:
        """The token limit a request of ``estimate`` tokens exceeds on its own (None: it can fit)."""
        tpm = self.limits.tpm if self.limits is not None else None
        return tpm if tpm is not None and estimate > tpm else None

    # -- what the server says ------------------------------------------------------------------------------

    def learn(self, report: LimitReport | None) -> bool:
        """Take the limits from the first answer that states them; True when they were learned now."""
        if self.limits is not None:
            return False
        found = {
            name: max(1, round(window.limit))
            for name, window in (("rpm", report.requests), ("tpm", report.tokens), ("itpm", report.input_tokens),
                                 ("otpm", report.output_tokens))
            if window is not None and window.limit is not None and not window.upstream
        } if report is not None else {}
        if "itpm" in found or "otpm" in found:
            found.pop("tpm", None)  # Anthropic's combined figure is their sum: admit against each
        if not found:
            if not self._told_unknown:
                self._told_unknown = True
                log.warning("rate_limits_unknown", detail="no rate-limit headers yet: sending one request at a "
                            "time until an answer carries them; give limits to go faster")
            return False
        log.info("rate_limits_learned", **found)
        # Learned limits keep the reservation: a bulk run learning its limits still leaves room for urgent work.
        self.limits = Limits(rpm=found.get("rpm"), tpm=found.get("tpm"), itpm=found.get("itpm"),
                             otpm=found.get("otpm"), reserve=self._reserve)
        self._params = None
        return True

    def plan_sync(self, report: LimitReport, elapsed: float, sent_at: float, marks: Mapping[str, float]
                  ) -> SyncPlan:
        """What ``report`` (an answer to a request sent ``elapsed`` seconds ago) allows each bucket now, and
        the lower limits it states; calibrates the token ratio on the way."""
        assert self.limits is not None
        limits = self.limits.per_minute()
        bounds: dict[str, float] = {}
        learned: dict[str, float] = {}
        usage = set(self._usage)
        for dim, window in (("requests", report.requests), ("tokens", report.tokens),
                            ("input_tokens", report.input_tokens), ("output_tokens", report.output_tokens)):
            configured = limits.get(dim)
            if configured is None or window is None or window.upstream or window.limit is None:
                continue
            if window.charges == "usage" and dim in _TOKEN_DIMS:
                usage.add(dim)
            if window.limit < configured * 0.999:
                # The server's limit is lower than configured: it is the truth (said once per new figure).
                learned[dim] = window.limit
                if self._lowered.get(dim) != window.limit:
                    self._lowered[dim] = window.limit
                    log.warning("rate_limit_lowered", dimension=dim, configured=configured, server=window.limit)
            limit = min(configured, window.limit)
            bound = self._bound(window, limit, elapsed)
            if bound is not None:
                bounds[dim] = bound
            if dim == "tokens" and window.remaining is not None:
                self._calibrate_on(window, configured, sent_at, marks)
        self._usage = frozenset(usage)
        return SyncPlan(bounds, learned)

    def _bound(self, window: Window, limit: float, elapsed: float) -> float | None:
        """The most the server can have left now, less a safety share of our burst."""
        if window.remaining is None:
            return None
        assert self.limits is not None
        safety = self.limits.safety * limit / 60.0 * self.limits.burst_s
        if window.refill == "continuous":
            return window.remaining + elapsed * limit / 60.0 - safety
        if window.reset_s is not None and elapsed >= window.reset_s:
            return None  # the window has turned since: what it said is stale
        return window.remaining - safety

    def _calibrate_on(self, window: Window, configured: float, sent_at: float, marks: Mapping[str, float]) -> None:
        # Only a continuously refilled bucket that keeps the reservation shows our estimate's error; a fixed
        # window or a count of real usage would teach a wrong ratio (the refill term would read as consumption).
        if window.refill != "continuous" or window.charges != "reservation":
            return
        assert window.remaining is not None and window.limit is not None
        # Told less than the server's limit (a share of the organisation's, the manual split), we are not alone
        # on its bucket by our own account: its room is ours to leave, its consumption partly others'. Neither
        # says anything of our estimates (read as ours, four processes each told a quarter learned 1.76 and ran
        # at half speed); a 429 on tokens still steps the ratio up.
        if configured < window.limit * 0.999:
            return
        self.calibration.observe(window.limit, window.remaining, sent_at, marks.get("raw", 0.0))

    def usage_refund(self, costs: Mapping[str, float], prompt_tokens: int, completion_tokens: int
                     ) -> dict[str, float]:
        """What to give back after an answer, for dimensions the server counts by real usage."""
        if not self._usage:
            return {}
        used = {"tokens": prompt_tokens + completion_tokens, "input_tokens": prompt_tokens,
                "output_tokens": completion_tokens}
        return {dim: costs[dim] - used[dim] for dim in self._usage if costs.get(dim, 0.0) > used[dim]}

    def refusal(self, dimension: str | None) -> tuple[tuple[str, ...], float, float]:
        """A 429 about ``dimension`` (None: unknown): the buckets to empty, the burst's shrink factor and floor."""
        params = self.params()
        dims = tuple(params.rates) if params is not None else ()
        empty = (dimension,) if dimension in dims else dims
        return empty, _SHRINK, _MIN_BURST

    @property
    def widen(self) -> float:
        """How much each synced answer widens a burst that 429s narrowed."""
        return _WIDEN
