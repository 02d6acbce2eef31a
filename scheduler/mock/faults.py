"""Faults the mock injects: their names, scripted queues and rates, and the odd answers they produce.

A fault is named by a string, optionally with an argument after a colon (``"server_error:503"``,
``"slow:2000"``, ``"retry_after_long:120"``); several faults for one request join with ``+``
(``"slow+headers_zero"``). The same strings serve ``MockServer.inject()``, ``POST /mock/faults``,
``MockConfig.fault_rates`` and ``--fault NAME=RATE``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: Faults that answer in place of the model, each with what it does (the README and --help list these).
OUTCOMES: dict[str, str] = {
    "server_error": "500/502/503 with OpenAI's server_error body (argument: the status)",
    "drop": "the connection is closed without an answer",
    "quota": "429 insufficient_quota (charges nothing)",
    "retry_after_long": "429 rate_limit_exceeded with a long retry-after (argument: seconds)",
    "flex_unavailable": "429 resource_unavailable, as flex processing answers when short of capacity",
    "html": "a 200 whose body is an HTML page (text/html), as a misconfigured proxy answers",
    "bad_shape": 'a 200 with JSON that is not the endpoint\'s shape: {"status": "ok"}',
    "stream_cut": "the connection closes after a few deltas (argument: how many, default 3; no finish_reason)",
    "stream_truncated": "the stream ends cleanly after a few deltas, without finish_reason or [DONE] (argument: "
                        "how many deltas)",
    "stream_error": 'a data: {"error": ...} event after a few deltas, then the end (argument: how many deltas)',
    "stream_error_first": 'a data: {"error": ...} event before the first delta',
    "stream_error_event": "an event: error SSE event after a few deltas (argument: how many deltas)",
    "max_output": "the answer uses the whole output cap, finish_reason length (argument: tokens when uncapped)",
    "refusal": "message.refusal set and content null, as OpenAI refuses",
    "invalid_json": "content that is not valid JSON (argument 'schema': valid JSON that breaks the schema)",
}
#: Faults that change an answer without replacing it.
MODIFIERS: dict[str, str] = {
    "slow": "extra latency (argument: milliseconds; default --slow-ms)",
    "headers_zero": "every rate-limit header value 0",
    "headers_garbage": "every rate-limit header value non-numeric",
    "headers_negative": "every rate-limit header value -1",
    "headers_none": "no rate-limit headers on this answer",
}
FAULTS = frozenset(OUTCOMES) | frozenset(MODIFIERS)
#: Faults answered before the rate limiter, so they charge nothing.
REFUSALS = frozenset({"quota", "retry_after_long", "flex_unavailable"})
#: Order in which rates are drawn: a fixed order keeps seeded runs reproducible.
RATE_ORDER = tuple(OUTCOMES) + tuple(MODIFIERS)
_NUMERIC = frozenset({"server_error", "slow", "retry_after_long", "max_output", "stream_cut", "stream_truncated",
                      "stream_error", "stream_error_event"})


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault for one request: its name and the optional argument after the colon."""

    name: str
    arg: str = ""

    def number(self, default: float) -> float:
        """The argument as a number, or `default` when there is none."""
        return float(self.arg) if self.arg else default


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse ``"name[:arg][+name[:arg]...]"``.

    Raises:
        ValueError: an unknown name or a bad argument, naming it.
    """
    out = []
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
        if arg:
            if name in _NUMERIC:
                try:
                    value = float(arg)
                except ValueError:
                    raise ValueError(f"fault {name!r}: argument {arg!r} is not a number") from None
                if value < 0 or (name == "server_error" and arg not in ("500", "502", "503")):
                    raise ValueError(f"fault {name!r}: bad argument {arg!r}")
            elif name == "invalid_json":
                if arg != "schema":
                    raise ValueError(f"fault 'invalid_json': the argument can only be 'schema', got {arg!r}")
            else:
                raise ValueError(f"fault {name!r} takes no argument, got {arg!r}")
        out.append(Fault(name, arg))
    return tuple(out)


def check_rates(rates: Mapping[str, float]) -> None:
    """Raises ValueError for an unknown fault name or a rate outside [0, 1]."""
    for name, rate in rates.items():
        if name not in FAULTS:
            raise ValueError(f"fault_rates: unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault_rates[{name!r}] must be within [0, 1], got {rate}")


class FaultPlan:
    """Scripted faults (a queue, in arrival order) and faults drawn at configured rates."""

    __slots__ = ("_rates", "_refusal_rates", "drawn", "refusals_drawn", "script")

    def __init__(self, rates: Mapping[str, float]) -> None:
        chosen = [(name, rates[name]) for name in RATE_ORDER if rates.get(name, 0.0) > 0.0]
        self._rates = tuple((n, r) for n, r in chosen if n not in REFUSALS)
        self._refusal_rates = tuple((n, r) for n, r in chosen if n in REFUSALS)
        #: Whether faults have rates (the common path tests these attributes and skips drawing).
        self.drawn = bool(self._rates)
        self.refusals_drawn = bool(self._refusal_rates)
        #: Scripted entries, in the order requests take them (the common path tests it for emptiness).
        self.script: deque[tuple[Fault, ...]] = deque()

    def inject(self, specs: Iterable[str]) -> None:
        """Queue one entry per spec; all are parsed first, so a bad spec queues nothing."""
        self.script.extend([parse_faults(s) for s in specs])

    def pop(self) -> tuple[Fault, ...]:
        """The next scripted entry (the caller checked that `script` is not empty)."""
        return self.script.popleft()

    def push_back(self, faults: tuple[Fault, ...]) -> None:
        """Return an entry to the head of the queue (its request was refused by the rate limiter)."""
        self.script.appendleft(faults)

    def pending(self) -> list[str]:
        """The scripted entries still waiting, as spec strings."""
        return ["+".join(f"{f.name}:{f.arg}" if f.arg else f.name for f in e) for e in self.script]

    def clear(self) -> None:
        """Drop every scripted entry."""
        self.script.clear()

    def draw_refusal(self, rng: random.Random, flex: bool) -> tuple[Fault, ...]:
        """A refusal drawn at its rate for one valid request, before the limiter (a refusal charges nothing).

        flex_unavailable only strikes flex requests.
        """
        for name, rate in self._refusal_rates:
            if (flex or name != "flex_unavailable") and rng.random() < rate:
                return (Fault(name),)
        return ()

    def draw(self, rng: random.Random, streamed: bool) -> tuple[Fault, ...]:
        """Faults drawn at their rates for one admitted request: at most one outcome, any modifiers."""
        out: list[Fault] = []
        outcome = False
        for name, rate in self._rates:
            if name.startswith("stream_") and not streamed:
                continue  # a rate of stream faults is a share of streamed requests
            if name in OUTCOMES and outcome:
                continue
            if rng.random() < rate:
                out.append(Fault(name))
                outcome = outcome or name in OUTCOMES
        return tuple(out)


_HEADER_VALUES = {"headers_zero": "0", "headers_garbage": "unknown", "headers_negative": "-1"}


def corrupt_headers(headers: dict[str, str], name: str) -> None:
    """Apply a headers_* fault to the rate-limit headers (x-ratelimit-*, anthropic-ratelimit-*) in place."""
    keys = [k for k in headers if k.startswith(("x-ratelimit-", "anthropic-ratelimit-"))]
    if name == "headers_none":
        for k in keys:
            del headers[k]
        return
    value = _HEADER_VALUES[name]
    for k in keys:
        headers[k] = value


HTML_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Sign in - Corporate Proxy</title></head>
<body>
<h1>Authentication required</h1>
<p>Your session has expired. Please sign in to continue to the requested page.</p>
<form method="post" action="/login"><input name="user"><input name="password" type="password">
<button type="submit">Sign in</button></form>
</body>
</html>
"""
BAD_SHAPE = b'{"status": "ok"}'
