"""One RPM/TPM budget shared by every process and host: the buckets of :mod:`scheduler.limits`, kept in Redis.

An organisation's rate limit is one budget however many processes spend it. :class:`RedisLimiter` implements the
:class:`~scheduler.limits.Limiter` seam with the same semantics as :class:`~scheduler.limits.LocalLimiter`, but
the bucket levels, the cumulative charged/sent counters the header sync needs, the burst factor and a waiter
reservation live in one Redis hash per limit. Admission (both buckets, all or nothing), putting a request on the
wire, header synchronisation, refunds and 429s are each one Lua script, atomic, on Redis' own clock
(``redis.call('TIME')``), so hosts with skewed clocks share one timeline. Scripts run through redis-py's
``Script`` objects, which reload a script the server forgot (a restart, ``SCRIPT FLUSH``) instead of surfacing
NOSCRIPT.

Keys: ``{sched:<hash of the scope>}:bucket`` (a hash) and ``...:reserve``. The hash tag puts both in one slot, so
the scripts also run on Redis Cluster; the scope (base URL, key fingerprint, model) is hashed, and never holds the
key itself. Keys expire after ``2 x burst + 60`` seconds unused: longer than a full refill, so an expired bucket
is a full one.

What stays in each process: the token-ratio calibration (learned from the shared counters, so every process
learns the same ratio) and the outage bookkeeping. If Redis cannot be reached, :meth:`RedisLimiter.connect`
raises :class:`SharedLimitUnavailable`; later, admission waits through an outage of up to ``outage_grace_s`` and
then raises it. It never falls back to a local budget: N processes each spending the whole limit is the failure
this module exists to prevent.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .clock import Clock, LoopClock
from .errors import ConfigurationError
from .limits import Limits, parse_limit_headers

__all__ = ["RedisLimiter", "SharedLevels", "SharedLimitUnavailable", "limit_keys", "safe_url"]

log = structlog.get_logger("scheduler")

# The bucket state every script starts from. KEYS[1] is the bucket hash; ARGV[1..6] the caller's configuration:
# rpm and tpm (0: not limited), burst_s, key expiry in ms, the buckets' initial fill, and the share of the burst
# kept free for jitter; the script's own arguments follow from ARGV[7].
_PRELUDE = """
local key = KEYS[1]
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local fill = tonumber(ARGV[5])
local keep = tonumber(ARGV[6])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local f = redis.call('HMGET', key, 'rl', 'tl', 'ts', 'bf', 'lr', 'lt')
local bf = tonumber(f[4]) or 1
-- A limit the server reported lower than configured wins, for every process.
local lr = tonumber(f[5])
if lr and rpm > 0 and lr < rpm then rpm = lr end
local lt = tonumber(f[6])
if lt and tpm > 0 and lt < tpm then tpm = lt end
local rrate, trate, rcap, tcap
local function caps()
  rrate = rpm / 60
  trate = tpm / 60
  rcap = math.max(1, rrate * burst * bf * (1 - keep))
  tcap = math.max(1, trate * burst * bf * (1 - keep))
end
caps()
local rl = tonumber(f[1])
local tl = tonumber(f[2])
local ts = tonumber(f[3])
if ts == nil then
  -- A new (or expired) limit starts part full (see RedisLimiter.initial_fill), with at least one request.
  rl = math.max(math.min(1, rcap), rcap * fill)
  tl = tcap * fill
  ts = now
end
-- Never move the timestamp backwards: after a failover the new server's clock may lag the old one's.
if now > ts then
  rl = rl + (now - ts) * rrate
  tl = tl + (now - ts) * trate
  ts = now
end
rl = math.min(rcap, rl)
tl = math.min(tcap, tl)
local function num(x)
  return string.format('%.17g', x)
end
local function save()
  redis.call('HSET', key, 'rl', num(rl), 'tl', num(tl), 'ts', num(ts), 'bf', num(bf))
  redis.call('PEXPIRE', key, ttl)
end
"""

# ARGV[7] tokens, ARGV[8] owner, ARGV[9] "1" to reserve if refused, ARGV[10] reservation grace in ms.
# Returns {wait seconds as a string, "1" if the caller holds the reservation}.
_ACQUIRE = _PRELUDE + """
local cost = tonumber(ARGV[7])
local owner = ARGV[8]
local needr = 0
local needt = 0
if rpm > 0 then needr = math.min(1, rcap) end
if tpm > 0 then needt = math.min(cost, tcap) end
-- Another process's reservation: leave it room, so its large request is not starved by small ones.
local res = redis.call('HMGET', KEYS[2], 'owner', 'r', 't')
local heldr = 0
local heldt = 0
local other = res[1] and res[1] ~= owner
if other then
  heldr = tonumber(res[2]) or 0
  heldt = tonumber(res[3]) or 0
end
local function wait_for(hr, ht)
  local w = 0
  if rpm > 0 and rl < needr + hr - 1e-9 then w = math.max(w, (needr + hr - rl) / rrate) end
  if tpm > 0 and tl < needt + ht - 1e-9 then w = math.max(w, (needt + ht - tl) / trate) end
  return w
end
local wait = wait_for(heldr, heldt)
if wait > 0 then
  local mine = '0'
  if ARGV[9] == '1' and not other then
    local own = wait_for(0, 0)
    redis.call('HSET', KEYS[2], 'owner', owner, 'r', num(needr), 't', num(needt))
    redis.call('PEXPIRE', KEYS[2], math.ceil(own * 1000 + tonumber(ARGV[10])))
    mine = '1'
  end
  save()
  return {num(wait), mine}
end
if rpm > 0 then rl = rl - 1 end
if tpm > 0 then tl = tl - cost end
redis.call('HINCRBYFLOAT', key, 'cr', 1)
redis.call('HINCRBYFLOAT', key, 'ct', cost)
if res[1] == owner then redis.call('DEL', KEYS[2]) end
save()
return {'0', '0'}
"""

# ARGV[7] tokens. Returns the cumulative (requests, tokens) sent, this one included.
_WIRE = """
local r = redis.call('HINCRBYFLOAT', KEYS[1], 'sr', 1)
local t = redis.call('HINCRBYFLOAT', KEYS[1], 'st', ARGV[7])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return {r, t}
"""

# ARGV[7..10] limit and remaining of requests, then of tokens ("" where absent), ARGV[11] seconds since the
# request went on the wire, ARGV[12..13] its sent mark, ARGV[14] the safety share.
_SYNC = _PRELUDE + """
local c = redis.call('HMGET', key, 'cr', 'ct')
local elapsed = tonumber(ARGV[11])
local safety = tonumber(ARGV[14])
local function most(limit, remaining, charged, mark, cap)
  -- The server's level when the request arrived, plus its refill since, less what every process charged
  -- since that request went on the wire (the server had not counted those yet), less a safety share.
  return remaining + elapsed * limit / 60 - (charged - mark) - cap * safety
end
local limr = tonumber(ARGV[7])
local remr = tonumber(ARGV[8])
if rpm > 0 and limr and remr then
  if limr < rpm * 0.999 then
    redis.call('HSET', key, 'lr', num(limr))
    rpm = limr
    caps()
    rl = math.min(rl, rcap)
    tl = math.min(tl, tcap)
  end
  rl = math.min(rl, most(limr, remr, tonumber(c[1]) or 0, tonumber(ARGV[12]), rcap))
end
local limt = tonumber(ARGV[9])
local remt = tonumber(ARGV[10])
if tpm > 0 and limt and remt then
  if limt < tpm * 0.999 then
    redis.call('HSET', key, 'lt', num(limt))
    tpm = limt
    caps()
    rl = math.min(rl, rcap)
    tl = math.min(tl, tcap)
  end
  tl = math.min(tl, most(limt, remt, tonumber(c[2]) or 0, tonumber(ARGV[13]), tcap))
end
-- Every answer widens a burst that 429s narrowed, back to the whole burst.
if bf < 1 then bf = math.min(1, bf + 0.01) end
save()
return {num(rl), num(tl)}
"""

# ARGV[7] tokens to give back.
_REFUND = _PRELUDE + """
local amount = tonumber(ARGV[7])
if tpm > 0 then tl = math.min(tcap, tl + amount) end
redis.call('HINCRBYFLOAT', key, 'ct', -amount)
redis.call('HINCRBYFLOAT', key, 'st', -amount)
save()
return num(tl)
"""

# ARGV[7] the empty bucket ("requests", "tokens", "" for both), ARGV[8] the refused request's tokens.
_RATE_LIMITED = _PRELUDE + """
local kind = ARGV[7]
local amount = tonumber(ARGV[8])
-- The server charged nothing for a refused request: keep the shared counts in step with its.
redis.call('HINCRBYFLOAT', key, 'cr', -1)
redis.call('HINCRBYFLOAT', key, 'ct', -amount)
redis.call('HINCRBYFLOAT', key, 'sr', -1)
redis.call('HINCRBYFLOAT', key, 'st', -amount)
bf = math.max(0.25, bf * 0.5)
caps()
-- The refused request's charge is not owed (a large one left the bucket in debt).
rl = math.min(rcap, rl + 1)
tl = math.min(tcap, tl + amount)
if kind == '' or kind == 'requests' then rl = math.min(rl, 0) end
if kind == '' or kind == 'tokens' then tl = math.min(tl, 0) end
save()
return {num(rl), num(tl)}
"""

# The levels now, without changing anything.
_PEEK = _PRELUDE + """
local c = redis.call('HMGET', key, 'cr', 'ct', 'sr', 'st')
local res = redis.call('HGET', KEYS[2], 'owner') or ''
return {num(rl), num(tl), num(bf), c[1] or '0', c[2] or '0', c[3] or '0', c[4] or '0', res}
"""


class SharedLimitUnavailable(ConfigurationError):
    """Raised when the Redis holding a shared limit cannot be reached: the budget cannot be shared, and no
    request is admitted without it."""


@dataclass(frozen=True, slots=True)
class SharedLevels:
    """What a shared limit holds right now (see :meth:`RedisLimiter.levels`)."""

    requests: float
    tokens: float
    burst_factor: float
    charged_requests: float
    charged_tokens: float
    sent_requests: float
    sent_tokens: float
    #: the owner id of the current waiter reservation ("" when none)
    reserved_by: str


def limit_keys(scope: str) -> tuple[str, str]:
    """The Redis keys of the limit named by ``scope``: the bucket hash and the reservation, in one hash slot."""
    tag = hashlib.sha256(scope.encode()).hexdigest()[:24]
    return f"{{sched:{tag}}}:bucket", f"{{sched:{tag}}}:reserve"


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


class RedisLimiter:
    """RPM and TPM buckets shared through Redis, for every process that uses the same ``scope``.

    Processes sharing a scope should configure the same :class:`~scheduler.Limits`; a lower limit reported by
    the server's headers is stored in Redis and applies to all of them.

    Args:
        client: a ``redis.asyncio.Redis`` (see :meth:`connect`, which makes one from a URL and checks it).
        limits: the limits to stay under.
        scope: what one budget is (base URL, key fingerprint, model); hashed into the key names.
        url: the Redis URL, for messages (its password is masked).
        clock: local time for waits and outages (the buckets use Redis' clock).
        jitter_reserve: share of the burst the shared bucket never holds. Requests admitted by several processes
            (hosts, event loops) leave for the server in a slightly different order and timing than they were
            admitted in; the server's bucket keeps this much room for that, which costs only a smaller first
            burst (the rate is unchanged). 0.25 of a one-second burst absorbs 250 ms of jitter.
        reserve_after_s: a process refused this long for its head request reserves the room it needs, which
            other processes' admissions then leave free.
        outage_grace_s: how long admission waits through a Redis outage before raising.
    """

    __slots__ = (
        "_anchor",
        "_clock",
        "_down_since",
        "_first",
        "_keys",
        "_marks",
        "_redis",
        "_refused_since",
        "_scripts",
        "_sent_tokens",
        "_wired",
        "jitter_reserve",
        "limits",
        "outage_grace_s",
        "owner",
        "ratio",
        "reserve_after_s",
        "url",
    )

    #: seconds between two calibration points (as in LocalLimiter)
    calibration_window_s = 0.5
    #: share of the buckets available when a limit is first used. Its first burst is the riskiest moment: every
    #: process starts at once (connections to open, an SDK and a tokenizer to set up), so requests admitted
    #: together leave over hundreds of ms, while the server's bucket, full and idle, banks no refill; and until
    #: calibration the server may count more tokens than we estimate.
    initial_fill = 0.5
    #: the wait acquire() returns while Redis is unreachable
    outage_retry_s = 0.5
    #: how long a reservation outlives its holder's expected wait (it is renewed at every refused attempt)
    reservation_grace_s = 1.0

    def __init__(
        self, client: redis.asyncio.Redis, limits: Limits, *, scope: str, url: str = "redis://",
        clock: Clock | None = None, jitter_reserve: float = 0.25, reserve_after_s: float = 1.0,
        outage_grace_s: float = 30.0,
    ) -> None:
        if not 0 <= jitter_reserve < 1:
            raise ConfigurationError(f"jitter_reserve must be in [0, 1), got {jitter_reserve!r}")
        if limits.rpm is None and limits.tpm is None:
            raise ConfigurationError("a shared limit needs rpm or tpm")
        self._redis = client
        #: the limits in force
        self.limits = limits
        #: the Redis URL, password masked
        self.url = safe_url(url)
        #: this limiter's id in reservations
        self.owner = uuid.uuid4().hex
        #: server tokens per token of our estimate, learned from the headers (local to this process)
        self.ratio = 1.0
        self.jitter_reserve = jitter_reserve
        self.reserve_after_s = reserve_after_s
        self.outage_grace_s = outage_grace_s
        self._clock: Clock = clock or LoopClock()
        self._keys = limit_keys(scope)
        self._scripts = {
            name: client.register_script(text)
            for name, text in (("acquire", _ACQUIRE), ("wire", _WIRE), ("sync", _SYNC), ("refund", _REFUND),
                               ("rate_limited", _RATE_LIMITED), ("peek", _PEEK))
        }
        # Requests on the wire whose shared sent mark is still being recorded, by local sequence number.
        self._marks: dict[int, asyncio.Task[tuple[float, float] | None]] = {}
        self._wired = 0
        self._sent_tokens = 0.0
        self._refused_since: float | None = None
        self._down_since: float | None = None
        self._anchor: tuple[float, float, float] | None = None  # (sent_at, deficit, global sent tokens)
        self._first: tuple[float, float] | None = None  # our first send: (sent_at, global sent tokens before it)

    @classmethod
    async def connect(
        cls, url: str, limits: Limits, *, scope: str, clock: Clock | None = None, **options: Any
    ) -> RedisLimiter:
        """Connect to the Redis at ``url`` and check that it answers.

        Raises:
            SharedLimitUnavailable: Redis cannot be reached (or refuses the credentials).
            ConfigurationError: the URL is not a Redis URL.
        """
        try:
            client = redis.asyncio.Redis.from_url(
                url, socket_connect_timeout=5.0, socket_timeout=5.0,
                # Few, quick retries: a longer outage is handled (and reported) by the limiter itself.
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
            )
        except ValueError as exc:
            raise ConfigurationError(f"not a Redis URL: {safe_url(url)} ({exc})") from exc
        try:
            await client.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            await client.aclose()
            raise SharedLimitUnavailable(_unavailable(safe_url(url), exc)) from exc
        return cls(client, limits, scope=scope, url=url, clock=clock, **options)

    async def aclose(self) -> None:
        """Close the connections to Redis."""
        for task in self._marks.values():
            task.cancel()
        self._marks.clear()
        await self._redis.aclose()

    async def __aenter__(self) -> RedisLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ the Limiter protocol

    def scale(self, estimate: int) -> int:
        return math.ceil(estimate * self.ratio) if self.ratio != 1.0 else estimate

    async def acquire(self, tokens: int) -> float:
        now = self._clock.now()
        reserve = self._refused_since is not None and now - self._refused_since >= self.reserve_after_s
        reply = await self._run("acquire", tokens, self.owner, "1" if reserve else "0",
                                round(self.reservation_grace_s * 1000))
        if reply is None:
            return self.outage_retry_s
        wait = float(reply[0])
        if wait > 0.0:
            if self._refused_since is None:
                self._refused_since = now
            return wait
        self._refused_since = None
        return 0.0

    def on_wire(self, tokens: int) -> tuple[float, float]:
        """Record the send in Redis (in the background: this is called on the request's hot path) and return
        this process's cumulative (requests, tokens) sent; the first number also names the request in
        :meth:`observe`, which waits for the shared mark."""
        self._wired += 1
        self._sent_tokens += tokens
        task = asyncio.get_running_loop().create_task(self._wire(tokens, self._clock.now()))
        # A mark nobody waits for (a cancelled request) must not log "exception never retrieved".
        task.add_done_callback(_retrieve)
        self._marks[self._wired] = task
        return (float(self._wired), self._sent_tokens)

    async def observe(self, headers: Mapping[str, str] | None, sent_at: float, mark: tuple[float, float]) -> None:
        task = self._marks.pop(int(mark[0]), None)
        shared = await task if task is not None else None
        if not headers or shared is None:
            return
        seen = parse_limit_headers(headers)
        elapsed = max(0.0, self._clock.now() - sent_at)
        reply = await self._run(
            "sync", _arg(seen.limit_requests), _arg(seen.remaining_requests), _arg(seen.limit_tokens),
            _arg(seen.remaining_tokens), elapsed, shared[0], shared[1], self.limits.safety,
        )
        if reply is not None and seen.limit_tokens and seen.remaining_tokens is not None:
            self._calibrate(seen.limit_tokens, seen.remaining_tokens, sent_at, shared[1])

    async def refund(self, tokens: int) -> None:
        if tokens > 0:
            self._sent_tokens -= tokens
            await self._run("refund", tokens)

    async def rate_limited(self, kind: str | None, tokens: int) -> None:
        self._sent_tokens -= tokens
        await self._run("rate_limited", kind if kind in ("requests", "tokens") else "", tokens)

    def snapshot(self) -> Limits | None:
        return self.limits

    # ------------------------------------------------------------------ more

    async def levels(self) -> SharedLevels:
        """The shared levels and counters now (refilled to Redis' clock, nothing changed).

        Raises:
            SharedLimitUnavailable: Redis cannot be reached.
        """
        try:
            reply = await self._scripts["peek"](keys=self._keys, args=self._args())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise SharedLimitUnavailable(_unavailable(self.url, exc)) from exc
        rl, tl, bf, cr, ct, sr, st = (float(x) for x in reply[:7])
        owner = reply[7].decode() if isinstance(reply[7], bytes) else str(reply[7])
        return SharedLevels(rl, tl, bf, cr, ct, sr, st, owner)

    def _args(self, *extra: object) -> list[str | int | float]:
        limits = self.limits
        ttl_ms = round((2 * limits.burst_s + 60.0) * 1000)
        head: list[str | int | float] = [limits.rpm or 0, limits.tpm or 0, limits.burst_s, ttl_ms,
                                         self.initial_fill, self.jitter_reserve]
        return head + [x if isinstance(x, int | float) else str(x) for x in extra]

    async def _run(self, name: str, *extra: object) -> Any:
        """Run a script; None during a Redis outage shorter than ``outage_grace_s`` (logged once)."""
        try:
            reply = await self._scripts[name](keys=self._keys, args=self._args(*extra))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            now = self._clock.now()
            if self._down_since is None:
                self._down_since = now
                log.warning("shared_limit_unavailable", redis=self.url, error=str(exc),
                            detail="admission waits for Redis: the budget cannot be shared without it")
            if now - self._down_since >= self.outage_grace_s:
                raise SharedLimitUnavailable(_unavailable(self.url, exc)) from exc
            return None
        if self._down_since is not None:
            log.info("shared_limit_restored", redis=self.url, down_s=round(self._clock.now() - self._down_since, 3))
            self._down_since = None
        return reply

    async def _wire(self, tokens: int, sent_at: float) -> tuple[float, float] | None:
        reply = await self._run("wire", tokens)
        if reply is None:
            return None
        shared = (float(reply[0]), float(reply[1]))
        if self._first is None:
            self._first = (sent_at, shared[1] - tokens)
        return shared

    def _calibrate(self, limit: float, remaining: float, sent_at: float, sent_tokens: float) -> None:
        """As :meth:`LocalLimiter._calibrate`, on the shared sent counter: the server's consumption between two
        answers over what every process sent in between."""
        deficit = limit - remaining
        anchor = self._anchor
        first = self._first
        # Measure from our first send only if nothing had been sent on this limit before it (the server's
        # bucket then was full); otherwise from our first answer.
        from_first = anchor is None and first is not None and first[1] <= 0.0
        if from_first:
            assert first is not None
            anchor = (first[0], 0.0, first[1])
        if anchor is None or deficit <= 0:
            self._anchor = (sent_at, deficit, sent_tokens)
            return
        span = sent_at - anchor[0]
        if span < self.calibration_window_s and not from_first:
            return
        ours = sent_tokens - anchor[2]
        refill = span * limit / 60.0
        theirs = deficit - anchor[1] + refill
        self._anchor = (sent_at, deficit, sent_tokens)
        if ours <= 0 or theirs <= 0 or deficit < refill:
            # A deficit smaller than the span's refill: the server's bucket may have been full in between, when
            # its refill is lost, and "theirs" would count it as consumption (the ratio would climb to its cap
            # whenever the token limit is far from binding).
            return
        step = min(1.5, max(0.67, theirs / ours))
        self.ratio = min(4.0, max(0.25, self.ratio * step))

    def __repr__(self) -> str:
        limits = self.limits
        return f"<RedisLimiter {self.url} rpm={limits.rpm} tpm={limits.tpm} ratio={self.ratio:.3f}>"


def _arg(value: float | None) -> str | float:
    return "" if value is None else value


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _unavailable(url: str, exc: BaseException) -> str:
    return (f"cannot reach Redis at {url} ({exc}): the rate-limit budget cannot be shared, and no request is "
            "sent without it. Start Redis or fix --redis; without it, give each process its own share of the "
            "limits.")
