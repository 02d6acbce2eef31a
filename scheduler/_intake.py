"""How a request becomes a queued job: its body shaped (structured outputs, trimmed to its context window) and
capped (under a budget), its tokens estimated, its cache and coalescing keys, and its way into the queue, or
straight to its result (a cache hit, a request that can never run)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import anyio

from . import errors
from ._budget import Budget, cap_output
from ._dispatch import Dispatcher, too_large
from ._flights import Flights, ResponseCache
from ._job import Job, State
from ._settle import Settler
from ._shape import Shape, Shaping, shape
from .cache import cache_key, is_deterministic
from .clock import Clock
from .coalesce import EMBEDDINGS, Coalescing, coalesce_key
from .endpoints import Router
from .queue import JobQueue
from .results import Result, Usage
from .statistics import Counters
from .structured import prepare_body
from .tokens import TokenEstimator, output_reservation
from .trim import ContextWindows

__all__ = ["Intake"]

# Prompts longer than this are tokenized in a thread, off the event loop.
_THREAD_ESTIMATE_CHARS = 100_000


class Intake:
    """Makes jobs and queues them; the pool's ``submit``, ``map`` and ``stream`` go through it."""

    def __init__(
        self, *, estimator: TokenEstimator, windows: ContextWindows, shaping: Shaping, budget: Budget | None,
        cache: ResponseCache | None, cache_scope: str, flights: Flights, coalescing: Coalescing | None,
        clock: Clock, queue: JobQueue[Job], settler: Settler, dispatcher: Dispatcher, router: Router,
        counters: Counters, check_running: Callable[[], None],
    ) -> None:
        self.estimator = estimator
        self.windows = windows
        #: the pool's trim policy and parse retries (a submit may give its own)
        self.shaping = shaping
        self.budget = budget
        self.cache = cache
        self.cache_scope = cache_scope
        self.flights = flights
        self.coalescing = coalescing
        self.clock = clock
        self.queue = queue
        self.settler = settler
        self.dispatcher = dispatcher
        self.router = router
        self.counters = counters
        #: raises PoolClosed once the pool has closed: no job is made for a pool that will not run it
        self.check_running = check_running
        self._sequence = itertools.count()

    async def new_job(
        self, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int, timeout_s: float | None,
        cacheable: bool | None = None, shaping: Shaping | None = None,
    ) -> Job:
        job = self.job_now(endpoint, body, custom_id, priority, timeout_s, cacheable, shaping)
        if job is not None:
            return job
        # A long prompt: tokenized (and trimmed) in a thread, off the event loop.
        body, output = prepare_body(endpoint, body)
        body = self._capped(endpoint, body)
        sent, estimate, shaped = await anyio.to_thread.run_sync(
            shape, endpoint, body, self.estimator, self.windows, shaping or self.shaping, output)
        self.check_running()  # the pool may have closed meanwhile
        return self._job(endpoint, sent, estimate, custom_id, priority, timeout_s, cacheable, shaped)

    def job_now(
        self, endpoint: str, body: dict[str, Any], custom_id: str | None, priority: int, timeout_s: float | None,
        cacheable: bool | None = None, shaping: Shaping | None = None,
    ) -> Job | None:
        """The job, made at once (None: its prompt is long enough to be tokenized in a thread)."""
        self.check_running()
        # Shaped before it is estimated: the estimate charged is that of what is sent.
        body, output = prepare_body(endpoint, body)
        body = self._capped(endpoint, body)
        if self.estimator.prompt_chars(endpoint, body) > _THREAD_ESTIMATE_CHARS:
            return None
        sent, estimate, shaped = shape(endpoint, body, self.estimator, self.windows, shaping or self.shaping,
                                       output)
        return self._job(endpoint, sent, estimate, custom_id, priority, timeout_s, cacheable, shaped)

    def _capped(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.budget is None:
            return body
        # The reservation charged becomes the request's cap: the worst case held is the worst case possible.
        return dict(cap_output(endpoint, body, self.estimator.default_output_tokens))

    def _job(
        self, endpoint: str, body: dict[str, Any], estimate: int, custom_id: str | None, priority: int,
        timeout_s: float | None, cacheable: bool | None, shaped: Shape | None = None,
    ) -> Job:
        sequence = next(self._sequence)
        now = self.clock.now()
        deadline = now + timeout_s if timeout_s is not None else None
        job = Job(endpoint, body, custom_id if custom_id is not None else f"request-{sequence}", priority,
                  sequence, estimate, output_reservation(endpoint, body, self.estimator.default_output_tokens), now,
                  deadline)
        if self.cache is not None and cacheable is not False and (cacheable or is_deterministic(endpoint, body)):
            job.cache_key = cache_key(self.cache_scope, endpoint, body)
        if endpoint == EMBEDDINGS and self.coalescing is not None:
            job.coalesce_key = coalesce_key(endpoint, body)
        job.shape = shaped
        return job

    def enqueue_now(self, job: Job) -> bool:
        """Queue ``job`` at once in the common case (nothing to look up or refuse, room in the queue); False:
        :meth:`enqueue` must."""
        if self.queue.full or not self._plain(job):
            return False
        self.settler.register(job)
        if job.deadline is not None:
            job.deadline_timer = self.clock.call_at(job.deadline, functools.partial(self.dispatcher.expire, job))
        self.queue.requeue(job)
        return True

    def _plain(self, job: Job) -> bool:
        """Nothing to look up (a cache) or refuse (a stop, a request too large, a model without a price)."""
        return not (job.cache_key is not None or self.dispatcher.stopped is not None
                    or (job.shape is not None and job.shape.refused is not None)
                    or self.router.too_large(job) is not None
                    or (self.budget is not None and not self.budget.priced(job.model)))

    async def enqueue(self, job: Job) -> None:
        if self.enqueue_now(job):
            return
        settler = self.settler
        settler.register(job)
        if job.deadline is not None:
            job.deadline_timer = self.clock.call_at(job.deadline, functools.partial(self.dispatcher.expire, job))
        try:
            if job.shape is not None and job.shape.refused is not None:
                # It cannot fit its model's context window: the server would refuse it after its wait.
                await settler.fail(job, errors.RequestTooLarge, job.shape.refused)
                return
            # A cached answer costs nothing and touches no limit: served even after the run stopped.
            if job.cache_key is not None and await self._answered_by_cache(job):
                return
            stopped = self.dispatcher.stopped
            if stopped is not None:
                await settler.fail(job, type(stopped), str(stopped))
            elif (tpm := self.router.too_large(job)) is not None:
                await settler.fail(job, errors.RequestTooLarge, too_large(job, tpm))
            elif self.budget is not None and not self.budget.priced(job.model):
                # Not a stop: this job cannot be accounted for; a rerun with its price (prices=) runs it.
                await settler.fail(job, errors.BudgetExhausted,
                                   f"no price is known for model {job.model!r}: under a budget every model needs one")
            else:
                await self.queue.put(job)
        except BaseException:
            if job.state is not State.SETTLED:
                # Cancelled while waiting for room: the job never entered the pool.
                self.counters.submitted -= 1
                settler.drop(job)
            raise

    async def _answered_by_cache(self, job: Job) -> bool:
        """Serve ``job`` from the cache, or make it follow an identical job in flight; False: it must run."""
        assert job.cache_key is not None and self.cache is not None
        if self.flights.join(job):
            return True
        entry = await self.cache.lookup(job.cache_key)
        if entry is None:
            self.counters.cache_misses += 1
            return False
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint, status=200, body=entry.body,
            request_id=entry.request_id, usage=Usage.from_body(entry.body), attempts=0,
            latency_s=self.clock.now() - job.submitted_at, model=entry.model, cost_usd=0.0, cached=True,
        )
        if job.shape is not None:
            parsed = job.shape.parses(job.endpoint, result)
            if parsed is None:  # stored by a request that did not parse its answer: ask the API
                self.counters.cache_misses += 1
                return False
            result = parsed
        self.counters.cache_saved_usd += entry.cost_usd or 0.0
        await self.settler.finish(job, result, saved_usd=entry.cost_usd)
        return True
