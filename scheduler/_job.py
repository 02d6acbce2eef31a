"""One job on its way through the pool: what it asks for, where it is, and who waits for its result."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

    from ._map import MapCollector
    from ._shape import Shape
    from .admission import ScopeLimiter
    from .clock import Timer
    from .endpoints import EndpointState
    from .results import Result
    from .transport import Response

__all__ = ["Job", "State"]


class State(enum.Enum):
    """Where a job is. Every job ends SETTLED exactly once: that is the pool's first promise."""

    #: in the queue, or held by the dispatcher until it fits the limits
    QUEUED = "queued"
    #: an attempt is on its way (a task runs it, holding a worker)
    RUNNING = "running"
    #: the attempt is over (answered, failed or cancelled): its outcome is being acted on
    CONCLUDING = "concluding"
    #: waiting out a retry backoff (a timer puts it back in the queue)
    WAITING = "waiting"
    #: waiting for an identical job's answer (single flight of the response cache)
    FOLLOWING = "following"
    #: riding in a combined request (coalesced embeddings): its carrier job is queued, waiting or running
    RIDING = "riding"
    SETTLED = "settled"


class Job:
    """A request and its bookkeeping. Internal: the pool creates, moves and settles jobs."""

    __slots__ = (
        "abandoned",
        "attempts",
        "avoid",
        "body",
        "cache_key",
        "carrier",
        "coalesce_key",
        "costs",
        "custom_id",
        "deadline",
        "deadline_timer",
        "deliver",
        "endpoint",
        "endpoint_state",
        "estimate",
        "failures",
        "followers",
        "future",
        "last_problem",
        "last_response",
        "limited_since",
        "model",
        "output",
        "priority",
        "reserved",
        "riders",
        "route",
        "scope",
        "sequence",
        "shape",
        "state",
        "stop_reason",
        "stream_to",
        "submitted_at",
        "task",
        "timer",
    )

    def __init__(
        self, endpoint: str, body: Mapping[str, Any], custom_id: str, priority: int, sequence: int,
        estimate: int, output: int, submitted_at: float, deadline: float | None,
    ) -> None:
        self.endpoint = endpoint
        self.body = body
        model = body.get("model")
        #: the model the body names
        self.model: str | None = model if isinstance(model, str) else None
        self.custom_id = custom_id
        self.priority = priority
        self.sequence = sequence
        #: tokens the request costs against TPM, by our estimate (prompt + output reservation)
        self.estimate = estimate
        #: its output reservation (the output cap times n), part of ``estimate``
        self.output = output
        #: what the current attempt was charged in each limit dimension (the estimate, calibrated)
        self.costs: dict[str, float] = {}
        #: the limit scope it was admitted through (its endpoint and model), and that endpoint
        self.scope: ScopeLimiter | None = None
        self.endpoint_state: EndpointState | None = None
        #: the endpoint that failed its last attempt: a retry prefers another
        self.avoid: EndpointState | None = None
        self.submitted_at = submitted_at
        self.deadline = deadline
        self.state = State.QUEUED
        #: HTTP attempts made (what ``Result.attempts`` reports)
        self.attempts = 0
        #: failed attempts that count against ``max_attempts`` (429s do not: they are bounded by time)
        self.failures = 0
        #: when the job first met a 429
        self.limited_since: float | None = None
        self.last_response: Response | None = None
        self.last_problem = ""
        #: the task running the current attempt
        self.task: asyncio.Task[None] | None = None
        #: the backoff timer that puts the job back in the queue
        self.timer: Timer | None = None
        self.deadline_timer: Timer | None = None
        #: why the pool cancels the running attempt: "deadline", "abandoned" or "closing"
        self.stop_reason: str | None = None
        #: the submitter went away: nobody waits for the result
        self.abandoned = False
        #: the submitter's future (submit, stream)
        self.future: asyncio.Future[Result] | None = None
        #: where map() collects results
        self.deliver: MapCollector | None = None
        #: text deltas of a streamed job
        self.stream_to: MemoryObjectSendStream[str] | None = None
        #: 0: the primary model; n: the n-th fallback
        self.route = 0
        #: worst-case cost held against the budget while in flight
        self.reserved = 0.0
        #: response-cache key (cacheable jobs of a pool with a cache)
        self.cache_key: str | None = None
        #: identical jobs waiting for this one's answer (single flight)
        self.followers: list[Job] | None = None
        #: what it must share with other jobs to ride in one request with them (None: it goes alone)
        self.coalesce_key: str | None = None
        #: a carrier's riders, in the order of their inputs (None: not a carrier)
        self.riders: list[Job] | None = None
        #: the carrier a riding job is in
        self.carrier: Job | None = None
        #: what shaping did (trimmed, refused) and what the answer must parse into; None for most jobs
        self.shape: Shape | None = None

    def set_body(self, body: Mapping[str, Any]) -> None:
        """Change what the job asks (a fallback's model)."""
        self.body = body
        model = body.get("model")
        self.model = model if isinstance(model, str) else None

    def __repr__(self) -> str:
        return f"<Job {self.custom_id!r} {self.state.value} attempts={self.attempts}>"
