"""Embeddings coalescing: one-text embeddings jobs queued together go out as one request.

One embeddings request takes up to 2,048 inputs and 300,000 tokens summed across them (OpenAI's API reference for
``input``), so a pipeline that sends a text per request meets the requests-per-minute limit long before the token
limit. The dispatcher gathers the queued jobs that ask the same thing of the same model (same endpoint and
parameters, one text each) into a *carrier* job whose body lists their texts; the answer's vectors go back to each
job in the order they were sent, with a share of the usage in proportion to its own estimate.

This module holds the rules (which jobs go together, the carrier's body, checking and splitting the answer); the
dispatcher and the attempts call them. A carrier is not a job of anyone: it is never registered, and whatever
settles it (an answer, an error, a stop) settles each of its riders (see :class:`scheduler._settle.Settler`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .results import Usage

if TYPE_CHECKING:
    from ._job import Job

__all__ = ["Coalescing", "answer_problem", "coalesce_key", "inputs_body", "share_usage", "split_answer"]

#: OpenAI's bounds on one embeddings request
MAX_INPUTS = 2_048
MAX_TOKENS = 300_000
EMBEDDINGS = "/v1/embeddings"


@dataclass(frozen=True, slots=True)
class Coalescing:
    """How embeddings jobs are gathered into one request.

    Args:
        max_inputs: texts per request at most (OpenAI's bound: 2,048).
        max_tokens: estimated tokens per request at most (OpenAI's bound: 300,000 summed across inputs); also
            never more than the scope's token bucket holds, so a combined request waits no longer than its
            texts would one by one.
        linger_s: how long the oldest queued job may wait for companions when fewer than ``max_inputs`` are
            queued (a lone request is held back no longer than this).
    """

    max_inputs: int = MAX_INPUTS
    max_tokens: int = MAX_TOKENS
    linger_s: float = 0.005

    def __post_init__(self) -> None:
        if not 1 <= self.max_inputs <= MAX_INPUTS:
            raise ValueError(f"max_inputs must be between 1 and {MAX_INPUTS}, got {self.max_inputs}")
        if self.max_tokens < 1 or not self.linger_s >= 0:
            raise ValueError("max_tokens must be positive and linger_s at least 0")


def coalesce_key(endpoint: str, body: Mapping[str, Any]) -> str | None:
    """What a job must share with others to ride with them (None: it goes alone).

    Only an embeddings request of one text (a string, or a list of one string) rides: a request that already
    lists several inputs is already one request, and token arrays are left as they came.
    """
    if endpoint != EMBEDDINGS or _text(body.get("input")) is None:
        return None
    params = {name: value for name, value in body.items() if name != "input"}
    try:
        return orjson.dumps(params, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return None  # a parameter that is not plain JSON: sent as it is, alone


def inputs_body(riders: Sequence[Job]) -> dict[str, Any]:
    """The combined request's body: the first rider's parameters, every rider's text in order."""
    texts = [_text(rider.body.get("input")) for rider in riders]
    return {**riders[0].body, "input": texts}


def answer_problem(body: Any, count: int) -> str | None:
    """What keeps a 200 answer of a combined request from being split back (None: nothing): each of the
    ``count`` inputs needs exactly one vector, by ``index``."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return "the combined embeddings answer has no 'data' list"
    indices = sorted(item["index"] for item in data if isinstance(item, dict) and isinstance(item.get("index"), int))
    if indices != list(range(count)):
        return f"the combined embeddings answer has {len(data)} vectors for {count} inputs (by index)"
    return None


def split_answer(body: dict[str, Any], estimates: Sequence[int]) -> list[tuple[dict[str, Any], Usage | None]]:
    """Each input's own answer, in input order: a body as if it had been sent alone (its vector at index 0, its
    share of the usage), and that share. ``answer_problem`` must have found nothing wrong."""
    by_index = {item["index"]: item for item in body["data"]}
    usage = Usage.from_body(body)
    shares = share_usage(usage.prompt_tokens, estimates) if usage is not None else [None] * len(estimates)
    parts: list[tuple[dict[str, Any], Usage | None]] = []
    for position, share in enumerate(shares):
        own: dict[str, Any] = {**body, "data": [{**by_index[position], "index": 0}]}
        if share is None:
            own.pop("usage", None)
            parts.append((own, None))
        else:
            own["usage"] = {"prompt_tokens": share, "total_tokens": share}
            parts.append((own, Usage(share, 0)))
    return parts


def share_usage(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` tokens in proportion to ``weights`` into whole numbers that add up to ``total``
    (largest remainders get the leftover tokens)."""
    if not weights:
        return []
    weight_sum = sum(max(0, weight) for weight in weights)
    if weight_sum == 0:
        weights, weight_sum = [1] * len(weights), len(weights)
    exact = [total * max(0, weight) / weight_sum for weight in weights]
    shares = [int(value) for value in exact]
    leftover = total - sum(shares)
    for position in sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])[:leftover]:
        shares[position] += 1
    return shares


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return None
