"""The pool's admission seam: a :class:`Limiter` holds one model per limit scope, all on one store.

A scope is what one rate limit covers: an endpoint (base URL and a fingerprint of its key) and a model, as
OpenAI limits each model of an organisation separately. ``Limiter(limits, model_limits={...})`` gives models
their own limits; every scope has its own buckets, learned and synced from its own answers. The store decides
who shares them: :class:`~scheduler.admission.stores.MemoryStore` this process, a Redis store every process.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..clock import Clock, LoopClock
from ..dialects import LimitReport
from ..errors import ConfigurationError
from ..limits import Limits
from .model import ScopeModel
from .stores import BucketStore, Mark, MemoryStore

if TYPE_CHECKING:
    from ..results import Usage

__all__ = ["Limiter", "ScopeLimiter"]

class _Default:
    """The limiter's own limits for a scope (the endpoint gave none of its own)."""


DEFAULT = _Default()

# While the limits are unknown, one probe at a time: the wait before asking again.
_PROBE_POLL_S = 0.05


class ScopeLimiter:
    """Admission for one scope: the model's policy applied through the store."""

    __slots__ = ("_clock", "_key", "_owner", "_probing", "_refused_since", "endpoint", "grace_s", "model",
                 "model_name", "pause_until", "reserve_after_s", "store")

    def __init__(self, model: ScopeModel, store: BucketStore, key: str, *, endpoint: str, model_name: str | None,
                 clock: Clock, owner: str) -> None:
        self.model = model
        self.store = store
        self._key = key
        self._clock = clock
        self._owner = owner
        #: where and what this scope limits, for statistics and logs
        self.endpoint = endpoint
        self.model_name = model_name
        self._probing = False
        self._refused_since: float | None = None
        #: no admission through this scope before then (a 429's retry-after)
        self.pause_until = -math.inf
        #: a request refused this long claims the room it needs, which other owners' admissions leave free
        self.reserve_after_s = 1.0
        #: how long a claim outlives its owner's expected wait (renewed at every refused attempt)
        self.grace_s = 1.0

    @property
    def ratio(self) -> float:
        """Server tokens per token of our estimate, learned from the headers."""
        return self.model.ratio

    def snapshot(self) -> Limits | None:
        """The limits in force (None while unknown)."""
        return self.model.limits

    def costs(self, estimate: int, output: int) -> dict[str, float]:
        """What a request costs in each dimension (see :meth:`ScopeModel.costs`)."""
        return self.model.costs(estimate, output)

    def too_large(self, estimate: int) -> int | None:
        """The token limit a request exceeds on its own, if any."""
        return self.model.too_large(estimate)

    async def acquire(self, costs: Mapping[str, float], priority: int) -> float:
        """Charge ``costs`` if they fit now and return 0.0; else charge nothing and return the seconds to wait."""
        params = self.model.params()
        if params is None:
            if self._probing:
                return _PROBE_POLL_S
            self._probing = True
            return 0.0
        refused_since = self._refused_since
        # Read the clock only when refusals are in play: this is on every admission's path.
        claim = refused_since is not None and self._clock.now() - refused_since >= self.reserve_after_s
        wait, binding = await self.store.acquire(self._key, params, costs, self.model.floor(priority), self._owner,
                                                 claim, self.grace_s)
        if wait > 0.0:
            if refused_since is None:
                self._refused_since = self._clock.now()
            if binding is not None and binding != "requests":
                self.model.calibration.token_bound()
            return wait
        self._refused_since = None
        return 0.0

    def on_wire(self, costs: Mapping[str, float]) -> Mark:
        """An admitted request goes on the wire now: its mark, for the answer's header sync."""
        return self.store.wire(self._key, costs)

    async def observe(self, report: LimitReport | None, sent_at: float, mark: Mark) -> None:
        """Take in what an answer's headers say (``report``; None: no answer, or no usable headers)."""
        marks = await mark if not isinstance(mark, Mapping) else mark
        if self.model.limits is None:
            self._probing = False
            self.model.learn(report)
            return
        params = self.model.params()
        if report is None or marks is None or params is None:
            return
        elapsed = max(0.0, self._clock.now() - sent_at)
        plan = self.model.plan_sync(report, elapsed, sent_at, marks)
        await self.store.sync(self._key, params, plan.bounds, marks, plan.learned, self.model.widen)

    async def settle(self, costs: Mapping[str, float], usage: Usage | None) -> None:
        """An answer came back with ``usage``: give back what a server counting real usage did not count."""
        params = self.model.params()
        if usage is None or params is None:
            return
        refund = self.model.usage_refund(costs, usage.prompt_tokens, usage.completion_tokens)
        if refund:
            await self.store.give_back(self._key, params, refund, True, (), 1.0, 1.0)

    async def refused(self, costs: Mapping[str, float], dimension: str | None) -> None:
        """A 429: the server charged nothing for the request (its whole charge comes back), the bucket it names
        is empty, and the burst halves until answers widen it again."""
        params = self.model.params()
        if params is None:
            self._probing = False  # the probe got no limits: the next request probes again
            return
        empty, shrink, min_burst = self.model.refusal(dimension)
        if "tokens" in empty:
            self.model.calibration.refused()
        await self.store.give_back(self._key, params, costs, True, empty, shrink, min_burst)

    def unlimit(self) -> None:
        """The endpoint states no limits at all (vLLM, Ollama): stop probing; its concurrency paces it."""
        if self.model.limits is None:
            self.model.limits = Limits()
            self._probing = False

    async def levels(self) -> Mapping[str, float]:
        """The buckets' levels now (statistics, tests)."""
        params = self.model.params()
        return {} if params is None else (await self.store.state(self._key, params)).levels


class Limiter:
    """Admission for every scope of a pool.

    Args:
        limits: the limits of every model not in ``model_limits``; None learns each scope's limits from its
            answers' headers.
        model_limits: limits of particular models, by name.
        store: where the buckets live (default: this process; a Redis store shares them).
        clock: the pool's clock (the in-process store's time).
        reserve: capacity held for urgent work in scopes whose limits are learned from the headers, as
            ``Limits.reserve`` (``{0: 0.2}``: 20% of each bucket for jobs of priority 0 or more urgent).

    Raises:
        ConfigurationError: ``reserve`` shares out of range.
    """

    def __init__(
        self, limits: Limits | None = None, *, model_limits: Mapping[str, Limits] | None = None,
        store: BucketStore | None = None, clock: Clock | None = None, reserve: Mapping[int, float] | None = None,
    ) -> None:
        self.limits = limits
        self.model_limits = dict(model_limits or {})
        try:
            #: the reservation of learned limits (checked as Limits checks its own)
            self.reserve = Limits(reserve=dict(reserve or {})).reserve
        except ValueError as exc:
            raise ConfigurationError(str(exc).replace("Limits.reserve", "reserve")) from exc
        self._clock: Clock = clock or LoopClock()
        self.store: BucketStore = store if store is not None else MemoryStore(self._clock)
        self._scopes: dict[tuple[str, str | None], ScopeLimiter] = {}
        #: this process's id in claims
        self.owner = uuid.uuid4().hex

    def scope(self, endpoint: str, model: str | None, limits: Limits | _Default | None = DEFAULT) -> ScopeLimiter:
        """The scope of ``model`` on ``endpoint`` (its base URL and key fingerprint); ``limits`` are the
        endpoint's for that model (default: this limiter's, by model). Made on first use, kept after."""
        found = self._scopes.get((endpoint, model))
        if found is None:
            if isinstance(limits, _Default):
                limits = self.model_limits.get(model, self.limits) if model is not None else self.limits
            if limits is None and self.store.shared:
                raise ConfigurationError(f"a shared limit needs explicit limits (Limits(rpm=..., tpm=...)) for "
                                         f"{model or 'every model'}")
            key = hashlib.sha256(f"{endpoint}|{model or ''}".encode()).hexdigest()[:24]
            policy = ScopeModel(limits, keep=self.store.keep, reserve=self.reserve)
            found = ScopeLimiter(policy, self.store, key, endpoint=endpoint, model_name=model, clock=self._clock,
                                 owner=self.owner)
            self._scopes[(endpoint, model)] = found
        return found

    def scopes(self) -> list[ScopeLimiter]:
        """Every scope used so far."""
        return list(self._scopes.values())

    async def aclose(self) -> None:
        """Release the store's connections."""
        await self.store.aclose()
