"""Bucket state in Redis: one budget shared by every process and host that uses the same Redis.

An organisation's rate limit is one budget however many processes spend it. :class:`RedisStore` keeps each
scope's state in a Redis hash and applies the transitions of :class:`~scheduler.admission.buckets.BucketState`
as Lua scripts (``lua/*.lua``, shipped with the package), each atomic, on Redis' own clock (``TIME``), so hosts
with skewed clocks share one timeline. The scripts hold no policy: rates, bursts, floors and bounds arrive as
parameters from the admission model, the same numbers the in-process store is given. redis-py's ``Script``
objects reload a script the server forgot (a restart, ``SCRIPT FLUSH``) instead of surfacing NOSCRIPT.

Keys: ``{sched:<scope>}:bucket`` (a hash) and ``...:hold``, in one hash slot (the hash tag), so the scripts also
run on Redis Cluster; the scope is a hash of the endpoint, key fingerprint and model, never the key itself. Keys
expire after ``2 x burst + 60`` seconds unused: longer than a full refill, so an expired bucket is a full one.

If Redis cannot be reached, :meth:`RedisStore.connect` raises :class:`SharedLimitUnavailable`; later, admission
waits through an outage of up to ``outage_grace_s`` and then raises
:class:`~scheduler.errors.LimiterUnavailable`, which stops the run. It never falls back to a local budget: N
processes each spending the whole limit is the failure this module exists to prevent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio
import redis.exceptions
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from ..clock import Clock, LoopClock
from ..errors import ConfigurationError, LimiterUnavailable
from .buckets import BucketParams, BucketState, Hold
from .stores import Mark

__all__ = ["RedisStore", "SharedLimitUnavailable", "safe_url"]

log = structlog.get_logger("scheduler")

_SCRIPTS = ("acquire", "wire", "sync", "give_back", "state")
_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class SharedLimitUnavailable(ConfigurationError):
    """Raised when the Redis holding a shared limit cannot be reached at start: the budget cannot be shared,
    and no request is admitted without it."""


def safe_url(url: str) -> str:
    """``url`` with its password masked, fit for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "<unparsable Redis URL>"


def _load(name: str) -> str:
    folder = resources.files(__package__).joinpath("lua")
    return folder.joinpath("prelude.lua").read_text() + folder.joinpath(f"{name}.lua").read_text()


class RedisStore:
    """Bucket state shared through Redis.

    Args:
        client: a ``redis.asyncio.Redis`` (see :meth:`connect`, which makes one from a URL and checks it).
        url: the Redis URL, for messages (its password is masked).
        keep: share of each burst the shared bucket never holds. Requests admitted by several processes leave
            for the server in a slightly different order and timing than they were admitted in; the server's
            bucket keeps this much room for that, which costs only a smaller burst (the rate is unchanged).
        outage_grace_s: how long admission waits through a Redis outage before the run stops.
        clock: local time for outages; with ``virtual_time`` also the buckets' time (tests: Redis-side state on
            a virtual clock instead of Redis' own).
    """

    #: the wait acquire() returns while Redis is unreachable
    outage_retry_s = 0.5

    def __init__(
        self, client: redis.asyncio.Redis, *, url: str = "redis://", keep: float = 0.25,
        outage_grace_s: float = 30.0, clock: Clock | None = None, virtual_time: bool = False,
    ) -> None:
        if not 0 <= keep < 1:
            raise ConfigurationError(f"keep must be in [0, 1), got {keep!r}")
        self._redis = client
        self.url = safe_url(url)
        self.shared = True
        self.keep = keep
        self.outage_grace_s = outage_grace_s
        self._clock: Clock = clock or LoopClock()
        self._virtual = virtual_time
        self._scripts = {name: client.register_script(_load(name)) for name in _SCRIPTS}
        self._down_since: float | None = None
        self._pending: set[asyncio.Future[Any]] = set()

    @classmethod
    async def connect(cls, url: str, **options: Any) -> RedisStore:
        """Connect to the Redis at ``url`` and check that it answers.

        Raises:
            SharedLimitUnavailable: Redis cannot be reached (or refuses the credentials).
            ConfigurationError: the URL is not a Redis URL.
        """
        try:
            client = redis.asyncio.Redis.from_url(
                url, socket_connect_timeout=5.0, socket_timeout=5.0,
                # Few, quick retries: a longer outage is handled (and reported) by the store itself.
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
            )
        except ValueError as exc:
            raise ConfigurationError(f"not a Redis URL: {safe_url(url)} ({exc})") from exc
        try:
            await client.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            await client.aclose()
            raise SharedLimitUnavailable(_unavailable(safe_url(url), exc)) from exc
        return cls(client, url=url, **options)

    async def aclose(self) -> None:
        for future in self._pending:
            future.cancel()
        await self._redis.aclose()

    # ------------------------------------------------------------------ the BucketStore protocol

    async def acquire(
        self, key: str, params: BucketParams, costs: Mapping[str, float], floor: float, owner: str, claim: bool,
        grace_s: float,
    ) -> tuple[float, str | None]:
        reply = await self._run("acquire", key, params, _json(costs), floor, owner, "1" if claim else "0", grace_s)
        if reply is None:
            return self.outage_retry_s, None
        wait = float(reply[0])
        binding = _text(reply[1]) or None
        return wait, binding

    def wire(self, key: str, costs: Mapping[str, float]) -> Mark:
        # In the background: this is on the request's hot path; the answer's header sync waits for the mark.
        future = asyncio.ensure_future(self._wire(key, costs))
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        future.add_done_callback(_retrieve)  # a mark nobody waits for (a cancelled request) logs nothing
        return future

    async def _wire(self, key: str, costs: Mapping[str, float]) -> Mapping[str, float] | None:
        reply = await self._run("wire", key, None, _json(costs))
        if reply is None:
            return None
        return {_text(reply[i]): float(reply[i + 1]) for i in range(0, len(reply), 2)}

    async def _wired(self) -> None:
        # What this process sent before a sync or a give-back must be counted first, as it is in memory: the
        # sends are recorded in the background, in order.
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def sync(
        self, key: str, params: BucketParams, bounds: Mapping[str, float], marks: Mapping[str, float],
        learned: Mapping[str, float], widen: float,
    ) -> None:
        await self._wired()
        await self._run("sync", key, params, _json(bounds), _json(marks), _json(learned), widen)

    async def give_back(
        self, key: str, params: BucketParams, amounts: Mapping[str, float], uncount: bool, empty: tuple[str, ...],
        shrink: float, min_burst: float,
    ) -> None:
        await self._wired()
        await self._run("give_back", key, params, _json(amounts), "1" if uncount else "0", _json(list(empty)),
                        shrink, min_burst)

    async def state(self, key: str, params: BucketParams) -> BucketState:
        try:
            reply = await self._scripts["state"](keys=_keys(key), args=[self._params(params)])
        except _FAILURES as exc:
            raise LimiterUnavailable(_unavailable(self.url, exc)) from exc
        fields = {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}
        holder = fields.pop("hold", "")
        state = BucketState(updated=float(fields["ts"]) if "ts" in fields else None, burst=float(fields.get("bf", 1)))
        for name, value in fields.items():
            kind, _, dim = name.partition(":")
            target = {"l": state.levels, "m": state.learned, "c": state.charged, "s": state.sent}.get(kind)
            if target is not None:
                target[dim] = float(value)
        if holder:
            state.hold = Hold(holder, {}, 0.0)
        return state

    # ------------------------------------------------------------------ running scripts

    def _params(self, params: BucketParams | None) -> bytes:
        encoded: dict[str, Any] = {"dims": [], "rates": {}, "fill": {}, "burst_s": 1.0, "keep": self.keep,
                                   "ttl_ms": 120_000}
        if params is not None:
            encoded.update(dims=list(params.rates), rates=dict(params.rates), fill=dict(params.fill),
                           burst_s=params.burst_s, keep=params.keep, ttl_ms=round(params.ttl_s * 1000))
        if self._virtual:
            encoded["now"] = self._clock.now()
        # Empty objects must stay objects in Lua's cjson (an empty Python dict encodes as {} either way).
        return orjson.dumps(encoded)

    async def _run(self, name: str, key: str, params: BucketParams | None, *extra: object) -> Any:
        """Run a script; None during a Redis outage shorter than ``outage_grace_s`` (logged once)."""
        args = [self._params(params), *(x if isinstance(x, int | float | bytes) else str(x) for x in extra)]
        try:
            reply = await self._scripts[name](keys=_keys(key), args=args)
        except _FAILURES as exc:
            now = self._clock.now()
            if self._down_since is None:
                self._down_since = now
                log.warning("shared_limit_unavailable", redis=self.url, error=str(exc),
                            detail="admission waits for Redis: the budget cannot be shared without it")
            if now - self._down_since >= self.outage_grace_s:
                raise LimiterUnavailable(_unavailable(self.url, exc)) from exc
            return None
        if self._down_since is not None:
            log.info("shared_limit_restored", redis=self.url, down_s=round(self._clock.now() - self._down_since, 3))
            self._down_since = None
        return reply

    def __repr__(self) -> str:
        return f"<RedisStore {self.url} keep={self.keep}>"


def _keys(key: str) -> list[str]:
    return [f"{{sched:{key}}}:bucket", f"{{sched:{key}}}:hold"]


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _unavailable(url: str, exc: BaseException) -> str:
    return (f"cannot reach Redis at {url} ({exc}): the rate-limit budget cannot be shared, and no request is "
            "sent without it. Start Redis or fix --redis; without it, give each process its own share of the "
            "limits.")
