"""Counters behind the mock's GET /stats."""

from __future__ import annotations

from collections import Counter
from typing import Any

# Per key and per model: [requests, ok, rate_limited, admitted_tokens]
_REQ, _OK, _RL, _TOK = range(4)


class Stats:
    """What the mock saw since start or the last reset."""

    __slots__ = (
        "admitted",
        "admitted_tokens",
        "bad_requests",
        "completion_tokens",
        "dropped",
        "embedding_inputs",
        "embedding_requests",
        "faults",
        "flex_served",
        "flex_unavailable",
        "in_flight",
        "max_queued",
        "ok",
        "overloaded",
        "per_key",
        "per_model",
        "prompt_tokens",
        "queued",
        "quota",
        "rate_limited",
        "requests",
        "server_errors",
        "t0",
        "timeline",
        "unauthorized",
    )

    def __init__(self, now: float) -> None:
        self.t0 = now
        self.requests = self.ok = self.rate_limited = self.quota = 0
        self.server_errors = self.dropped = self.unauthorized = self.bad_requests = 0
        self.admitted = self.admitted_tokens = self.prompt_tokens = self.completion_tokens = 0
        self.flex_served = self.flex_unavailable = self.overloaded = 0
        self.in_flight = self.queued = self.max_queued = 0
        self.timeline: list[list[int]] = []  # per second: [admitted, admitted tokens, rate limited]
        self.per_key: dict[str, list[int]] = {}
        self.per_model: dict[str, list[int]] = {}
        self.faults: Counter[str] = Counter()
        self.embedding_requests = 0
        self.embedding_inputs: Counter[int] = Counter()  # inputs per request -> requests

    def second(self, now: float) -> list[int]:
        """The timeline bucket of `now`, creating empty seconds up to it so plots have no gaps."""
        i = max(0, int(now - self.t0))
        tl = self.timeline
        while len(tl) <= i:
            tl.append([0, 0, 0])
        return tl[i]

    @staticmethod
    def counters(table: dict[str, list[int]], name: str) -> list[int]:
        """New zeroed counters [requests, ok, rate_limited, admitted_tokens] for `name` in `table`."""
        counters = table[name] = [0, 0, 0, 0]
        return counters

    def as_dict(self, now: float) -> dict[str, Any]:
        def counts(c: list[int]) -> dict[str, int]:
            return {"requests": c[_REQ], "ok": c[_OK], "rate_limited": c[_RL], "admitted_tokens": c[_TOK]}

        inputs = self.embedding_inputs
        return {
            "requests": self.requests,
            "ok": self.ok,
            "rate_limited": self.rate_limited,
            "quota": self.quota,
            "server_errors": self.server_errors,
            "dropped": self.dropped,
            "unauthorized": self.unauthorized,
            "bad_requests": self.bad_requests,
            "admitted": self.admitted,
            "admitted_tokens": self.admitted_tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "faults": dict(self.faults),
            "flex": {"served": self.flex_served, "unavailable": self.flex_unavailable},
            "capacity": {"in_flight": self.in_flight, "queued": self.queued, "max_queued": self.max_queued,
                         "overloaded": self.overloaded},
            "embeddings": {
                "requests": self.embedding_requests,
                "inputs": sum(k * v for k, v in inputs.items()),
                "max_inputs": max(inputs, default=0),
                "inputs_per_request": {str(k): inputs[k] for k in sorted(inputs)},
            },
            "keys": {k: counts(c) for k, c in self.per_key.items()},
            "models": {m: counts(c) for m, c in self.per_model.items()},
            "elapsed_s": round(now - self.t0, 3),
            "timeline": [
                {"t": i, "requests": r, "tokens": tok, "rate_limited": rl}
                for i, (r, tok, rl) in enumerate(self.timeline)
            ],
        }
