"""The dispatcher: the only consumer of the queue, admitting jobs in priority order as workers, limits and the
budget allow, and the only place dispatch pauses and stops."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from . import errors
from ._budget import Budget
from ._job import Job, State
from ._settle import Settler
from .clock import Clock
from .queue import JobQueue
from .statistics import Counters, RateMeter

if TYPE_CHECKING:
    from .admission import ScopeLimiter

__all__ = ["Dispatcher"]

log = structlog.get_logger("scheduler")


class Dispatcher:
    """Admits queued jobs and hands them to ``launch``; pauses all dispatch on a 429, stops it on a run-fatal
    error, and fails a job wherever it waits when its deadline passes.

    Args:
        scope_of: the limit scope a job is admitted through (its endpoint and model).
        launch: starts an admitted job's attempt (it holds one of the ``workers`` until ``free_worker``).
        max_pause_s: the longest a 429 pauses all dispatch.
    """

    def __init__(
        self, *, queue: JobQueue[Job], workers: int, clock: Clock, settler: Settler, budget: Budget | None,
        counters: Counters, meter: RateMeter, scope_of: Callable[[Job], ScopeLimiter],
        launch: Callable[[Job], None], max_pause_s: float,
    ) -> None:
        self.queue = queue
        self.clock = clock
        self.settler = settler
        self.budget = budget
        self.counters = counters
        self.meter = meter
        self.scope_of = scope_of
        self.launch = launch
        self.max_pause_s = max_pause_s
        self.slots = asyncio.Semaphore(workers)
        self.budget_freed = asyncio.Event()
        self.pause_until = -math.inf
        #: why admission stopped, if it did
        self.stopped: errors.RunStopped | None = None
        #: tasks settling jobs from callbacks; the pool waits for them before closing
        self.tasks: set[asyncio.Task[None]] = set()
        self._napping: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        queue, slots = self.queue, self.slots
        while True:
            if not queue:
                await queue.wait_nonempty()
            await slots.acquire()
            if not queue:  # a stop emptied it meanwhile
                slots.release()
                continue
            job = queue.pop()
            try:
                admitted = await self._admit(job) if job.state is State.QUEUED else None
            except Exception as exc:
                # A bug on one job's way (a limiter that raised, say) fails that job, not the dispatcher.
                slots.release()
                await self.settler.internal_error(job, exc)
                continue
            except BaseException:
                slots.release()
                raise
            if admitted is None:
                slots.release()
            else:
                self.launch(admitted)

    async def _admit(self, job: Job) -> Job | None:
        """Wait until ``job`` (or a job that overtook it in priority meanwhile) fits the limits and the budget;
        charge it. None: the job settled instead (failed, expired, abandoned)."""
        clock, queue, settler = self.clock, self.queue, self.settler
        while True:
            if job.state is not State.QUEUED:
                return None
            if job.abandoned:
                settler.drop(job)
                return None
            if self.stopped is not None:
                await settler.fail(job, type(self.stopped), str(self.stopped))
                return None
            now = clock.now()
            if job.deadline is not None and now >= job.deadline:
                await settler.fail(job, errors.DeadlineExceeded, "the deadline passed while the job waited")
                return None
            until = job.deadline if job.deadline is not None else math.inf
            scope = self.scope_of(job)
            worst = 0.0
            if self.pause_until > now:
                await self._nap(min(self.pause_until, until) - now)
            elif (tpm := scope.too_large(job.estimate)) is not None:
                await settler.fail(job, errors.RequestTooLarge, too_large(job, tpm))
                return None
            elif self.budget is not None and not self.budget.room_for(
                    worst := self.budget.worst_case(job.endpoint, job.body, job.estimate)):
                if self.budget.holding:
                    await self._wait_for_budget(until)  # jobs in flight usually cost far less than they hold
                else:
                    self.stop(errors.BudgetExhausted(self.budget.exhausted(worst)))
            else:
                job.scope = scope
                job.costs = scope.costs(job.estimate, job.output)
                try:
                    wait = await scope.acquire(job.costs, job.priority)
                except errors.RunStopped as exc:
                    self.stop(exc)
                    continue
                if wait == 0.0:
                    job.attempts += 1
                    charged = int(job.costs["tokens"])
                    self.counters.charged_tokens += charged
                    self.meter.add(now, charged)
                    if self.budget is not None:
                        job.reserved = worst
                        self.budget.hold(worst)
                    return job
                await self._nap(min(now + wait, until) - now)
            head = queue.head()
            if head is not None and (head.priority, head.sequence) < (job.priority, job.sequence):
                queue.requeue(job)
                job = queue.pop()

    async def _nap(self, seconds: float) -> None:
        """The dispatcher's sleep: a stop or the pool closing wakes it early."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.clock.call_at(self.clock.now() + max(0.0, seconds), functools.partial(_resolve, waiter))
        self._napping = waiter
        try:
            await waiter
        finally:
            timer.cancel()
            self._napping = None

    async def _wait_for_budget(self, until: float) -> None:
        self.budget_freed.clear()
        timer = self.clock.call_at(until, self.budget_freed.set) if until < math.inf else None
        try:
            await self.budget_freed.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def wake(self) -> None:
        """Wake the dispatcher from a nap or a budget wait: something changed."""
        if self._napping is not None and not self._napping.done():
            self._napping.set_result(None)
        self.budget_freed.set()

    # ------------------------------------------------------------------ pausing and stopping

    def pause(self, delay: float) -> float:
        """Pause all dispatch for ``delay`` seconds (capped at ``max_pause_s``); returns the pause taken."""
        if delay > self.max_pause_s:
            log.warning("pause_capped", asked_s=round(delay, 3), paused_s=self.max_pause_s,
                        detail="the server asked for a longer pause than max_pause_s; dispatch resumes sooner")
            delay = self.max_pause_s
        until = self.clock.now() + delay
        if until > self.pause_until:
            self.pause_until = until
            self.counters.pauses += 1
            # Info, not a warning: pausing on a 429 is the pool doing its job; statistics().pauses counts them.
            log.info("dispatch_paused", delay_s=round(delay, 3), reason="rate_limited")
        return delay

    def stop(self, error: errors.RunStopped) -> None:
        """Stop admitting: jobs that are queued, waiting out a backoff or following another fail now."""
        if self.stopped is not None:
            return
        self.stopped = error
        # A stop the caller asked for (Ctrl-C in the CLI) is no error.
        level = log.warning if type(error) is errors.RunStopped else log.error
        level("run_stopped", reason=str(error), code=error.code)
        waiting = [job for job in self.settler.live if job.state in (State.QUEUED, State.WAITING, State.FOLLOWING)]
        self.queue.clear()
        if waiting:
            self.spawn(self._fail_all(waiting, error))
        self.wake()

    async def _fail_all(self, jobs: list[Job], error: errors.RunStopped) -> None:
        for job in jobs:
            await self.settler.fail(job, type(error), str(error))

    # ------------------------------------------------------------------ moving jobs

    def requeue(self, job: Job) -> None:
        """Put ``job`` back in the queue (after a backoff, a 429, a fallback), or fail it if the run stopped."""
        if job.state in (State.QUEUED, State.WAITING, State.CONCLUDING):
            job.state = State.QUEUED
            job.timer = None
            if self.stopped is not None:
                self.spawn(self.settler.fail(job, type(self.stopped), str(self.stopped)))
            else:
                self.queue.requeue(job)

    def backoff(self, job: Job, delay: float) -> None:
        """Requeue ``job`` once ``delay`` seconds have passed; meanwhile it holds no worker."""
        job.state = State.WAITING
        job.timer = self.clock.call_at(self.clock.now() + delay, functools.partial(self.requeue, job))

    def free_worker(self, job: Job) -> None:
        """``job``'s attempt is over: its worker goes to the next job (once, however the attempt ended)."""
        if job.state is State.RUNNING:
            job.state = State.CONCLUDING
            self.counters.in_flight -= 1
            self.slots.release()

    def expire(self, job: Job) -> None:
        """The deadline timer: fail ``job`` wherever it waits."""
        if job.state in (State.SETTLED, State.CONCLUDING):
            return  # settled, or answered in time and being concluded
        if job.state is State.RUNNING and job.task is not None:
            job.stop_reason = "deadline"
            job.task.cancel()
        else:
            self.queue.remove(job)
            self.spawn(self.settler.fail(job, errors.DeadlineExceeded, "the deadline passed while the job waited"))

    def abandon(self, job: Job) -> None:
        """The caller went away (a cancelled submit, a stream left early): nobody waits for the result."""
        if job.state is State.SETTLED:
            return
        job.abandoned = True
        if job.state is State.RUNNING and job.task is not None:
            job.stop_reason = "abandoned"
            job.task.cancel()
        elif job.state in (State.WAITING, State.FOLLOWING) or (
                job.state is State.QUEUED and self.queue.remove(job)):
            self.settler.drop(job)
        # Otherwise the dispatcher holds it (dropped when it looks again), or its answer is being concluded.

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a settling coroutine from a callback; the pool waits for it before closing."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def too_large(job: Job, tpm: int) -> str:
    """Why a job can never be admitted."""
    return f"the request needs about {job.estimate} tokens, more than the whole limit of {tpm} TPM"


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
