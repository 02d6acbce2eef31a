"""Where every job ends: its result delivered exactly once, to the sink, the caller and identical jobs waiting.

The pool's first promise lives here: a job registers when it is submitted and leaves the registry when it
settles; :meth:`Settler.finish` runs once per job whatever ended it (an answer, an error, a deadline, a stop),
and an exception on the way (a sink that raised, say) changes the result instead of losing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import structlog

from . import errors
from ._budget import Budget
from ._flights import Flights
from ._job import Job, State
from .clock import Clock
from .logs import redact, redact_value, traceback_text
from .results import ErrorInfo, Result
from .sinks import Sink
from .statistics import Counters
from .transport import Response

__all__ = ["Settler"]

log = structlog.get_logger("scheduler")


class Settler:
    """Settles jobs and keeps the registry of those not settled yet.

    Args:
        requeue: puts a job back in the queue (the successor of a flight whose leader will not run).
        budget_freed: called when a budget hold ends (admission may be waiting for room).
    """

    __slots__ = ("_budget_freed", "_requeue", "budget", "clock", "counters", "flights", "idle", "live",
                 "observers", "sink")

    def __init__(
        self, *, clock: Clock, counters: Counters, sink: Sink | None, flights: Flights, budget: Budget | None,
        requeue: Callable[[Job], None], budget_freed: Callable[[], None],
    ) -> None:
        self.clock = clock
        self.counters = counters
        self.sink = sink
        self.flights = flights
        self.budget = budget
        self._requeue = requeue
        self._budget_freed = budget_freed
        self.observers: list[Callable[[Result], None]] = []
        #: jobs not settled yet: whatever happens, each of them settles before the pool is gone
        self.live: set[Job] = set()
        #: set while no job is live
        self.idle = asyncio.Event()
        self.idle.set()

    def register(self, job: Job) -> None:
        self.counters.submitted += 1
        self.live.add(job)
        self.idle.clear()

    def release(self, job: Job, *, uncertain: bool, spent: float | None = None) -> None:
        """End the budget hold of ``job``'s attempt: its real cost known, or its worst case counted if unknown."""
        if job.reserved and self.budget is not None:
            self.budget.release(job.reserved, spent=spent, uncertain=uncertain)
            job.reserved = 0.0
            self._budget_freed()

    async def fail(self, job: Job, kind: type[errors.JobError], message: str, response: Response | None = None
                   ) -> None:
        """Settle ``job`` with an error result of ``kind`` (its last HTTP answer, redacted, kept in it)."""
        if job.state is State.SETTLED:
            return
        self.release(job, uncertain=False)
        response = response or job.last_response
        if job.riders is not None:
            # A combined request failed as a whole: each job riding in it fails the same way.
            self._settle(job)
            for rider in self.riders_left(job):
                rider.attempts += job.attempts
                rider.endpoint_state = job.endpoint_state
                await self.fail(rider, kind, message, response)
            return
        message = redact(message)
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint,
            status=response.status if response is not None else None,
            body=redact_value(response.body) if response is not None else None,
            request_id=response.request_id if response is not None else None,
            attempts=job.attempts, latency_s=self.clock.now() - job.submitted_at,
            error=ErrorInfo(kind.code, message), model=job.model,
            served_by=job.endpoint_state.label if job.endpoint_state is not None and response is not None else None,
        )
        log.warning("job_failed", custom_id=job.custom_id, code=kind.code, attempt=job.attempts,
                    status=result.status, message=message)
        await self.finish(job, result)

    async def internal_error(self, job: Job, exc: Exception) -> None:
        """An exception nobody expected on a job's path: the job fails with internal_error, the pool goes on."""
        self.counters.internal_errors += 1
        log.error("job_internal_error", custom_id=job.custom_id, error=redact(f"{type(exc).__name__}: {exc}"),
                  traceback=traceback_text(exc))
        await self.fail(job, errors.InternalError, f"an unexpected error ended the job: {type(exc).__name__}: {exc}")

    def drop(self, job: Job) -> None:
        """Settle ``job`` silently: nobody waits for it and no request is (or will be) sent."""
        if job.state is State.SETTLED:
            return
        self._settle(job)
        if job.riders is not None:
            for rider in self.riders_left(job):
                self.drop(rider)
            return
        successor = self.flights.hand_over(job) if job.cache_key is not None else None
        if successor is not None:
            successor.state = State.QUEUED
            self._requeue(successor)
        if job.stream_to is not None:
            job.stream_to.close()
        self._check_idle()

    async def finish(self, job: Job, result: Result, *, saved_usd: float | None = None) -> None:
        """Deliver ``job``'s result (exactly once): counters, observers, sink, caller, and identical jobs."""
        if job.state is State.SETTLED:
            return
        self._settle(job)
        if job.riders is not None:
            for rider in self.riders_left(job):
                await self.finish(rider, dataclasses.replace(result, custom_id=rider.custom_id))
            return
        c = self.counters
        if job.shape is not None and job.shape.trimmed:
            result = dataclasses.replace(result, trimmed=job.shape.trimmed)
            c.trimmed += 1
        if result.ok:
            c.succeeded += 1
            if result.cached:
                c.cache_hits += 1
            if result.truncated:
                c.truncated += 1
        else:
            c.failed += 1
        for observer in self.observers:
            try:
                observer(result)
            except Exception as exc:
                log.warning("observer_failed", error=redact(f"{type(exc).__name__}: {exc}"))
        if self.sink is not None and not job.abandoned:
            try:
                await self.sink.write(result)
            except Exception as exc:
                result = self._sink_failed(job, result, exc)
        if job.stream_to is not None:
            job.stream_to.close()
        if job.future is not None and not job.future.done():
            job.future.set_result(result)
        elif job.deliver is not None:
            job.deliver.deliver(result)
        if job.cache_key is not None:
            for follower in self.flights.land(job):
                await self.finish(follower, dataclasses.replace(
                    result, custom_id=follower.custom_id, attempts=0,
                    latency_s=self.clock.now() - follower.submitted_at,
                    cost_usd=0.0 if result.ok else None, cached=result.ok,
                ))
                if result.ok:
                    c.cache_saved_usd += saved_usd or 0.0
        self._check_idle()

    @staticmethod
    def riders_left(carrier: Job) -> list[Job]:
        """The jobs still riding in ``carrier`` (the others expired, were abandoned or settled otherwise)."""
        return [rider for rider in carrier.riders or () if rider.state is State.RIDING and rider.carrier is carrier]

    def _sink_failed(self, job: Job, result: Result, exc: Exception) -> Result:
        # The answer is kept in the result (its body), but the caller must know it missed the sink.
        c = self.counters
        c.internal_errors += 1
        log.error("sink_failed", custom_id=job.custom_id, error=redact(f"{type(exc).__name__}: {exc}"),
                  traceback=traceback_text(exc))
        if result.ok:
            c.succeeded -= 1
            c.failed += 1
        message = redact(f"the result could not be written to the sink: {type(exc).__name__}: {exc}")
        return dataclasses.replace(result, error=ErrorInfo(errors.InternalError.code, message))

    def _settle(self, job: Job) -> None:
        job.state = State.SETTLED
        self.live.discard(job)
        for timer in (job.timer, job.deadline_timer):
            if timer is not None:
                timer.cancel()
        job.timer = job.deadline_timer = None

    def _check_idle(self) -> None:
        if not self.live:
            self.idle.set()
