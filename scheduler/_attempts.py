"""Attempts: one admitted job's request on the wire, and what its outcome means (the classification table).

::

    success (the endpoint's own shape)  -> result             429 rate limit -> pause all dispatch, retry (time-bounded)
    200 not the answer, 5xx, 408, 409,  -> backoff, retry     429 capacity   -> backoff, retry (time-bounded), no pause;
    timeouts, dropped connections          (max_attempts)                       a flex job may go to standard instead
    400, 404, 413, 422                  -> error result       quota, 401/403 -> stop the run
                                           (a 404 moves on to the next fallback model)

Flex processing (``service_tier: "flex"``): an attempt waits up to ``flex_timeout_s`` (flex answers slowly), a
result records the tier that served it (``Result.tier``, from the answer's ``service_tier``) and is priced at it.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Literal

import structlog

from . import coalesce, errors
from ._dispatch import Dispatcher
from ._flights import Flights, ResponseCache
from ._job import Job, State
from ._settle import Settler
from .admission import Mark
from .cache import cache_key
from .clock import Clock
from .concurrency import AdaptiveConcurrency
from .cost import TIERS, PriceTable, Tier
from .dialects import read_limits
from .endpoints import EndpointState, Router
from .fallbacks import Fallback
from .logs import redact
from .refusals import refusal_kind, retry_after_s
from .results import Result, Usage
from .retry import Backoff, Outcome, answer_problem, classify, error_code
from .statistics import Counters
from .streaming import StreamBroken, relay
from .transport import Response, TransportFailure

__all__ = ["Attempts"]

log = structlog.get_logger("scheduler")

#: what ``Pool(flex_fallback=...)`` may be: where a flex job that met a capacity 429 goes instead of waiting
FlexFallback = Literal["standard"]
# The service_tier that asks for standard processing explicitly ("auto" would take the project's default tier,
# which may be another one): https://platform.openai.com/docs/api-reference/chat/create#service_tier
_STANDARD_TIER = "default"


class Attempts:
    """Runs attempts and acts on their outcomes.

    Args:
        router: the endpoints; each attempt tells its endpoint how it went (breaker, concurrency, retirement).
        fallbacks: the models a job moves on to, in order (``job.route`` counts how far it went).
        cache_scope: what scopes the response cache's keys (endpoints and key fingerprints).
    """

    def __init__(
        self, *, dispatcher: Dispatcher, settler: Settler, router: Router, fallbacks: Sequence[Fallback],
        counters: Counters, clock: Clock, rng: random.Random, backoff: Backoff, prices: PriceTable,
        cache: ResponseCache | None, flights: Flights, cache_scope: str, max_attempts: int,
        max_rate_limited_s: float, request_timeout_s: float, flex_timeout_s: float = 900.0,
        flex_fallback: FlexFallback | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.settler = settler
        self.router = router
        self.fallbacks = fallbacks
        self.counters = counters
        self.clock = clock
        self.rng = rng
        self.backoff = backoff
        self.prices = prices
        self.cache = cache
        self.flights = flights
        self.cache_scope = cache_scope
        self.max_attempts = max_attempts
        self.max_rate_limited_s = max_rate_limited_s
        self.request_timeout_s = request_timeout_s
        self.flex_timeout_s = flex_timeout_s
        self.flex_fallback = flex_fallback
        self.tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ running

    def launch(self, job: Job) -> None:
        """Start ``job``'s admitted attempt; it holds a worker until the answer (or failure) is in."""
        job.state = State.RUNNING
        self.counters.in_flight += 1
        # A bare asyncio task: anyio's start_soon costs several times more, and this is the hot path.
        task = asyncio.get_running_loop().create_task(self._run(job))
        job.task = task
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._run_done, job))

    def _run_done(self, job: Job, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if job.task is not task:
            return  # an earlier attempt's task, ending after the job moved on
        job.task = None
        if job.state is State.RUNNING:
            # Cancelled before it started (so its own handlers never ran): its worker and its result.
            self.dispatcher.free_worker(job)
            self.dispatcher.spawn(self._cancelled(job))

    async def _run(self, job: Job) -> None:
        scope, state = job.scope, job.endpoint_state
        assert scope is not None and state is not None
        try:
            sent_at = self.clock.now()
            mark = scope.on_wire(job.costs)
            self.counters.attempts += 1
            response: Response | None = None
            failure: TransportFailure | None = None
            try:
                if job.stream_to is not None:
                    response = await relay(job, state.transport, self._timeout(job))
                else:
                    response = await state.transport.send(job.endpoint, job.body, timeout=self._timeout(job))
            except TransportFailure as exc:
                failure = exc
            finally:
                self.dispatcher.free_worker(job)
            answered_at = self.clock.now()
            await self._observe(job, state, response, sent_at, mark)
            self._tell_endpoint(job, state, response, failure, answered_at, answered_at - sent_at)
            await self._conclude(job, response, failure)
        except asyncio.CancelledError:
            self.dispatcher.free_worker(job)
            await self._cancelled(job)
        except Exception as exc:
            self.dispatcher.free_worker(job)
            state.breaker.lost()
            await self.settler.internal_error(job, exc)

    def _timeout(self, job: Job) -> float:
        # Flex answers slowly (OpenAI suggests allowing up to 15 minutes): its own timeout.
        limit = self.flex_timeout_s if is_flex(job.body) else self.request_timeout_s
        if job.deadline is None:
            return limit
        return max(0.001, min(limit, job.deadline - self.clock.now()))

    async def _observe(self, job: Job, state: EndpointState, response: Response | None, sent_at: float,
                       mark: Mark) -> None:
        """Tell the scope what the answer's headers say. A 429 was not charged by the server: ``refused``
        handles it, and its headers must not count as if it had been."""
        assert job.scope is not None
        report = None
        if response is not None:
            dialect = state.dialect.observe(response.status, response.headers)
            if dialect == "none" and state.concurrency is None and job.scope.snapshot() is None:
                # A server that states no limits (vLLM, Ollama): concurrency is its limit, found by probing.
                log.info("concurrency_adaptive", endpoint=state.label, detail="no rate-limit headers: in-flight "
                         "requests are adapted to the server's latency instead")
                state.concurrency = AdaptiveConcurrency(initial=max(1, state.in_flight + 1),
                                                        max_limit=self.dispatcher.workers)
            if state.concurrency is not None:
                job.scope.unlimit()
            if response.status != 429:
                # Some providers state reset times as wall-clock times.
                report = read_limits(response.headers, dialect, now_unix=self.clock.wall())
        try:
            await job.scope.observe(report, sent_at, mark)
        except errors.RunStopped as exc:
            self.dispatcher.stop(exc)

    def _tell_endpoint(self, job: Job, state: EndpointState, response: Response | None,
                       failure: TransportFailure | None, now: float, latency_s: float) -> None:
        """The endpoint's breaker and concurrency learn how the attempt went (``now``: when it ended)."""
        status = response.status if response is not None else None
        # A 429 is an answer too: the endpoint is up, only busy (a probe answered 429 must not leave the
        # circuit half-open for good).
        healthy = status is not None and (status < 500 or status == 501) and status != 408
        # Where concurrency adapts (a server of our own), "overloaded" is the load signal it adapts to, not a
        # fault: the breaker would stall the endpoint for its cool-down instead.
        overloaded = status in (503, 529) and state.concurrency is not None
        if healthy or overloaded:
            state.breaker.success(state.label)
        else:
            # 5xx, timeouts, dropped connections: the endpoint is in trouble; a retry prefers another one.
            state.failures += 1
            state.breaker.failure(now, state.label)
            job.avoid = state
        concurrency = state.concurrency
        if concurrency is None:
            return
        if status is not None and 200 <= status < 300:
            concurrency.on_success(latency_s, now, in_flight=state.in_flight + 1)
        elif status == 429:
            concurrency.on_failure("rate_limited", now)
        elif status in (503, 529):
            concurrency.on_failure("overloaded", now)
        elif failure is not None:
            concurrency.on_failure("timeout" if failure.kind == "timeout" else "connection", now)

    async def _tell(self, call: Awaitable[None]) -> None:
        """Await a call on the limiter; a shared limit gone for good stops the run instead of failing the job."""
        try:
            await call
        except errors.RunStopped as exc:
            self.dispatcher.stop(exc)

    # ------------------------------------------------------------------ outcomes

    async def _conclude(self, job: Job, response: Response | None, failure: TransportFailure | None) -> None:
        """Act on one attempt's outcome."""
        settler = self.settler
        if response is None:
            assert failure is not None
            settler.release(job, uncertain=True)  # no answer: the server may have billed it
            if isinstance(failure, StreamBroken) and failure.delivered:
                await settler.fail(job, errors.StreamIncomplete, f"the stream broke off after output began: {failure}")
            else:
                await self._retry(job, None, f"no response: {failure}")
            return
        job.last_response = response
        outcome = classify(response.status, response.headers, response.body)
        if outcome is Outcome.SUCCESS:
            problem = answer_problem(job.endpoint, response.body, response.is_json)
            if problem is None and job.riders is not None:
                problem = coalesce.answer_problem(response.body, len(job.riders))
            if problem is None:
                await self._succeed(job, response)
                return
            settler.release(job, uncertain=True)  # a proxy's page may stand for an answer that was billed
            await self._retry(job, response, problem, invalid=True)
            return
        settler.release(job, uncertain=False)  # an error answer is not billed
        assert job.scope is not None
        if outcome is Outcome.RATE_LIMITED:
            await self._refused(job, response)
        elif outcome is Outcome.RETRY:
            asked = self._asked_wait(job, response)
            await self._retry(job, response, _describe(response), asked)
        elif outcome is Outcome.JOB_FATAL:
            if response.status in _INPUT_REFUSED and job.riders is not None and self.dispatcher.split(job):
                return  # one input of a combined request may be the cause: each half is sent again
            # A 404 is an unknown model (or a wrong endpoint): the next fallback may serve it.
            if response.status != 404 or not self._fall_back(job, _describe(response)):
                await settler.fail(job, errors.RequestRejected, _describe(response), response)
        elif outcome is Outcome.QUOTA:
            await self._tell(job.scope.refused(job.costs, None))
            message = f"the API reports the quota exhausted ({error_code(response.body)}): check plan and billing"
            await self._retire(job, errors.QuotaExhausted(message), response)
        else:
            message = f"the API refused the key (HTTP {response.status}): check OPENAI_API_KEY and its permissions"
            await self._retire(job, errors.AuthenticationFailed(message), response)

    def _asked_wait(self, job: Job, response: Response) -> float | None:
        """The wait an error answer asks for, wherever its dialect says it (headers, the message's "try again
        in 2s", a gateway's calendar minute); None when it does not say."""
        dialect = job.endpoint_state.dialect.dialect if job.endpoint_state is not None else None
        return retry_after_s(response.headers, response.body, dialect, now_unix=self.clock.wall())

    async def _retire(self, job: Job, error: errors.RunStopped, response: Response) -> None:
        """An endpoint's key was refused or its quota is spent: it leaves the run. The job goes to another
        endpoint serving its model; only when none is left do its model's jobs stop, and the run when no
        endpoint is left at all."""
        state = job.endpoint_state
        assert state is not None
        router = self.router
        if len(router.endpoints) > 1:
            error = type(error)(f"{state.label}: {error}")
        router.retire(state, error)
        if router.exhausted is not None:
            self.dispatcher.stop(error)
        if router.unserved(job.model) is None:
            job.failures = 0
            self.dispatcher.requeue(job)
        else:
            await self.settler.fail(job, type(error), str(error), response)

    async def _refused(self, job: Job, response: Response) -> None:
        """A 429 says "not now", not "this request is bad": retry without using an attempt, for as long as
        ``max_rate_limited_s`` (or the deadline) allows. A rate limit pauses all dispatch and empties the bucket
        it names; a shortage of capacity (flex, an overloaded provider) only backs this job off."""
        assert job.scope is not None
        assert job.endpoint_state is not None
        dialect = job.endpoint_state.dialect.dialect
        refusal = refusal_kind(response.status, response.headers, response.body, dialect)
        if refusal.kind == "too_large":
            if job.riders is None or not self.dispatcher.split(job):
                await self.settler.fail(job, errors.RequestTooLarge, _describe(response), response)
            return
        now = self.clock.now()
        if job.limited_since is None:
            job.limited_since = now
        # A LiteLLM window is spent until the calendar minute turns: that is the wait it asks for.
        asked = self._asked_wait(job, response)
        if refusal.kind == "capacity":
            self.counters.capacity_refused += 1
            if self.flex_fallback == "standard" and is_flex(job.body):
                self._flex_to_standard(job)
                return
            delay = max(self.backoff.delay(job.attempts, self.rng), asked or 0.0)
            reason = "no capacity (429)"
        else:
            self.counters.rate_limited += 1
            await self._tell(job.scope.refused(job.costs, refusal.dimension))
            delay = self.dispatcher.pause(job.scope, asked if asked is not None else
                                          self.backoff.delay(job.attempts, self.rng))
            reason = "rate limited (429)"
        if now - job.limited_since >= self.max_rate_limited_s:
            await self.settler.fail(job, errors.RetriesExhausted,
                                    f"still refused ({reason}) after {now - job.limited_since:.0f} s of retries",
                                    response)
        elif job.deadline is not None and now + delay >= job.deadline:
            wanted = asked if asked is not None else delay
            await self.settler.fail(job, errors.DeadlineExceeded,
                                    f"{reason}: the server asks for {wanted:g} s, past the deadline", response)
        else:
            self.counters.retries += 1
            log.info("job_retrying", custom_id=job.custom_id, attempt=job.attempts, delay_s=round(delay, 3),
                     reason=reason)
            if refusal.kind == "capacity":
                self.dispatcher.backoff(job, delay)
            else:
                self.dispatcher.requeue(job)  # the pause holds it back

    async def _retry(
        self, job: Job, response: Response | None, reason: str, retry_after: float | None = None,
        *, invalid: bool = False,
    ) -> None:
        """A failed attempt that may succeed later: back off and requeue, or give up after ``max_attempts``."""
        job.failures += 1
        job.last_problem = reason
        if job.failures >= self.max_attempts:
            if self._fall_back(job, reason):
                return
            kind = errors.InvalidResponse if invalid else errors.RetriesExhausted
            last = "" if invalid else "last: "
            await self.settler.fail(job, kind, f"gave up after {job.attempts} attempts; {last}{reason}", response)
            return
        delay = max(self.backoff.delay(job.failures, self.rng), retry_after or 0.0)
        now = self.clock.now()
        if job.deadline is not None and now + delay >= job.deadline:
            await self.settler.fail(job, errors.DeadlineExceeded, f"no time left to retry; last: {reason}", response)
            return
        self.counters.retries += 1
        log.info("job_retrying", custom_id=job.custom_id, attempt=job.attempts, delay_s=round(delay, 3),
                 reason=redact(reason))
        if delay > 0:
            self.dispatcher.backoff(job, delay)  # the worker is already free: a backoff holds none
        else:
            self.dispatcher.requeue(job)

    def _flex_to_standard(self, job: Job) -> None:
        """Send a flex job that found no capacity once more, at once, at the standard tier (and its price)."""
        log.info("job_flex_fallback", custom_id=job.custom_id, attempt=job.attempts)
        job.body = {**job.body, "service_tier": _STANDARD_TIER}
        job.limited_since = None
        self.counters.flex_fallbacks += 1
        self.dispatcher.requeue(job)

    def _fall_back(self, job: Job, reason: str) -> bool:
        """Requeue ``job`` against the next fallback model, with fresh attempts; False when none is left."""
        if job.route >= len(self.fallbacks):
            return False
        fallback = self.fallbacks[job.route]
        log.warning("job_fallback", custom_id=job.custom_id, model=fallback.model, failed_model=job.model,
                    reason=redact(reason))
        job.route += 1
        job.set_body({**job.body, "model": fallback.model})
        for one in job.riders or (job,):
            if one.cache_key is not None:
                # Its answer is the fallback's: stored under the fallback's request, never under the primary's.
                rekeyed = cache_key(self.cache_scope, one.endpoint, {**one.body, "model": fallback.model})
                self.flights.leave(one, rekeyed)
        job.failures = 0
        job.limited_since = None
        self.counters.fallbacks += 1
        self.dispatcher.requeue(job)
        return True

    async def _succeed(self, job: Job, response: Response) -> None:
        if job.riders is not None:
            await self._succeed_riders(job, response)
            return
        usage = Usage.from_body(response.body)
        c = self.counters
        cost = spent = None
        tier = served_tier(job.body, response.body)
        if usage is not None:
            c.prompt_tokens += usage.prompt_tokens
            c.completion_tokens += usage.completion_tokens
            assert job.scope is not None
            await self._tell(job.scope.settle(job.costs, usage))
            cost = self.prices.cost(job.model, usage, tier=tier) if tier in TIERS else None
            if cost is not None:
                c.cost_usd += cost
            # A tier without a price (flex on a model not priced for it, priority): the budget counts standard.
            spent = cost if cost is not None or tier == "standard" else self.prices.cost(job.model, usage)
        # An answer without usage may still have been billed: its worst case stays counted against the budget.
        self.settler.release(job, uncertain=usage is None, spent=spent)
        result = Result(
            custom_id=job.custom_id, endpoint=job.endpoint, status=response.status, body=response.body,
            request_id=response.request_id, usage=usage, attempts=job.attempts,
            latency_s=self.clock.now() - job.submitted_at, model=job.model, cost_usd=cost, tier=tier,
            served_by=job.endpoint_state.label if job.endpoint_state is not None else None,
        )
        if job.shape is not None and (shaped := job.shape.conclude(job, result, self.clock.now())) is not result:
            if shaped is None:  # a structured output that did not parse: asked again, no attempt used
                self.counters.parse_retries += 1
                self.dispatcher.requeue(job)
                return
            if not shaped.ok:
                await self.settler.finish(job, shaped)
                return
            result = shaped
        if job.cache_key is not None and self.cache is not None:
            await self.cache.store(job.cache_key, result)
        await self.settler.finish(job, result, saved_usd=cost)

    async def _succeed_riders(self, carrier: Job, response: Response) -> None:
        """A combined request was answered: each rider gets its own vector, a share of the usage and its cost."""
        assert carrier.riders is not None and carrier.scope is not None
        usage = Usage.from_body(response.body)
        c = self.counters
        if usage is not None:
            c.prompt_tokens += usage.prompt_tokens
            await self._tell(carrier.scope.settle(carrier.costs, usage))
        riders = carrier.riders
        parts = coalesce.split_answer(response.body, [rider.estimate for rider in riders])
        costs = [self.prices.cost(carrier.model, share) if share is not None else None for _, share in parts]
        spent = sum(cost for cost in costs if cost is not None) if usage is not None else None
        c.cost_usd += spent or 0.0
        self.settler.release(carrier, uncertain=usage is None, spent=spent)
        c.coalesced_requests += 1
        left = set(self.settler.riders_left(carrier))
        c.coalesced_jobs += len(left)
        now, label = self.clock.now(), carrier.endpoint_state.label if carrier.endpoint_state is not None else None
        count = len(riders) if len(riders) > 1 else None
        for rider, (body, share), cost in zip(riders, parts, costs, strict=True):
            if rider not in left:
                continue  # it expired or was abandoned meanwhile: its vector goes nowhere
            result = Result(
                custom_id=rider.custom_id, endpoint=rider.endpoint, status=response.status, body=body,
                request_id=response.request_id, usage=share, attempts=rider.attempts + carrier.attempts,
                latency_s=now - rider.submitted_at, model=carrier.model, cost_usd=cost, served_by=label,
                tier=served_tier(carrier.body, response.body), coalesced=count,
            )
            if rider.cache_key is not None and self.cache is not None:
                await self.cache.store(rider.cache_key, result)
            await self.settler.finish(rider, result, saved_usd=cost)
        self.settler.drop(carrier)  # every rider is settled: this only ends the carrier

    async def _cancelled(self, job: Job) -> None:
        """The pool cancelled ``job``'s attempt: its deadline passed, its caller left, or the pool is closing."""
        if job.endpoint_state is not None:
            job.endpoint_state.breaker.lost()  # if it was a probe, the next request probes instead
        self.settler.release(job, uncertain=True)  # it was sent: the server may bill it
        if job.stop_reason == "abandoned" or job.abandoned:
            self.settler.drop(job)
        elif job.stop_reason == "deadline":
            await self.settler.fail(job, errors.DeadlineExceeded, "the deadline passed while the request was in "
                                    "flight")
        else:
            stopped = self.dispatcher.stopped
            reason = str(stopped) if stopped is not None else "the pool closed"
            await self.settler.fail(job, errors.RunStopped, f"{reason} while the request was in flight")


# Statuses that may mean one input of a combined request is bad (too long, empty): the request is split.
_INPUT_REFUSED = frozenset({400, 413, 422})


def is_flex(body: Mapping[str, Any]) -> bool:
    """Whether a request body asks for flex processing."""
    return body.get("service_tier") == "flex"


def served_tier(request: Mapping[str, Any], answer: Any) -> Tier | str:
    """The tier that served an answer: its ``service_tier`` (the tier actually used, which may differ from the
    one asked for), else the one asked for. ``default`` and ``auto`` are "standard"; other tiers (``priority``,
    ``scale``) keep their names and have no price here."""
    served = answer.get("service_tier") if isinstance(answer, dict) else None
    if not isinstance(served, str):
        served = request.get("service_tier")
    if served == "flex":
        return "flex"
    if served in (None, _STANDARD_TIER, "auto"):
        return "standard"
    return str(served)


def _describe(response: Response) -> str:
    body = response.body
    message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    detail = f": {str(message)[:300]}" if message else ""
    return redact(f"HTTP {response.status}{detail}")


