"""Where the bucket state of each limit scope lives: in this process, or in Redis for every process at once.

A store knows no policy: each method applies one transition of :class:`~scheduler.admission.buckets.BucketState`
atomically to one scope's state, with the numbers the model passes in (see :mod:`scheduler.admission.model`).
:class:`MemoryStore` keeps the states in a dict and reads time from the pool's clock; the Redis store
(:mod:`scheduler.admission.redis_store`) applies the same transitions in Lua on Redis' clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from ..clock import Clock
from .buckets import BucketParams, BucketState

__all__ = ["BucketStore", "Mark", "MemoryStore"]

#: cumulative counts sent on a scope when a request went on the wire (its own included); a store that records
#: it in the background hands out a future of it
Mark = Mapping[str, float] | asyncio.Future[Mapping[str, float] | None]


class BucketStore(Protocol):
    """The seam between the admission model and the state it governs (see the module's docstring)."""

    #: whether other processes share the buckets (then every limit must be configured, not learned)
    shared: bool
    #: share of each burst a store shared by several processes keeps free (their requests leave in a slightly
    #: different order and timing than they were admitted in)
    keep: float

    async def acquire(
        self, key: str, params: BucketParams, costs: Mapping[str, float], floor: float, owner: str, claim: bool,
        grace_s: float,
    ) -> tuple[float, str | None]:
        """:meth:`BucketState.acquire`: 0.0 and None when charged, else the wait and the binding dimension."""
        ...

    def wire(self, key: str, costs: Mapping[str, float]) -> Mark:
        """:meth:`BucketState.wire`: count a request as sent; its mark (at once, or as a future)."""
        ...

    async def sync(
        self, key: str, params: BucketParams, bounds: Mapping[str, float], marks: Mapping[str, float],
        learned: Mapping[str, float], widen: float,
    ) -> None:
        """:meth:`BucketState.sync`."""
        ...

    async def give_back(
        self, key: str, params: BucketParams, amounts: Mapping[str, float], uncount: bool, empty: tuple[str, ...],
        shrink: float, min_burst: float,
    ) -> None:
        """:meth:`BucketState.give_back`."""
        ...

    async def state(self, key: str, params: BucketParams) -> BucketState:
        """A copy of the scope's state, refilled to now (nothing else changed)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """Bucket state in this process, on the pool's clock."""

    __slots__ = ("_clock", "_states", "keep", "shared")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._states: dict[str, BucketState] = {}
        #: one process: nothing to keep for other processes' jitter
        self.shared = False
        self.keep = 0.0

    def _state(self, key: str) -> BucketState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = BucketState()
        return state

    async def acquire(
        self, key: str, params: BucketParams, costs: Mapping[str, float], floor: float, owner: str, claim: bool,
        grace_s: float,
    ) -> tuple[float, str | None]:
        return self._state(key).acquire(params, costs, floor, owner, claim, grace_s, self._clock.now())

    def wire(self, key: str, costs: Mapping[str, float]) -> Mark:
        return self._state(key).wire(costs)

    async def sync(
        self, key: str, params: BucketParams, bounds: Mapping[str, float], marks: Mapping[str, float],
        learned: Mapping[str, float], widen: float,
    ) -> None:
        self._state(key).sync(params, bounds, marks, learned, widen, self._clock.now())

    async def give_back(
        self, key: str, params: BucketParams, amounts: Mapping[str, float], uncount: bool, empty: tuple[str, ...],
        shrink: float, min_burst: float,
    ) -> None:
        self._state(key).give_back(params, amounts, uncount, empty, shrink, min_burst, self._clock.now())

    async def state(self, key: str, params: BucketParams) -> BucketState:
        state = self._state(key)
        state.refill(params, self._clock.now())
        return BucketState(dict(state.levels), state.updated, state.burst, dict(state.learned),
                           dict(state.charged), dict(state.sent), state.hold)

    async def aclose(self) -> None:
        return None
