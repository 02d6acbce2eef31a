"""The pool's side of the response cache: lookups that never fail a job, and single flight.

Single flight: the first cacheable job of a key leads (it looks the key up, then runs); identical jobs submitted
while it is on its way follow it and get its answer, so N identical requests made at once cost one call. A leader
that will not run (its submitter left, the run stopped) hands the lead to its first follower still waiting.
"""

from __future__ import annotations

import structlog

from ._job import Job, State
from .cache import CacheBackend, CachedResponse
from .logs import redact
from .results import Result

__all__ = ["Flights", "ResponseCache"]

log = structlog.get_logger("scheduler")


class ResponseCache:
    """A cache backend whose failures are logged once and treated as misses: a cache is an optimisation."""

    __slots__ = ("_backend", "_failed")

    def __init__(self, backend: CacheBackend) -> None:
        self._backend = backend
        self._failed = False

    async def lookup(self, key: str) -> CachedResponse | None:
        try:
            raw = await self._backend.get(key)
        except Exception as exc:
            self._warn("get", exc)
            return None
        return CachedResponse.loads(raw) if raw is not None else None

    async def store(self, key: str, result: Result) -> None:
        entry = CachedResponse(result.body, result.model, result.request_id, result.cost_usd)
        try:
            await self._backend.set(key, entry.dumps())
        except Exception as exc:
            self._warn("set", exc)

    def _warn(self, operation: str, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            log.warning("cache_unavailable", operation=operation, error=redact(f"{type(exc).__name__}: {exc}"))


class Flights:
    """Leaders by cache key, each with the identical jobs that wait for its answer."""

    __slots__ = ("_leaders",)

    def __init__(self) -> None:
        self._leaders: dict[str, Job] = {}

    def join(self, job: Job) -> bool:
        """Make ``job`` follow the leader of its key (True), or lead it (False: it must be looked up and run)."""
        key = job.cache_key
        assert key is not None
        leader = self._leaders.get(key)
        if leader is None:
            self._leaders[key] = job
            return False
        if leader.followers is None:
            leader.followers = []
        leader.followers.append(job)
        job.state = State.FOLLOWING
        return True

    def land(self, job: Job) -> list[Job]:
        """``job`` has its answer: close its flight and return the followers still waiting for it."""
        self._close(job)
        followers = [f for f in job.followers or () if f.state is State.FOLLOWING]
        job.followers = None
        return followers

    def hand_over(self, job: Job) -> Job | None:
        """``job`` will not run: its first follower still waiting leads instead (returned, to be queued)."""
        key = job.cache_key
        if key is None or self._leaders.get(key) is not job:
            return None
        waiting = self.land(job)
        if not waiting:
            return None
        successor = waiting[0]
        successor.followers = waiting[1:] or None
        self._leaders[key] = successor
        return successor

    def leave(self, job: Job, new_key: str | None) -> None:
        """``job``'s request changes (a fallback model): it stops leading its old key, so identical requests run
        again; its followers stay with it (they would have fallen back alike); its answer is stored under
        ``new_key``, the key of what it now asks."""
        self._close(job)
        job.cache_key = new_key

    def _close(self, job: Job) -> None:
        key = job.cache_key
        if key is not None and self._leaders.get(key) is job:
            del self._leaders[key]
