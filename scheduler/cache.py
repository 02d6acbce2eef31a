"""The response cache: deterministic requests answered once, then served from a store.

A request is cacheable when its answer is a function of the request: ``temperature`` 0, an embeddings request,
or marked so by the caller (``submit(..., cache=True)``, ``Request(cacheable=True)``). Its key is a SHA-256 of
the API's base URL, the endpoint and the whole body, serialized with sorted keys, so two spellings of the same
body share a key and nothing that changes the answer is left out. Only successful answers are stored.

Backends implement :class:`CacheBackend` (bytes in, bytes out):

- :class:`MemoryCache`: a bounded LRU in the process;
- :class:`SqliteCache`: a file, for CLI reruns (stdlib ``sqlite3``);
- :class:`RedisCache`: shared by every process that uses the same Redis (``redis.asyncio``), with a TTL.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import orjson

if TYPE_CHECKING:
    import sqlite3

    from redis.asyncio import Redis

__all__ = [
    "CacheBackend",
    "CachedResponse",
    "MemoryCache",
    "RedisCache",
    "SqliteCache",
    "cache_key",
    "is_deterministic",
    "open_cache",
]


class CacheBackend(Protocol):
    """Where cached responses live. ``get`` returns None for a missing key."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored answer: the response body, the model that gave it, and what it cost then."""

    body: Any
    model: str | None = None
    request_id: str | None = None
    #: what the original call cost: what each hit saves
    cost_usd: float | None = None

    def dumps(self) -> bytes:
        return orjson.dumps(
            {"body": self.body, "model": self.model, "request_id": self.request_id, "cost_usd": self.cost_usd}
        )

    @classmethod
    def loads(cls, raw: bytes) -> CachedResponse | None:
        """The entry, or None when ``raw`` is not one (a corrupt or foreign value counts as a miss)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or "body" not in data:
            return None
        model, request_id, cost = data.get("model"), data.get("request_id"), data.get("cost_usd")
        return cls(
            data["body"],
            model if isinstance(model, str) else None,
            request_id if isinstance(request_id, str) else None,
            float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None,
        )


def is_deterministic(endpoint: str, body: Mapping[str, Any]) -> bool:
    """Whether the answer is a function of the request: temperature 0, or an embeddings request."""
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0:
        return True
    return endpoint.endswith("embeddings")


def cache_key(scope: str, endpoint: str, body: Mapping[str, Any]) -> str | None:
    """The key of a request: a hash of ``scope`` (the base URL), the endpoint and the canonical body.
    None when the body is not plain JSON (it cannot be canonicalised, so it is not cached)."""
    try:
        canonical = orjson.dumps([scope, endpoint, body], option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    return hashlib.sha256(canonical).hexdigest()


class MemoryCache:
    """An in-process LRU holding at most ``max_entries`` responses."""

    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def aclose(self) -> None:
        return None


class SqliteCache:
    """Responses in an SQLite file (WAL mode), so a rerun of the same input is answered from disk.

    Writes run in a worker thread, one at a time: a commit can wait on the disk (a WAL checkpoint syncs it).
    Reads run on the event loop: a primary-key lookup is a few page reads, which in WAL mode never wait for
    the writer, and a thread hop would cost more than the read (it decides how fast a cached rerun goes).
    """

    __slots__ = ("_lock", "_reader", "_writer", "_writes", "path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._lock = anyio.Lock()
        self._writes = anyio.CapacityLimiter(1)

    def _open(self) -> None:
        import sqlite3

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the writer is used by whichever worker thread runs the write (one at a time),
        # the reader on the event loop's thread after being opened here.
        writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA synchronous=NORMAL")
        writer.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self._writer = writer
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

    async def _ready(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        if self._reader is None:
            async with self._lock:
                if self._reader is None:
                    await anyio.to_thread.run_sync(self._open)
        assert self._reader is not None and self._writer is not None
        return self._reader, self._writer

    async def get(self, key: str) -> bytes | None:
        reader, _ = await self._ready()
        row = reader.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row is not None else None

    async def set(self, key: str, value: bytes) -> None:
        _, writer = await self._ready()
        await anyio.to_thread.run_sync(
            writer.execute, "INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", (key, value),
            limiter=self._writes,
        )

    async def aclose(self) -> None:
        reader, writer, self._reader, self._writer = self._reader, self._writer, None, None
        if reader is not None:
            reader.close()
        if writer is not None:
            await anyio.to_thread.run_sync(writer.close, limiter=self._writes)


class RedisCache:
    """Responses in Redis under ``prefix``, expiring after ``ttl_s`` (None: never), shared across processes.

    Args:
        url: a Redis URL (ignored when ``client`` is given).
        prefix: prepended to every key.
        ttl_s: seconds an entry lives.
        client: a ``redis.asyncio.Redis`` to use instead of connecting to ``url`` (not closed by ``aclose``).
    """

    __slots__ = ("_client", "_owned", "prefix", "ttl_s")

    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "scheduler:cache:", ttl_s: float | None = None,
        client: Redis | None = None,
    ) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {ttl_s}")
        if client is None:
            from redis.asyncio import Redis

            client = Redis.from_url(url)
            self._owned = True
        else:
            self._owned = False
        self._client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    async def get(self, key: str) -> bytes | None:
        value: bytes | str | None = await self._client.get(self.prefix + key)
        return value.encode() if isinstance(value, str) else value  # str only from a client decoding responses

    async def set(self, key: str, value: bytes) -> None:
        ttl_ms = max(1, round(self.ttl_s * 1000)) if self.ttl_s is not None else None
        await self._client.set(self.prefix + key, value, px=ttl_ms)

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()


def open_cache(spec: str | os.PathLike[str]) -> CacheBackend:
    """A backend from a CLI-style spec: a ``redis://``, ``rediss://`` or ``unix://`` URL, else an SQLite path."""
    text = os.fspath(spec)
    if text.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache(text)
    return SqliteCache(text)
