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
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Literal

import structlog

from . import errors
from ._dispatch import Dispatcher
from ._flights import Flights, ResponseCache
from ._job import Job, State
from ._settle import Settler
from .admission import Mark
from .cache import cache_key
from .clock import Clock
from .cost import TIERS, PriceTable, Tier
from .dialects import read_limits, refusal_kind
from .endpoints import Route
from .fallbacks import Fallback
from .logs import redact
from .results import Result, Usage
from .retry import Backoff, Outcome, answer_problem, classify, error_code, retry_after_s
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
        routes: route 0 serves a job's own model; route n its n-th fallback.
        cache_scope: what scopes the response cache's keys (endpoint and key fingerprint).
    """

    def __init__(
        self, *, dispatcher: Dispatcher, settler: Settler, routes: Sequence[Route], fallbacks: Sequence[Fallback],
        counters: Counters, clock: Clock, rng: random.Random, backoff: Backoff, prices: PriceTable,
        cache: ResponseCache | None, flights: Flights, cache_scope: str, max_attempts: int,
        max_rate_limited_s: float, request_timeout_s: float, flex_timeout_s: float = 900.0,
        flex_fallback: FlexFallback | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.settler = settler
        self.routes = routes
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
        route = self.routes[job.route]
        scope = job.scope
        assert scope is not None
        try:
            sent_at = self.clock.now()
            mark = scope.on_wire(job.costs)
            self.counters.attempts += 1
            response: Response | None = None
            failure: TransportFailure | None = None
            try:
                if job.stream_to is not None:
                    response = await relay(job, route.transport, self._timeout(job))
                else:
                    response = await route.transport.send(job.endpoint, job.body, timeout=self._timeout(job))
            except TransportFailure as exc:
                failure = exc
            finally:
                self.dispatcher.free_worker(job)
            await self._observe(job, route, response, sent_at, mark)
            await self._conclude(job, response, failure)
        except asyncio.CancelledError:
            self.dispatcher.free_worker(job)
            await self._cancelled(job)
        except Exception as exc:
            self.dispatcher.free_worker(job)
            await self.settler.internal_error(job, exc)

    def _timeout(self, job: Job) -> float:
        # Flex answers slowly (OpenAI suggests allowing up to 15 minutes): its own timeout.
        limit = self.flex_timeout_s if is_flex(job.body) else self.request_timeout_s
        if job.deadline is None:
            return limit
        return max(0.001, min(limit, job.deadline - self.clock.now()))

    async def _observe(self, job: Job, route: Route, response: Response | None, sent_at: float, mark: Mark
                       ) -> None:
        """Tell the scope what the answer's headers say. A 429 was not charged by the server: ``refused``
        handles it, and its headers must not count as if it had been."""
        assert job.scope is not None
        report = None
        if response is not None:
            dialect = route.dialect.observe(response.status, response.headers)
            if response.status != 429:
                # The one wall-clock read: some providers state reset times as wall-clock times.
                report = read_limits(response.headers, dialect, now_unix=time.time())
        try:
            await job.scope.observe(report, sent_at, mark)
        except errors.RunStopped as exc:
            self.dispatcher.stop(exc)

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
            await self._retry(job, response, _describe(response), retry_after_s(response.headers))
        elif outcome is Outcome.JOB_FATAL:
            # A 404 is an unknown model (or a wrong endpoint): the next fallback may serve it.
            if response.status != 404 or not self._fall_back(job, _describe(response)):
                await settler.fail(job, errors.RequestRejected, _describe(response), response)
        elif outcome is Outcome.QUOTA:
            await self._tell(job.scope.refused(job.costs, None))
            message = f"the API reports the quota exhausted ({error_code(response.body)}): check plan and billing"
            self.dispatcher.stop(errors.QuotaExhausted(message))
            await settler.fail(job, errors.QuotaExhausted, message, response)
        else:
            message = f"the API refused the key (HTTP {response.status}): check OPENAI_API_KEY and its permissions"
            self.dispatcher.stop(errors.AuthenticationFailed(message))
            await settler.fail(job, errors.AuthenticationFailed, message, response)

    async def _refused(self, job: Job, response: Response) -> None:
        """A 429 says "not now", not "this request is bad": retry without using an attempt, for as long as
        ``max_rate_limited_s`` (or the deadline) allows. A rate limit pauses all dispatch and empties the bucket
        it names; a shortage of capacity (flex, an overloaded provider) only backs this job off."""
        assert job.scope is not None
        dialect = self.routes[job.route].dialect.dialect
        refusal = refusal_kind(response.status, response.headers, response.body, dialect)
        if refusal.kind == "too_large":
            await self.settler.fail(job, errors.RequestTooLarge, _describe(response), response)
            return
        now = self.clock.now()
        if job.limited_since is None:
            job.limited_since = now
        asked = retry_after_s(response.headers)
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
            if refusal.kind == "window_spent" and asked is None:
                asked = _seconds_to_next_minute()
            delay = self.dispatcher.pause(asked if asked is not None else self.backoff.delay(job.attempts, self.rng))
            reason = "rate limited (429)"
        if now - job.limited_since >= self.max_rate_limited_s:
            await self.settler.fail(job, errors.RetriesExhausted,
                                    f"still refused ({reason}) after {now - job.limited_since:.0f} s of retries",
                                    response)
        elif job.deadline is not None and now + delay >= job.deadline:
            await self.settler.fail(job, errors.DeadlineExceeded,
                                    f"{reason}: the server asks for {delay:g} s, past the deadline", response)
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
        job.body = {**job.body, "model": fallback.model}
        if job.cache_key is not None:
            # Its answer is the fallback's: stored under the fallback's request, never under the primary's.
            self.flights.leave(job, cache_key(self.cache_scope, job.endpoint, job.body))
        job.failures = 0
        job.limited_since = None
        self.counters.fallbacks += 1
        self.dispatcher.requeue(job)
        return True

    async def _succeed(self, job: Job, response: Response) -> None:
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
        )
        if job.cache_key is not None and self.cache is not None:
            await self.cache.store(job.cache_key, result)
        await self.settler.finish(job, result, saved_usd=cost)

    async def _cancelled(self, job: Job) -> None:
        """The pool cancelled ``job``'s attempt: its deadline passed, its caller left, or the pool is closing."""
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


def _seconds_to_next_minute() -> float:
    # A spent fixed window (a gateway counting per calendar minute) opens again at the next minute, by the
    # wall clock; half a second more allows for the server's clock and the request's way there.
    return 60.0 - time.time() % 60.0 + 0.5

