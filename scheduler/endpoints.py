"""Endpoints: many keys, deployments and servers as one pool, each paced by its own limits and headers.

::

    job (model m) ──► Router.admit: the endpoints serving m, not retired, circuit closed (or due a probe)
                         │  each has a limit scope per model, synced from its own answers' headers (its dialect)
                         ▼
                      the first that admits now, least loaded for its weight first; else the soonest wait

5xx, timeouts or dropped connections in half of an endpoint's last 20 answers open its circuit breaker (a
cool-down, then one probe); a retry goes to another endpoint; a refused key or an exhausted quota retires the
endpoint for the run, and only when no endpoint serves a model do its jobs stop. An endpoint that states no limits
at all (vLLM, Ollama) is paced by adaptive concurrency instead (:mod:`scheduler.concurrency`).
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from .concurrency import AdaptiveConcurrency
from .dialects import DIALECTS, Dialect, DialectTracker
from .errors import ConfigurationError, JobError, RequestRejected, RunStopped
from .limits import Limits
from .logs import register_secret
from .transport import OpenAITransport, Transport

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from ._job import Job
    from .admission import Limiter, ScopeLimiter
    from .fallbacks import Fallback

__all__ = ["CircuitBreaker", "Endpoint", "EndpointState", "Router", "endpoint_key"]

log = structlog.get_logger("scheduler")


def endpoint_key(client: Any) -> str:
    """What identifies an endpoint's limits: its base URL and a fingerprint of its key (never the key itself)."""
    key = str(getattr(client, "api_key", "") or "")
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{getattr(client, 'base_url', '')}|{fingerprint}"


def _label(client: Any) -> str:
    """Host and a short key fingerprint: names an endpoint in results, logs and metrics, never the key."""
    host = urlsplit(str(getattr(client, "base_url", "") or "")).hostname or "endpoint"
    key = str(getattr(client, "api_key", "") or "")
    return f"{host}#{hashlib.sha256(key.encode()).hexdigest()[:6]}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place requests can go: a client (its base URL and key), its limits, and the models it serves.

    Args:
        client: an ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``) for the endpoint.
        limits: its limits for every model not in ``model_limits`` (None: learned from its headers).
        model_limits: limits of particular models on this endpoint.
        models: the models it serves (None: every model).
        weight: its share when several endpoints can take a job at once.
        dialect: how to read its rate-limit headers (None: recognised from them); see :mod:`scheduler.dialects`.
        name: its name in results, logs and metrics (default: host and a short key fingerprint).
        transport: a seam for tests (default: the client's).
    """

    client: AsyncOpenAI | None = None
    limits: Limits | None = None
    model_limits: Mapping[str, Limits] | None = None
    models: Sequence[str] | None = None
    weight: float = 1.0
    dialect: Dialect | None = None
    name: str | None = None
    transport: Transport | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigurationError(f"Endpoint.weight must be positive, got {self.weight!r}")
        if self.dialect is not None and self.dialect not in DIALECTS:
            raise ConfigurationError(f"Endpoint.dialect must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")
        if self.client is None and self.transport is None:
            raise ConfigurationError("an Endpoint needs a client (or a transport)")


class CircuitBreaker:
    """Closed while an endpoint answers; open when at least half of its last ``window`` answers were failures
    (5xx, timeouts, dropped connections), for a cool-down that doubles each time a probe fails, up to
    ``max_cool_down_s``; then one probe.

    A share of a window, not failures in a row: failures come back fast and answers slowly, so at a hundred
    requests a second a few percent of 5xx arrive in runs of five that say nothing about the endpoint, and the
    circuit opened on them stalled the only endpoint for its cool-down."""

    __slots__ = ("_cool_down_s", "_failed", "_initial_cool_down_s", "_outcomes", "_probing", "failure_share",
                 "max_cool_down_s", "open_until")

    def __init__(self, window: int = 20, failure_share: float = 0.5, cool_down_s: float = 5.0,
                 max_cool_down_s: float = 60.0) -> None:
        self.failure_share = failure_share
        self.max_cool_down_s = max_cool_down_s
        self._initial_cool_down_s = cool_down_s
        self._cool_down_s = cool_down_s
        #: the last ``window`` answers, True for a failure; ``_failed`` of them failed
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=window)
        self._failed = 0
        self._probing = False
        #: no request before this time (-inf: closed)
        self.open_until = -math.inf

    @property
    def state(self) -> str:
        return "closed" if self.open_until == -math.inf else "half-open" if self._probing else "open"

    def allows(self, now: float) -> bool:
        """Whether a request may go now (when open and cooled down: one probe at a time)."""
        if self.open_until == -math.inf:
            return True
        return now >= self.open_until and not self._probing

    def sent(self, now: float) -> None:
        if self.open_until != -math.inf and now >= self.open_until:
            self._probing = True

    def success(self, label: str) -> None:
        """An answer came back. While open, only the probe's answer closes the circuit: an answer to a request
        sent before it opened says nothing about the endpoint now."""
        if self.open_until != -math.inf:
            if not self._probing:
                return
            log.info("circuit_closed", endpoint=label)
            self._probing = False
            self.open_until = -math.inf
            self._cool_down_s = self._initial_cool_down_s
        self._record(failed=False)

    def lost(self) -> None:
        """An attempt ended with no answer to judge by (cancelled): a probe it was is not waited for."""
        self._probing = False

    def failure(self, now: float, label: str) -> None:
        if self._probing:
            self._cool_down_s = min(self.max_cool_down_s, self._cool_down_s * 2)
        elif self.open_until != -math.inf:
            return  # sent before the circuit opened
        else:
            self._record(failed=True)
            window = self._outcomes
            if len(window) < (window.maxlen or 0) or self._failed < self.failure_share * len(window):
                return
        self._probing = False
        self.open_until = now + self._cool_down_s
        # The window starts afresh: after the probe's answer closes the circuit, only what follows counts.
        failed, self._failed = self._failed, 0
        self._outcomes.clear()
        log.warning("circuit_opened", endpoint=label, cool_down_s=self._cool_down_s, failures=failed)

    def _record(self, *, failed: bool) -> None:
        window = self._outcomes
        if len(window) == window.maxlen and window[0]:
            self._failed -= 1
        window.append(failed)
        self._failed += failed


class EndpointState:
    """An endpoint at run time: its transport, identity, dialect, breaker, concurrency and counts."""

    __slots__ = ("breaker", "concurrency", "config", "dialect", "excluded", "failures", "in_flight", "key", "label",
                 "limits", "model_limits", "models", "retired", "scopes", "served", "transport", "weight")

    def __init__(self, config: Endpoint, transport: Transport, *, limits: Limits | None,
                 model_limits: Mapping[str, Limits], workers: int, excluded: frozenset[str] = frozenset()) -> None:
        self.config = config
        self.transport = transport
        client = config.client
        # A transport with no client (a test's) is told apart by its name, if it has one.
        self.key = endpoint_key(client) + (f"#{config.name}" if client is None and config.name else "")
        self.label = config.name or (_label(client) if client is not None else "endpoint")
        self.dialect = DialectTracker(forced=config.dialect)
        self.breaker = CircuitBreaker()
        self.models = frozenset(config.models) if config.models is not None else None
        #: models served elsewhere only (a fallback on a client of its own)
        self.excluded = excluded
        self.weight = config.weight
        self.limits = config.limits if config.limits is not None else limits
        self.model_limits = {**model_limits, **(config.model_limits or {})}
        #: paces an endpoint that states no limits (dialect "none"): requests it may have in flight
        self.concurrency = AdaptiveConcurrency(max_limit=workers) if config.dialect == "none" else None
        #: why it was retired for the run (a refused key, an exhausted quota), or None
        self.retired: RunStopped | None = None
        self.in_flight = 0
        self.served = 0
        self.failures = 0
        #: its limit scope by model, once made (the router asks for one on every admission)
        self.scopes: dict[str | None, ScopeLimiter] = {}

    def serves(self, model: str | None) -> bool:
        return self.retired is None and (self.models is None or model in self.models) and model not in self.excluded

    def limits_of(self, model: str | None) -> Limits | None:
        return self.model_limits.get(model, self.limits) if model is not None else self.limits


class Router:
    """Sends each job to the endpoint that can admit it soonest among those serving its model."""

    __slots__ = ("_retirements", "endpoints", "limiter")

    def __init__(self, endpoints: Sequence[EndpointState], limiter: Limiter) -> None:
        self.endpoints = list(endpoints)
        self.limiter = limiter
        self._retirements = 0

    def scope(self, state: EndpointState, model: str | None) -> ScopeLimiter:
        """The limit scope of ``model`` on ``state``."""
        scope = state.scopes.get(model)
        if scope is None:
            scope = state.scopes[model] = self.limiter.scope(state.key, model, state.limits_of(model))
        return scope

    def candidates(self, job: Job) -> list[EndpointState]:
        """The endpoints that serve the job's model, least loaded for their weight first; the one that failed
        the job last goes last (a retry goes back to it only when no other endpoint is merely busy)."""
        model, endpoints = job.model, self.endpoints
        if len(endpoints) == 1:
            return endpoints if endpoints[0].serves(model) else []
        found = [state for state in endpoints if state.serves(model)]
        if len(found) > 1:
            found.sort(key=lambda state: (state is job.avoid, state.served / state.weight))
        return found

    async def admit(self, job: Job, now: float) -> tuple[EndpointState | None, float]:
        """Charge ``job`` on the first candidate that admits it now and return it (and 0.0); else None and the
        soonest any candidate may (``inf`` when none serves the job's model)."""
        soonest = math.inf
        busy = False  # another endpoint is up and only at its limit for now
        for state in self.candidates(job):
            if busy and state is job.avoid:
                continue  # a retry waits for it rather than go back to the endpoint that just failed it
            if not state.breaker.allows(now):
                soonest = min(soonest, max(state.breaker.open_until, now + 0.05) - now)
                continue
            if state.concurrency is not None and state.in_flight >= state.concurrency.limit:
                soonest, busy = min(soonest, 0.05), True
                continue
            scope = self.scope(state, job.model)
            if scope.pause_until > now:
                soonest = min(soonest, scope.pause_until - now)
                continue
            if scope.too_large(job.estimate) is not None:
                continue
            costs = scope.costs(job.estimate, job.output)
            wait = await scope.acquire(costs, job.priority)
            if wait == 0.0:
                job.scope, job.costs, job.endpoint_state = scope, costs, state
                return state, 0.0
            soonest, busy = min(soonest, wait), True
        return None, soonest

    def too_large(self, job: Job) -> int | None:
        """The smallest token limit the job exceeds when it exceeds every serving endpoint's (else None)."""
        smallest: int | None = None
        for state in self.endpoints:
            if state.serves(job.model):
                limit = self.scope(state, job.model).too_large(job.estimate)
                if limit is None:
                    return None  # one endpoint can take it
                smallest = limit if smallest is None else min(smallest, limit)
        return smallest

    def retire(self, state: EndpointState, error: RunStopped) -> None:
        """Take ``state`` out of the run (its key was refused, its quota is spent)."""
        if state.retired is None:
            state.retired = error
            self._retirements += 1
            log.warning("endpoint_retired", endpoint=state.label, reason=str(error), code=error.code)

    def unserved(self, model: str | None) -> JobError | None:
        """Why no endpoint serves ``model`` (None: one does): the last retirement among those that did (a stop:
        a later run may do its jobs), or no endpoint ever serving it (the request is refused)."""
        if not self._retirements and len(self.endpoints) == 1 and self.endpoints[0].serves(model):
            return None  # the common case, on every job's path
        if any(state.serves(model) for state in self.endpoints):
            return None
        retired = [state.retired for state in self.endpoints
                   if state.retired is not None and (state.models is None or model in state.models)]
        if retired:
            return retired[-1]
        return RequestRejected(f"no endpoint serves the model {model!r}")

    @property
    def exhausted(self) -> RunStopped | None:
        """The last retirement when every endpoint is retired (the run cannot go on), else None."""
        if all(state.retired is not None for state in self.endpoints):
            return self.endpoints[-1].retired
        return None


def endpoint_states(
    endpoints: Sequence[Endpoint], fallbacks: Sequence[Fallback], *, limits: Limits | None,
    model_limits: Mapping[str, Limits], workers: int,
) -> list[EndpointState]:
    """The run-time state of a pool's endpoints; a fallback model on a client (or transport) of its own is one
    more endpoint, serving that model only (and served by no other)."""
    elsewhere = frozenset(f.model for f in fallbacks if f.client is not None or f.transport is not None)
    states = [EndpointState(e, e.transport or OpenAITransport(e.client), limits=limits,  # type: ignore[arg-type]
                            model_limits=model_limits, workers=workers, excluded=elsewhere)
              for e in endpoints]
    for fallback in fallbacks:
        if fallback.client is None and fallback.transport is None:
            continue
        register_secret(getattr(fallback.client, "api_key", None))
        own = Endpoint(client=fallback.client, limits=fallback.limits, models=[fallback.model],
                       transport=fallback.transport)
        transport = fallback.transport or OpenAITransport(fallback.client)  # type: ignore[arg-type]
        states.append(EndpointState(own, transport, limits=fallback.limits, model_limits={}, workers=workers))
    return states
