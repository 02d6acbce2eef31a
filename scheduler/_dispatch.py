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
from .coalesce import Coalescing, inputs_body
from .queue import JobQueue
from .statistics import Counters, RateMeter

if TYPE_CHECKING:
    from .admission import ScopeLimiter
    from .endpoints import Router

__all__ = ["Dispatcher"]

log = structlog.get_logger("scheduler")


class Dispatcher:
    """Admits queued jobs and hands them to ``launch``; pauses a scope on a 429, stops all dispatch on a run-fatal
    error, and fails a job wherever it waits when its deadline passes.

    Args:
        router: picks the endpoint (and so the limit scope) a job is admitted through.
        launch: starts an admitted job's attempt (it holds one of the ``workers`` until ``free_worker``).
        max_pause_s: the longest a 429 pauses all dispatch.
        coalescing: how embeddings jobs are gathered into one request (None: each goes alone).
    """

    def __init__(
        self, *, queue: JobQueue[Job], workers: int, clock: Clock, settler: Settler, budget: Budget | None,
        counters: Counters, meter: RateMeter, router: Router, launch: Callable[[Job], None], max_pause_s: float,
        coalescing: Coalescing | None = None,
    ) -> None:
        self.queue = queue
        self.workers = workers
        self.clock = clock
        self.settler = settler
        self.budget = budget
        self.counters = counters
        self.meter = meter
        self.router = router
        self.launch = launch
        self.max_pause_s = max_pause_s
        self.coalescing = coalescing
        self.slots = asyncio.Semaphore(workers)
        #: lanes held back: until when, and the priority of the job that was refused
        self._blocked: dict[object, tuple[float, int]] = {}
        self._budget_wait = False
        queue.on_arrival = self.wake
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
            job, retry_at = self._take_ready()
            if job is not None and job.coalesce_key is not None and self.coalescing is not None:
                job = self._coalesce(job)
                if job is None:  # it lingers for companions: its lane is held back meanwhile
                    slots.release()
                    continue
            if job is None:
                slots.release()
                await self._nap(retry_at - self.clock.now())
                continue
            try:
                admitted = await self._admit(job)
            except Exception as exc:
                # A bug on one job's way (a limiter that raised, say) fails that job, not the dispatcher.
                slots.release()
                await self.settler.internal_error(job, exc)
                continue
            except BaseException:
                slots.release()
                raise
            if admitted:
                self.launch(job)
            else:
                slots.release()

    def _take_ready(self) -> tuple[Job | None, float]:
        """The most urgent job among the lanes that may admit now; else None and when one may."""
        if self._budget_wait:
            return None, math.inf  # woken when a hold comes back
        heads, blocked = self.queue.heads(), self._blocked
        if not blocked:
            return (self.queue.pop_lane(heads[0][2]) if heads else None), math.inf
        now, retry_at = self.clock.now(), math.inf
        for priority, _, lane in heads:
            block = blocked.get(lane)
            if block is not None:
                until, blocked_priority = block
                if until <= now:
                    del blocked[lane]
                # A more urgent job than the one refused may fit (it may spend what is kept for urgent work).
                elif priority >= blocked_priority:
                    retry_at = min(retry_at, until)
                    continue
            return self.queue.pop_lane(lane), retry_at
        return None, retry_at

    def _block(self, job: Job, until: float) -> None:
        """Hold ``job``'s lane back until ``until`` (its scope must wait) and put the job back at its head."""
        self._blocked[self.queue.lane(job)] = (until, job.priority)
        self.queue.requeue(job)

    async def _admit(self, job: Job) -> bool:
        """Charge ``job`` to its scope's limits and the budget if both have room now (True); else put it back
        with its lane held until it may fit, or settle it (it expired, was abandoned, cannot ever fit)."""
        settler = self.settler
        if job.state is not State.QUEUED:
            return False
        if job.abandoned:
            settler.drop(job)
            return False
        if self.stopped is not None:
            await settler.fail(job, type(self.stopped), str(self.stopped))
            return False
        if job.riders is not None and not self._keep_riders(job):
            return False
        now = self.clock.now()
        router = self.router
        if (unserved := router.unserved(job.model)) is not None:
            # Every endpoint serving its model was retired (a refused key, a spent quota): it cannot run now.
            await settler.fail(job, type(unserved), str(unserved))
            return False
        worst = 0.0
        if self.budget is not None:
            worst = self.budget.worst_case(job.endpoint, job.body, job.estimate)
            if not self.budget.room_for(worst):
                if self.budget.holding:
                    # Jobs in flight usually cost far less than they hold: wait for their costs.
                    self._budget_wait = True
                    self.queue.requeue(job)
                else:
                    self.stop(errors.BudgetExhausted(self.budget.exhausted(worst)))
                    await settler.fail(job, type(self.stopped), str(self.stopped))  # type: ignore[arg-type]
                return False
        try:
            state, wait = await router.admit(job, now)
        except errors.RunStopped as exc:
            self.stop(exc)
            await settler.fail(job, type(exc), str(exc))
            return False
        if state is None:
            if wait == math.inf and (tpm := router.too_large(job)) is not None:
                # Larger than the whole token limit of every endpoint serving it (learned since it was queued).
                if not self.split(job):
                    await settler.fail(job, errors.RequestTooLarge, too_large(job, tpm))
                return False
            self._block(job, now + wait)
            return False
        state.served += 1
        state.in_flight += 1
        state.breaker.sent(now)
        job.attempts += 1
        charged = int(job.costs["tokens"])
        self.counters.charged_tokens += charged
        self.meter.add(now, charged)
        if self.budget is not None:
            job.reserved = worst
            self.budget.hold(worst)
        return True

    # ------------------------------------------------------------------ coalescing

    def _coalesce(self, head: Job) -> Job | None:
        """``head`` and the queued jobs that may ride with it, as one carrier job; ``head`` itself when none may;
        None when it waits a little for companions (fewer than a full request are queued and its linger is not
        over: its lane is held back until then)."""
        rules = self.coalescing
        assert rules is not None
        key, lane = head.coalesce_key, self.queue.lane(head)
        room = self._token_room(head) - head.estimate
        full = False

        def rides(job: Job) -> bool | None:
            nonlocal room, full
            if job.coalesce_key != key:
                return False
            if job.estimate > room:
                full = True
                return None  # the request is full (by tokens): the rest waits for the next one
            room -= job.estimate
            return True

        riders = [head, *self.queue.take(lane, rides, rules.max_inputs - 1)]
        full = full or len(riders) >= rules.max_inputs
        linger_until = head.submitted_at + rules.linger_s
        if not full and self.clock.now() < linger_until:
            for rider in riders[1:]:
                self.queue.requeue(rider)
            self._block(head, linger_until)
            return None
        return head if len(riders) == 1 else self._carrier(riders)

    def _token_room(self, head: Job) -> int:
        """The most tokens one combined request may carry: the coalescing bound, and no more than the largest
        token bucket of the endpoints serving the model holds (it would wait for a full bucket, then owe)."""
        assert self.coalescing is not None
        room = self.coalescing.max_tokens
        buckets = []
        for state in self.router.candidates(head):
            limits = self.router.scope(state, head.model).snapshot()
            tpm = limits.per_minute().get("tokens") if limits is not None else None
            if tpm is None:
                return room
            buckets.append(int(tpm / 60.0 * limits.burst_s))  # type: ignore[union-attr]
        return min(room, max(buckets)) if buckets else room

    def _carrier(self, riders: list[Job]) -> Job:
        """The job that sends ``riders``' texts as one request (in the first one's place in the queue)."""
        head = riders[0]
        carrier = Job(head.endpoint, inputs_body(riders), f"{head.custom_id}+{len(riders) - 1}", head.priority,
                      head.sequence, sum(rider.estimate for rider in riders), 0, self.clock.now(), None)
        carrier.route = head.route
        carrier.riders = riders
        for rider in riders:
            rider.state = State.RIDING
            rider.carrier = carrier
        return carrier

    def _keep_riders(self, carrier: Job) -> bool:
        """Before a carrier is admitted: leave out riders that left it (expired, abandoned); False when none is
        left (the carrier is dropped)."""
        assert carrier.riders is not None
        left = self.settler.riders_left(carrier)
        if not left:
            self.settler.drop(carrier)
            return False
        if len(left) != len(carrier.riders):
            carrier.riders = left
            carrier.set_body(inputs_body(left))
            carrier.estimate = sum(rider.estimate for rider in left)
        return True

    def split(self, carrier: Job) -> bool:
        """Send a combined request's riders as two requests: one input may be what the server refused, and so
        only its own job fails. False when a single rider is left (the error is its own)."""
        left = self.settler.riders_left(carrier)
        if len(left) < 2:
            return False
        half = len(left) // 2
        log.info("coalesced_split", custom_id=carrier.custom_id, inputs=len(left))
        for part in (left[:half], left[half:]):
            for rider in part:
                rider.attempts += carrier.attempts
            self.requeue(self._carrier(part))
        self.settler.drop(carrier)  # its riders have moved: nothing of theirs is dropped
        return True

    def _leave_carrier(self, rider: Job) -> None:
        """``rider`` leaves its carrier (it expired or was abandoned); a carrier nobody rides any more is not
        sent (or its request is cancelled)."""
        carrier, rider.carrier = rider.carrier, None
        if carrier is None or self.settler.riders_left(carrier):
            return
        if carrier.state is State.RUNNING and carrier.task is not None:
            carrier.stop_reason = "abandoned"
            carrier.task.cancel()
        elif carrier.state is State.WAITING or (carrier.state is State.QUEUED and self.queue.remove(carrier)):
            self.settler.drop(carrier)
        # Otherwise the dispatcher holds it (dropped when it looks again), or its answer is being concluded.

    # ------------------------------------------------------------------ napping

    async def _nap(self, seconds: float) -> None:
        """The dispatcher's sleep: an arrival, a stop, a budget hold coming back or the pool closing wakes it
        early."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = (self.clock.call_at(self.clock.now() + max(0.0, seconds), functools.partial(_resolve, waiter))
                 if seconds < math.inf else None)
        self._napping = waiter
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._napping = None

    def wake(self) -> None:
        """Wake the dispatcher from a nap: something changed."""
        if self._napping is not None and not self._napping.done():
            self._napping.set_result(None)

    def budget_freed(self) -> None:
        """A budget hold came back: a job waiting for room may fit now."""
        self._budget_wait = False
        self.wake()

    # ------------------------------------------------------------------ pausing and stopping

    def pause(self, scope: ScopeLimiter, delay: float) -> float:
        """Pause dispatch through ``scope`` for ``delay`` seconds (capped at ``max_pause_s``); returns the pause
        taken. Other scopes (other models, other endpoints) go on."""
        if delay > self.max_pause_s:
            log.warning("pause_capped", asked_s=round(delay, 3), paused_s=self.max_pause_s,
                        detail="the server asked for a longer pause than max_pause_s; dispatch resumes sooner")
            delay = self.max_pause_s
        until = self.clock.now() + delay
        if until > scope.pause_until:
            scope.pause_until = until
            self.counters.pauses += 1
            # Info, not a warning: pausing on a 429 is the pool doing its job; statistics().pauses counts them.
            log.info("dispatch_paused", delay_s=round(delay, 3), reason="rate_limited", model=scope.model_name)
        return delay

    def stop(self, error: errors.RunStopped) -> None:
        """Stop admitting: jobs that are queued, waiting out a backoff or following another fail now."""
        if self.stopped is not None:
            return
        self.stopped = error
        # A stop the caller asked for (Ctrl-C in the CLI) is no error.
        level = log.warning if type(error) is errors.RunStopped else log.error
        level("run_stopped", reason=str(error), code=error.code)
        waiting = [job for job in self.settler.live if job.state in (State.QUEUED, State.WAITING, State.FOLLOWING)
                   or (job.state is State.RIDING and job.carrier is not None
                       and job.carrier.state in (State.QUEUED, State.WAITING))]
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
            if job.endpoint_state is not None:
                job.endpoint_state.in_flight -= 1
            self.slots.release()

    def expire(self, job: Job) -> None:
        """The deadline timer: fail ``job`` wherever it waits."""
        if job.state in (State.SETTLED, State.CONCLUDING):
            return  # settled, or answered in time and being concluded
        if job.state is State.RIDING:
            self._leave_carrier(job)
            self.spawn(self.settler.fail(job, errors.DeadlineExceeded, "the deadline passed before the combined "
                                         "request it rode in was answered"))
        elif job.state is State.RUNNING and job.task is not None:
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
        if job.state is State.RIDING:
            self._leave_carrier(job)
            self.settler.drop(job)
        elif job.state is State.RUNNING and job.task is not None:
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
