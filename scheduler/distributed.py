"""Bulk runs spread over processes and hosts: requests travel through a Redis Stream, results come back in a hash.

::

    enqueue ──XADD──► {NAME}:jobs (stream, consumer group "workers")
                          │ XREADGROUP new entries; XAUTOCLAIM a dead worker's, once idle for claim_idle_s
                          ▼
    worker x N ──► Pool on a RedisStore: every worker on every host spends one RPM/TPM budget ──► API
                          │ one script: HSETNX {NAME}:results custom_id → batch line, then XACK and XDEL
                          ▼
    collect ──► OUTPUT.jsonl, the Batch API output format that ``scheduler run`` writes (distributed_collect.py)

Delivery is at least once, results exactly once: an entry is acknowledged only in the same script that stores its
result, and a result is stored only if none is (``HSETNX``). A worker killed mid-request leaves its entries
pending; a living worker claims them once they have been idle for ``claim_idle_s``, and living workers keep their
own entries fresh (a heartbeat ``XCLAIM ... JUSTID``), so a long request or a long wait for the budget is never
taken for a dead worker. An API call is repeated only for the requests a dead worker had in flight. An entry
delivered more than ``max_deliveries`` times (it keeps killing or failing its workers) is dead-lettered: stored
as an error result with the code ``dead_lettered`` and moved to ``{NAME}:dead``.

Keys share the hash tag ``{NAME}``, so the scripts also run on Redis Cluster. ``{NAME}:enqueued`` holds every
custom_id ever enqueued, which makes enqueueing idempotent (about 100 bytes of Redis memory an id).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import redis.asyncio
import redis.exceptions
import structlog

from .admission.redis_store import safe_url
from .errors import STOPPED_CODES, ConfigurationError
from .jsonl import parse_line, read_lines
from .logs import redact
from .pool import Pool
from .requests import CHAT
from .results import ErrorInfo, Result
from .sinks import batch_line

if TYPE_CHECKING:
    from .limits import Limits

__all__ = [
    "DEAD_LETTERED",
    "GROUP",
    "EnqueueReport",
    "StreamKeys",
    "StreamUnavailable",
    "Worker",
    "WorkerOptions",
    "connect",
    "enqueue",
    "run_worker",
]

log = structlog.get_logger("scheduler")

#: the consumer group every worker reads through
GROUP = "workers"
#: error code of a request dead-lettered after too many deliveries
DEAD_LETTERED = "dead_lettered"
# A model name that no input names: lines without a model leave it to the worker's --model.
_NO_MODEL = "\x00worker-model"
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

# KEYS: jobs, enqueued, results, stats. ARGV: custom_id, endpoint, body, priority, metadata, error line ("" for
# a request). Returns 1 enqueued, 2 stored as an error result (an invalid line), 0 skipped (enqueued or done).
_ENQUEUE = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[6])
  redis.call('HINCRBY', KEYS[4], 'failed', 1)
  return 2
end
redis.call('XADD', KEYS[1], '*', 'custom_id', ARGV[1], 'endpoint', ARGV[2], 'body', ARGV[3],
           'priority', ARGV[4], 'metadata', ARGV[5])
return 1
"""

# KEYS: results, jobs, stats. ARGV: custom_id, batch line, entry id, group, "1" if the result is an error.
# Stores the result unless one is stored, then acknowledges and deletes the entry. Returns 1 if stored.
_STORE = """
local new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if new == 1 and ARGV[5] == '1' then redis.call('HINCRBY', KEYS[3], 'failed', 1) end
redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return new
"""

# KEYS: results, jobs, stats, dead. ARGV: custom_id, error line, entry id, group, then field/value pairs of the
# dead-letter entry.
_DEAD_LETTER = """
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[4], '*', unpack(fields))
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[3], 'failed', 1) end
redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return 1
"""

# KEYS: jobs. ARGV: group, consumer, entry ids. Resets the idle time of the entries this consumer still owns
# (JUSTID: without counting a delivery); an entry another worker claimed meanwhile stays with it.
_HEARTBEAT = """
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""


class StreamUnavailable(ConfigurationError):
    """Raised when the Redis holding a distributed run cannot be reached."""


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The Redis keys of one distributed run, all under the hash tag ``{name}``."""

    name: str
    #: the stream of requests
    jobs: str
    #: every custom_id enqueued (a set)
    enqueued: str
    #: custom_id → batch output line (a hash)
    results: str
    #: the dead-letter stream
    dead: str
    #: counters: failed
    stats: str

    @classmethod
    def of(cls, name: str) -> StreamKeys:
        if not _NAME.fullmatch(name):
            raise ConfigurationError(f"a stream name is 1-100 letters, digits and _.:- characters, not {name!r}")
        tag = f"{{{name}}}"
        return cls(name, f"{tag}:jobs", f"{tag}:enqueued", f"{tag}:results", f"{tag}:dead", f"{tag}:stats")


async def connect(url: str) -> redis.asyncio.Redis:
    """A Redis client for ``url``, checked with a PING.

    Raises:
        StreamUnavailable: Redis cannot be reached.
        ConfigurationError: the URL is not a Redis URL.
    """
    try:
        # The socket timeout outlasts the blocking reads (XREADGROUP BLOCK) of a worker.
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=30.0)
    except ValueError as exc:
        raise ConfigurationError(f"not a Redis URL: {safe_url(url)} ({exc})") from exc
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        await client.aclose()
        raise StreamUnavailable(f"cannot reach Redis at {safe_url(url)} ({exc})") from exc
    return client


async def _ensure_group(client: redis.asyncio.Redis, keys: StreamKeys) -> None:
    try:
        # From the start of the stream: entries enqueued before the first worker are delivered too.
        await client.xgroup_create(keys.jobs, GROUP, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# ---------------------------------------------------------------------------------------------- enqueue


@dataclass(frozen=True, slots=True)
class EnqueueReport:
    """What :func:`enqueue` did."""

    #: requests put on the stream
    added: int
    #: lines whose custom_id was already enqueued or done
    skipped: int
    #: invalid lines, stored at once as error results
    invalid: int


async def enqueue(
    client: redis.asyncio.Redis, path: Path, *, stream: str = "scheduler", model: str | None = None,
    batch: int = 500,
) -> EnqueueReport:
    """Put every request of the JSONL file at ``path`` on the stream, skipping custom_ids enqueued or done.

    Lines are the Batch API request format, bare request bodies, or ``{"prompt": ...}`` lines (see
    :mod:`scheduler.jsonl`); a line without a ``custom_id`` is named ``line-N``. Invalid lines become error
    results at once. Each line is one atomic script, sent ``batch`` at a time: memory stays bounded.

    Args:
        model: the model of bodies that name none (default: the worker's ``--model``).
    """
    keys = StreamKeys.of(stream)
    await _ensure_group(client, keys)
    script = client.register_script(_ENQUEUE)
    added = skipped = invalid = 0
    with path.open("rb") as file:
        for chunk in _chunks(read_lines(file), batch):
            pipe = client.pipeline(transaction=False)
            for number, raw in chunk:
                await script(keys=[keys.jobs, keys.enqueued, keys.results, keys.stats],
                             args=_enqueue_args(number, raw, model), client=pipe)
            for outcome in await pipe.execute():
                added += outcome == 1
                invalid += outcome == 2
                skipped += outcome == 0
    log.info("enqueued", stream=stream, added=added, skipped=skipped, invalid=invalid)
    return EnqueueReport(added, skipped, invalid)


def _enqueue_args(number: int, raw: bytes | None, model: str | None) -> list[str | bytes | int]:
    line = parse_line(number, raw, model=model or _NO_MODEL)
    if line.request is None:
        error = orjson.dumps(batch_line(line.error_result()))
        return [line.custom_id, "", "", 0, "", error]
    body = dict(line.request.body)
    if body.get("model") == _NO_MODEL:
        del body["model"]
    metadata = orjson.dumps(line.metadata) if line.metadata is not None else b""
    return [line.custom_id, line.request.endpoint, orjson.dumps(body), line.request.priority, metadata, b""]


def _chunks(lines: Iterator[tuple[int, bytes | None]], size: int) -> Iterator[list[tuple[int, bytes | None]]]:
    chunk: list[tuple[int, bytes | None]] = []
    for item in lines:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a :class:`Worker` consumes the stream."""

    #: exit once the stream is drained (nothing pending, nothing new) instead of waiting for more
    burst: bool = False
    #: seconds an entry must have been idle before it is taken from its (presumably dead) consumer
    claim_idle_s: float = 120.0
    #: deliveries after which an entry is dead-lettered instead of tried again
    max_deliveries: int = 5
    #: entries held at once (in the pool or waiting for it); default: twice the pool's workers
    prefetch: int | None = None
    #: the longest a read waits for new entries
    block_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.claim_idle_s > 0 or not self.block_s > 0:
            raise ConfigurationError("claim_idle_s and block_s must be positive")
        if self.max_deliveries < 1:
            raise ConfigurationError(f"max_deliveries must be at least 1, got {self.max_deliveries}")


@dataclass(frozen=True, slots=True)
class _Entry:
    id: str
    fields: dict[bytes, bytes]
    deliveries: int

    @property
    def custom_id(self) -> str:
        return self.fields.get(b"custom_id", b"").decode("utf-8", "replace") or f"entry-{self.id}"


class Worker:
    """Consumes a run's stream through the consumer group, running each request through a pool.

    Args:
        client: a Redis client (:func:`connect`).
        pool: a running pool, normally with its limits in a :class:`~scheduler.admission.redis_store.RedisStore`.
        stream: the run's name.
        options: see :class:`WorkerOptions`.
        consumer: this worker's name in the group (default: host, pid and a random suffix).
    """

    def __init__(
        self, client: redis.asyncio.Redis, pool: Pool, *, stream: str = "scheduler",
        options: WorkerOptions | None = None, consumer: str | None = None,
    ) -> None:
        self.keys = StreamKeys.of(stream)
        self.options = options or WorkerOptions()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._redis = client
        self._pool = pool
        self._store = client.register_script(_STORE)
        self._dead = client.register_script(_DEAD_LETTER)
        self._heartbeat_script = client.register_script(_HEARTBEAT)
        self._held: dict[str, _Entry] = {}
        self._room = asyncio.Event()
        self._stopping: str | None = None
        self._code = 0
        self._claim_from = "0-0"
        #: seconds the worker rides out a Redis outage before it gives up
        self.outage_grace_s = 30.0
        #: results stored by this worker
        self.done = 0
        #: of which errors
        self.failed = 0
        self.dead_lettered = 0
        #: entries taken over from other consumers
        self.claimed = 0
        #: entries whose result another worker had already stored
        self.skipped = 0
        #: entries this worker could not process (left for redelivery)
        self.errors = 0

    def __repr__(self) -> str:
        return (f"<Worker {self.consumer} stream={self.keys.name} held={len(self._held)} done={self.done} "
                f"failed={self.failed} dead={self.dead_lettered} claimed={self.claimed} errors={self.errors}>")

    def stop(self, reason: str = "stopped") -> None:
        """Stop taking entries; those held finish (or, if the pool stops, stay pending for another worker)."""
        if self._stopping is None:
            self._stopping = reason
            log.warning("worker_stopping", consumer=self.consumer, reason=reason)
            self._room.set()

    async def run(self) -> int:
        """Consume until stopped (or, with ``burst``, until the stream is drained).

        Returns:
            0, or 3 if a run-fatal error (quota, a refused key) stopped the pool: its entries stay pending.
        """
        options = self.options
        limit = options.prefetch or 2 * self._pool.workers
        claim_every = max(0.05, min(options.claim_idle_s / 2, 30.0))
        await _ensure_group(self._redis, self.keys)
        log.info("worker_started", consumer=self.consumer, stream=self.keys.name)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._heartbeat)
            next_claim = 0.0  # at once: a restarted host picks up what its predecessor left
            down_since: float | None = None
            while self._stopping is None:
                room = limit - len(self._held)
                if room <= 0:
                    self._room.clear()
                    with anyio.move_on_after(claim_every):
                        await self._room.wait()
                    continue
                entries: list[_Entry] = []
                now = anyio.current_time()
                try:
                    if now >= next_claim:
                        entries = await self._claim(room)
                        next_claim = now + claim_every
                    if not entries:
                        entries = await self._read(room, min(options.block_s, claim_every))
                    drained = (options.burst and not entries and not self._held
                               and await self._redis.xlen(self.keys.jobs) == 0)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    # Ride out a short outage (a restart, a failover); past the grace, give up clearly.
                    down_since = now if down_since is None else down_since
                    if now - down_since > self.outage_grace_s:
                        raise StreamUnavailable(f"lost Redis for {now - down_since:.0f} s: {exc}") from exc
                    log.warning("stream_unavailable", consumer=self.consumer, error=str(exc))
                    await anyio.sleep(1.0)
                    continue
                down_since = None
                for entry in entries:
                    self._held[entry.id] = entry
                    tasks.start_soon(self._handle, entry)
                if drained:
                    break
            while self._held:
                self._room.clear()
                await self._room.wait()
            tasks.cancel_scope.cancel()
        await self._leave()
        log.info("worker_finished", consumer=self.consumer, done=self.done, failed=self.failed,
                 dead_lettered=self.dead_lettered, claimed=self.claimed, errors=self.errors)
        return self._code

    async def _read(self, count: int, block_s: float) -> list[_Entry]:
        reply: Any = await self._redis.xreadgroup(
            GROUP, self.consumer, {self.keys.jobs: ">"}, count=count, block=max(1, round(block_s * 1000))
        )
        return [_Entry(_text(entry_id), fields, 1) for _, entries in reply or () for entry_id, fields in entries]

    async def _claim(self, count: int) -> list[_Entry]:
        """Take over entries idle for longer than ``claim_idle_s`` (their worker died), whoever held them."""
        reply = await self._redis.xautoclaim(
            self.keys.jobs, GROUP, self.consumer, min_idle_time=round(self.options.claim_idle_s * 1000),
            start_id=self._claim_from, count=count,
        )
        # XAUTOCLAIM scans a bounded stretch of the pending list per call: go on from where it stopped.
        self._claim_from = _text(reply[0])
        claimed = [(_text(entry_id), fields) for entry_id, fields in reply[1] if fields]
        entries = []
        for entry_id, fields in claimed:
            pending = await self._redis.xpending_range(
                self.keys.jobs, GROUP, min=entry_id, max=entry_id, count=1, consumername=self.consumer
            )
            deliveries = int(pending[0]["times_delivered"]) if pending else self.options.max_deliveries + 1
            entries.append(_Entry(entry_id, fields, deliveries))
        if entries:
            self.claimed += len(entries)
            log.warning("entries_claimed", consumer=self.consumer, count=len(entries),
                        idle_s=self.options.claim_idle_s)
        return entries

    async def _heartbeat(self) -> None:
        every = max(0.05, self.options.claim_idle_s / 4)
        while True:
            await anyio.sleep(every)
            if self._held:
                try:
                    await self._heartbeat_script(keys=[self.keys.jobs], args=[GROUP, self.consumer, *self._held])
                except redis.exceptions.RedisError as exc:
                    log.warning("heartbeat_failed", consumer=self.consumer, error=str(exc))

    async def _handle(self, entry: _Entry) -> None:
        custom_id = entry.custom_id
        try:
            if entry.deliveries > self.options.max_deliveries:
                await self._dead_letter(entry)
                return
            if await self._redis.hexists(self.keys.results, custom_id):
                # A worker stored the result and died before acknowledging: no second API call.
                await self._store(keys=self._store_keys(), args=[custom_id, b"", entry.id, GROUP, "0"])
                self.skipped += 1
                return
            endpoint, body, priority, metadata = _decode(entry.fields)
            result = await self._pool.submit(
                body, endpoint=endpoint, priority=priority, custom_id=custom_id, raise_errors=False
            )
            if result.error is not None and result.error.code in STOPPED_CODES:
                # Not run (or not fully): the entry stays pending for a later worker.
                self._code = 3
                self.stop(f"{result.error.code}: {result.error.message}")
                return
            line = batch_line(result)
            if metadata is not None:
                line["scheduler"]["metadata"] = metadata
            failed = result.error is not None
            stored = await self._store(keys=self._store_keys(),
                                       args=[custom_id, orjson.dumps(line), entry.id, GROUP, "1" if failed else "0"])
            if stored:
                self.done += 1
                self.failed += failed
            else:
                self.skipped += 1
        except Exception as exc:
            # Left pending: it is delivered again once idle, and dead-lettered if it keeps failing.
            self.errors += 1
            log.error("entry_failed", consumer=self.consumer, entry=entry.id, custom_id=custom_id,
                      delivery=entry.deliveries, error=redact(f"{type(exc).__name__}: {exc}"))
        finally:
            del self._held[entry.id]
            self._room.set()

    def _store_keys(self) -> list[str]:
        return [self.keys.results, self.keys.jobs, self.keys.stats]

    async def _dead_letter(self, entry: _Entry) -> None:
        options = self.options
        message = (f"delivered {entry.deliveries} times without a result (more than {options.max_deliveries}); "
                   f"moved to the dead-letter stream {self.keys.dead}")
        endpoint = entry.fields.get(b"endpoint", b"").decode("utf-8", "replace")
        result = Result(custom_id=entry.custom_id, endpoint=endpoint, status=None, body=None, attempts=0,
                        error=ErrorInfo(DEAD_LETTERED, message))
        extra: list[bytes | str] = ["entry", entry.id, "deliveries", str(entry.deliveries)]
        for name, value in entry.fields.items():
            extra += [name, value]
        await self._dead(keys=[self.keys.results, self.keys.jobs, self.keys.stats, self.keys.dead],
                         args=[entry.custom_id, orjson.dumps(batch_line(result)), entry.id, GROUP, *extra])
        self.dead_lettered += 1
        self.failed += 1
        log.error("entry_dead_lettered", consumer=self.consumer, entry=entry.id, custom_id=entry.custom_id,
                  deliveries=entry.deliveries)

    async def _leave(self) -> None:
        """Leave the group's consumer list, unless entries are still pending on this consumer."""
        try:
            pending = await self._redis.xpending_range(
                self.keys.jobs, GROUP, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await self._redis.xgroup_delconsumer(self.keys.jobs, GROUP, self.consumer)
        except redis.exceptions.RedisError as exc:
            log.warning("worker_leave_failed", consumer=self.consumer, error=str(exc))


def _decode(fields: dict[bytes, bytes]) -> tuple[str, dict[str, Any], int, Any]:
    """An entry's endpoint, body, priority and metadata. Raises ValueError for an entry that is not a request."""
    body = orjson.loads(fields.get(b"body", b""))
    if not isinstance(body, dict):
        raise ValueError("the entry's body is not a JSON object")
    endpoint = fields.get(b"endpoint", b"").decode() or CHAT
    priority = int(fields.get(b"priority", b"0") or 0)
    raw_metadata = fields.get(b"metadata", b"")
    return endpoint, body, priority, orjson.loads(raw_metadata) if raw_metadata else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def run_worker(
    url: str, *, stream: str, base_url: str | None, api_key: str, model: str, limits: Limits,
    workers: int = 64, max_attempts: int = 6, options: WorkerOptions | None = None,
) -> int:
    """Connect to Redis and the API, and run a :class:`Worker` whose pool shares ``limits`` through Redis.

    Returns the worker's exit code (see :meth:`Worker.run`); SIGINT/SIGTERM stop it gracefully.

    Raises:
        StreamUnavailable, SharedLimitUnavailable: Redis cannot be reached.
    """
    from openai import AsyncOpenAI, DefaultAioHttpClient

    from .admission import Limiter
    from .admission.redis_store import RedisStore

    client = await connect(url)
    api = AsyncOpenAI(api_key=api_key, base_url=base_url, http_client=DefaultAioHttpClient())
    try:
        limiter = Limiter(limits, store=await RedisStore.connect(url))
        # The pool closes the limiter's connections with it.
        async with Pool(client=api, model=model, workers=workers, max_attempts=max_attempts,
                        limiter=limiter) as pool:
            worker = Worker(client, pool, stream=stream, options=options)
            _on_signals(worker)
            code = await worker.run()
            if code == 3:
                pool.stop("a run-fatal error stopped the worker")
            return code
    finally:
        await api.close()
        await client.aclose()


def _on_signals(worker: Worker) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, worker.stop, signal.Signals(signum).name)
        except (NotImplementedError, RuntimeError):  # not on Windows, not off the main thread
            return
