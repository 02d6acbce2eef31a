"""Rate-limit arithmetic that takes `now` explicitly, so tests can drive it.

Token buckets (OpenAI, Anthropic: capacity refills continuously, bursts quantized) and fixed windows (Azure's
short request windows, LiteLLM's calendar minute: counters that reset at the window boundary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Float refills drift by a few ulps; without slack a client that waits exactly the advertised
# retry time could be refused again by 1e-12 of a token.
_EPS = 1e-9


class TokenBucket:
    """A bucket of `capacity` units refilling continuously at `rate` units/s; starts full."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: float, rate: float, now: float = 0.0) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def level_at(self, now: float) -> float:
        """Units available at `now`."""
        self._refill(now)
        return self.level

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits: 0 if it fits now, inf if it never can."""
        self._refill(now)
        short = cost - self.level
        if short <= _EPS:
            return 0.0
        if cost > self.capacity + _EPS or self.rate <= 0:
            return math.inf
        return short / self.rate

    def take(self, cost: float, now: float) -> None:
        """Charge `cost` (the caller has checked that it fits)."""
        self._refill(now)
        self.level -= cost

    def give(self, amount: float, now: float) -> None:
        """Return `amount` (a refund), never above capacity."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def until_full_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        if self.level >= self.capacity:
            return 0.0
        return (self.capacity - self.level) / self.rate if self.rate > 0 else math.inf

    def fill(self, now: float) -> None:
        """Refill completely (for resets)."""
        self.level = self.capacity
        self.updated = now


Kind = Literal["requests", "tokens", "input_tokens", "output_tokens"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused, with the numbers OpenAI puts in its 429 message."""

    kind: Kind
    limit: int
    used: int
    requested: int
    retry_after_s: float  # inf when the request can never fit
    too_large: bool
    detail: str = ""  # a dialect's own reason, e.g. "cooldown" (litellm)


class Limit:
    """One dimension (requests or tokens): a reporting bucket for headers, a smaller enforcing one."""

    __slots__ = ("_names", "enforcing", "kind", "limit", "reporting")

    def __init__(self, kind: Kind, limit: int, quantum_s: float, now: float) -> None:
        self.kind: Kind = kind
        self.limit = limit
        # Built once: headers are written on every answer.
        self._names = (f"x-ratelimit-limit-{kind}", str(limit), f"x-ratelimit-remaining-{kind}",
                       f"x-ratelimit-reset-{kind}")
        rate = limit / 60.0
        self.reporting = TokenBucket(float(limit), rate, now)
        # Quantization: the burst allowed is only `quantum_s` worth of the per-minute limit.
        floor = 1.0 if kind == "requests" else 0.0
        self.enforcing = TokenBucket(max(floor, limit * quantum_s / 60.0), rate, now)

    def check(self, cost: int, now: float) -> Refusal | None:
        wait = max(self.enforcing.wait_s(cost, now), self.reporting.wait_s(cost, now))
        if wait == 0.0:
            return None
        used = max(0, round(self.limit - self.reporting.level))
        return Refusal(self.kind, self.limit, used, cost, wait, math.isinf(wait))

    def take(self, cost: int, now: float) -> None:
        self.enforcing.take(cost, now)
        self.reporting.take(cost, now)

    def give(self, amount: int, now: float) -> None:
        self.enforcing.give(amount, now)
        self.reporting.give(amount, now)

    def headers(self, now: float, out: dict[str, str]) -> None:
        limit_name, limit, remaining_name, reset_name = self._names
        out[limit_name] = limit
        bucket = self.reporting
        level = bucket.level_at(now)
        out[remaining_name] = str(max(0, math.floor(level + _EPS)))
        out[reset_name] = format_duration((bucket.capacity - level) / bucket.rate if level < bucket.capacity else 0.0)

    def fill(self, now: float) -> None:
        self.enforcing.fill(now)
        self.reporting.fill(now)


class RateLimiter:
    """RPM and TPM limits, each a `Limit`; a request is admitted only if both have room."""

    __slots__ = ("_limits",)

    def __init__(self, rpm: int | None, tpm: int | None, quantum_s: float, now: float) -> None:
        self._limits: list[tuple[Limit, bool]] = []
        if rpm is not None:
            self._limits.append((Limit("requests", rpm, quantum_s, now), False))
        if tpm is not None:
            self._limits.append((Limit("tokens", tpm, quantum_s, now), True))

    def admit(self, tokens: int, now: float) -> Refusal | None:
        """Charge one request of `tokens` if everything has room, else say why not (charging nothing)."""
        worst: Refusal | None = None
        for lim, is_tokens in self._limits:
            refusal = lim.check(tokens if is_tokens else 1, now)
            # Report the dimension that makes the client wait longest: retrying earlier is useless.
            if refusal is not None and (worst is None or refusal.retry_after_s > worst.retry_after_s):
                worst = refusal
        if worst is not None:
            return worst
        for lim, is_tokens in self._limits:
            lim.take(tokens if is_tokens else 1, now)
        return None

    def headers(self, now: float) -> dict[str, str]:
        """The x-ratelimit-* headers as of `now`."""
        out: dict[str, str] = {}
        self.write_headers(now, out)
        return out

    def write_headers(self, now: float, out: dict[str, str]) -> None:
        """Add the x-ratelimit-* headers as of `now` to `out`."""
        for lim, _ in self._limits:
            lim.headers(now, out)

    def fill(self, now: float) -> None:
        """Refill every bucket."""
        for lim, _ in self._limits:
            lim.fill(now)


class FixedWindow:
    """A counter of `limit` units per window of `window_s` seconds, windows aligned to multiples of `window_s`.

    Unlike a bucket nothing refills within a window: a burst may take the whole window's limit at once, and the
    count starts again from zero at the boundary.
    """

    __slots__ = ("limit", "start", "used", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.start = -math.inf
        self.used = 0

    def _roll(self, now: float) -> None:
        start = math.floor(now / self.window_s) * self.window_s
        if start != self.start:
            self.start = start
            self.used = 0

    def wait_s(self, cost: int, now: float) -> float:
        """Seconds until `cost` fits: 0 if it fits now, the rest of the window if not, inf if it never can."""
        self._roll(now)
        if self.used + cost <= self.limit:
            return 0.0
        if cost > self.limit:
            return math.inf
        return self.start + self.window_s - now

    def take(self, cost: int, now: float) -> None:
        """Count `cost` in the current window (may pass the limit: usage counted after the fact)."""
        self._roll(now)
        self.used += cost

    def used_at(self, now: float) -> int:
        """Units counted in the current window (may exceed the limit)."""
        self._roll(now)
        return self.used

    def remaining(self, now: float) -> int:
        """Units left in the current window."""
        self._roll(now)
        return max(0, self.limit - self.used)

    def reset_s(self, now: float) -> float:
        """Seconds until the current window ends."""
        self._roll(now)
        return self.start + self.window_s - now

    def fill(self) -> None:
        """Forget the count (for resets)."""
        self.start = -math.inf
        self.used = 0


def format_duration(seconds: float) -> str:
    """OpenAI's (Go-style) duration format: "0s", "6ms", "1.2s", "1m30s", "1h0m0s"."""
    if seconds <= 0:
        return "0s"
    if math.isinf(seconds):
        return "24h0m0s"
    ms = max(1, math.ceil(seconds * 1000 - _EPS))
    if ms < 1000:
        return f"{ms}ms"
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s = f"{rem // 1000}.{rem % 1000:03d}".rstrip("0").rstrip(".")
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"
