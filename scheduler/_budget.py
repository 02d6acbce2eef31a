"""A spending budget that is a hard limit: every attempt in flight holds the most it could cost.

The most a request can cost is its prompt at the input price plus its output cap at the output price. Both
bounds are made true ones: a request without an output cap is sent with the cap it is charged for (the pool
adds it), and the prompt is bounded by the UTF-8 bytes of its text as well as by the estimate (every token of a
byte-level tokenizer holds at least one byte, whatever tokenizer the server counts with). An attempt that gets
no answer (a timeout, a dropped connection) may still have been billed, so its worst case stays spent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .cost import PriceTable
from .requests import CHAT
from .tokens import output_reservation

__all__ = ["Budget", "cap_output"]

# Strings under these keys are not prompt text (image and audio payloads, file ids): the estimator prices them.
_NOT_TEXT = frozenset({"url", "data", "file_data", "file_id", "image_url", "detail", "format", "model", "metadata"})
# Per-message framing and priming, above what the text's bytes bound (generous: the chat format needs ~4).
_MESSAGE_OVERHEAD = 8
_REQUEST_OVERHEAD = 16


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, Mapping):
        return sum(_text_bytes(v) for k, v in value.items() if k not in _NOT_TEXT)
    if isinstance(value, list):
        # A token array (embeddings, completions) counts one token an item.
        return sum(1 if isinstance(item, int) else _text_bytes(item) for item in value)
    return 0


def prompt_bound(body: Mapping[str, Any], estimate: int) -> int:
    """The most prompt tokens any byte-level tokenizer can count for ``body``, and never below ``estimate``."""
    messages = body.get("messages")
    framing = _MESSAGE_OVERHEAD * len(messages) if isinstance(messages, list) else 0
    return max(estimate, _text_bytes(body) + framing + _REQUEST_OVERHEAD)


def cap_output(endpoint: str, body: Mapping[str, Any], cap: int) -> Mapping[str, Any]:
    """``body`` with an output cap of ``cap`` if it has none, in the endpoint's own parameter (embeddings and
    moderations produce no output and are returned as they are)."""
    if any(isinstance(body.get(k), int) for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")):
        return body
    if endpoint.endswith(CHAT.removeprefix("/v1")):
        return {**body, "max_completion_tokens": cap}
    if endpoint.endswith("responses"):
        return {**body, "max_output_tokens": cap}
    if endpoint.endswith("completions"):
        return {**body, "max_tokens": cap}
    return body


class Budget:
    """Dollars that may be spent: spent + held for attempts in flight never exceeds ``limit_usd``.

    Args:
        limit_usd: the budget.
        prices: the price table (every model run under a budget needs a price).
        default_output_tokens: the output reservation of requests without a cap.
    """

    __slots__ = ("_default_output", "_held_jobs", "limit_usd", "prices", "reserved_usd", "spent_usd",
                 "uncertain_usd")

    def __init__(self, limit_usd: float, prices: PriceTable, default_output_tokens: int) -> None:
        self.limit_usd = limit_usd
        self.prices = prices
        self._default_output = default_output_tokens
        #: known spending, from usage
        self.spent_usd = 0.0
        #: worst cases of attempts that got no answer (maybe billed)
        self.uncertain_usd = 0.0
        #: worst cases held by attempts in flight
        self.reserved_usd = 0.0
        self._held_jobs = 0

    def priced(self, model: str | None) -> bool:
        return model is not None and self.prices.price(model) is not None

    def worst_case(self, endpoint: str, body: Mapping[str, Any], estimate: int) -> float:
        """The most the request can cost (its model must have a price)."""
        price = self.prices.price(str(body.get("model") or ""))
        assert price is not None  # checked when the job was submitted
        output = output_reservation(endpoint, body, self._default_output)
        return price.worst_case(prompt_bound(body, max(0, estimate - output)), output)

    def room_for(self, worst: float) -> bool:
        """Whether ``worst`` fits now (a hair of tolerance: sums of float dollars must not stop a run that fits
        exactly)."""
        return self.spent_usd + self.uncertain_usd + self.reserved_usd + worst <= self.limit_usd + 1e-9

    @property
    def holding(self) -> bool:
        """Whether attempts in flight hold reservations (which usually come back far smaller)."""
        return self._held_jobs > 0

    def hold(self, worst: float) -> None:
        self.reserved_usd += worst
        self._held_jobs += 1

    def release(self, worst: float, *, spent: float | None, uncertain: bool = False) -> None:
        """End an attempt's hold: ``spent`` its known cost, or (``uncertain``) its worst case counts as spent."""
        self._held_jobs -= 1
        # Summing and subtracting floats drifts: with nothing in flight, nothing is held, exactly.
        self.reserved_usd = self.reserved_usd - worst if self._held_jobs else 0.0
        if uncertain:
            self.uncertain_usd += worst
        elif spent is not None:
            self.spent_usd += spent

    def exhausted(self, worst: float) -> str:
        """The message of the stop."""
        used = self.spent_usd + self.uncertain_usd
        maybe = f" (${self.uncertain_usd:.6f} of it for attempts that got no answer)" if self.uncertain_usd else ""
        return (f"the budget of ${self.limit_usd:g} is spent: ${used:.6f} used{maybe}, and the next request may "
                f"cost up to ${worst:.6f}")
