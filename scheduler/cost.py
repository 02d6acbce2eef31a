"""What requests cost: a price table per model, looked up by the longest matching prefix.

Prices are US dollars per million tokens: uncached input, cached input (the provider's prompt cache) and output.
:data:`DEFAULT_PRICES` covers current OpenAI models; ``Pool(prices=...)`` extends or overrides it with a mapping
or a JSON file of the same shape::

    {"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60},
     "my-finetune": {"input": 0.30, "output": 1.20}}

``cached_input`` defaults to ``input`` and ``output`` to 0 (embeddings). A dated snapshot such as
``gpt-4o-mini-2024-07-18`` takes the price of its longest listed prefix, ``gpt-4o-mini``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from .errors import ConfigurationError
from .results import Usage

__all__ = ["DEFAULT_PRICES", "ModelPrice", "PriceTable"]

log = structlog.get_logger("scheduler")

_PER_TOKEN = 1e-6  # prices are per million tokens


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's list prices in US dollars per million tokens."""

    input: float
    output: float = 0.0
    #: input tokens served from the provider's prompt cache; None: the input price
    cached_input: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ConfigurationError(f"ModelPrice.{name} must be a non-negative number, got {value!r}")

    def cost(self, usage: Usage) -> float:
        """US dollars for ``usage``: uncached input, cached input and output at their own prices."""
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return (
            (usage.prompt_tokens - cached) * self.input + cached * cached_price + usage.completion_tokens * self.output
        ) * _PER_TOKEN

    def worst_case(self, prompt_tokens: int, output_tokens: int) -> float:
        """The most a request can cost: its whole prompt uncached, its whole output reservation spent."""
        return (prompt_tokens * self.input + output_tokens * self.output) * _PER_TOKEN


# OpenAI list prices (standard tier, USD per 1M tokens) at the time of writing (2025). They change: check
# https://openai.com/api/pricing and override with Pool(prices=...) or a JSON file.
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o": ModelPrice(input=2.50, cached_input=1.25, output=10.00),
    "gpt-4o-2024-05-13": ModelPrice(input=5.00, output=15.00),  # the first gpt-4o snapshot, priced higher
    "gpt-4o-mini": ModelPrice(input=0.15, cached_input=0.075, output=0.60),
    "gpt-4.1": ModelPrice(input=2.00, cached_input=0.50, output=8.00),
    "gpt-4.1-mini": ModelPrice(input=0.40, cached_input=0.10, output=1.60),
    "gpt-4.1-nano": ModelPrice(input=0.10, cached_input=0.025, output=0.40),
    "o3": ModelPrice(input=2.00, cached_input=0.50, output=8.00),
    "o3-pro": ModelPrice(input=20.00, output=80.00),  # listed so that "o3-pro" does not match "o3"
    "o3-mini": ModelPrice(input=1.10, cached_input=0.55, output=4.40),
    "o4-mini": ModelPrice(input=1.10, cached_input=0.275, output=4.40),
    "gpt-5": ModelPrice(input=1.25, cached_input=0.125, output=10.00),
    "gpt-5-mini": ModelPrice(input=0.25, cached_input=0.025, output=2.00),
    "gpt-5-nano": ModelPrice(input=0.05, cached_input=0.005, output=0.40),
    "text-embedding-3-small": ModelPrice(input=0.02),
    "text-embedding-3-large": ModelPrice(input=0.13),
}


class PriceTable:
    """Model prices by name, matched by the longest listed prefix (case-insensitive; ``openai/`` router
    prefixes ignored). Unknown models cost ``None``, with one warning per model."""

    __slots__ = ("_found", "_prices", "_warned")

    def __init__(self, prices: Mapping[str, ModelPrice] = DEFAULT_PRICES) -> None:
        self._prices = {name.lower(): price for name, price in prices.items()}
        # Bulk runs use a handful of model names: resolve each once, not once per result.
        self._found: dict[str, ModelPrice | None] = {}
        self._warned: set[str] = set()

    @classmethod
    def load(cls, source: PriceTable | str | os.PathLike[str] | Mapping[str, Any] | None = None) -> PriceTable:
        """The default prices, extended or overridden by ``source``: a mapping of model name to
        :class:`ModelPrice` (or to ``{"input", "cached_input", "output"}``), or the path of a JSON file of them.

        Raises:
            ConfigurationError: the file cannot be read or an entry is not a price.
        """
        if isinstance(source, PriceTable):
            return source
        prices = dict(DEFAULT_PRICES)
        if source is None:
            return cls(prices)
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            try:
                source = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                raise ConfigurationError(f"cannot read the price file {str(path)!r}: {exc}") from exc
            if not isinstance(source, Mapping):
                raise ConfigurationError(f"the price file {str(path)!r} must hold one object: model name -> prices")
        for name, entry in source.items():
            prices[str(name)] = _price(str(name), entry)
        return cls(prices)

    def price(self, model: str) -> ModelPrice | None:
        """The price of ``model`` (its longest listed prefix), or None when none matches."""
        try:
            return self._found[model]
        except KeyError:
            pass
        name = model.rsplit("/", 1)[-1].lower()
        best = max((p for p in self._prices if name.startswith(p)), key=len, default=None)
        found = self._prices[best] if best is not None else None
        self._found[model] = found
        return found

    def cost(self, model: str | None, usage: Usage | None) -> float | None:
        """US dollars for ``usage`` on ``model``; None when either is unknown (warned once per model)."""
        if usage is None or model is None:
            return None
        price = self.price(model)
        if price is None:
            self.warn_unknown(model)
            return None
        return price.cost(usage)

    def warn_unknown(self, model: str) -> None:
        if model not in self._warned:
            self._warned.add(model)
            log.warning("price_unknown", model=model, detail="its cost is not counted: add it with prices=")


def _price(name: str, entry: Any) -> ModelPrice:
    if isinstance(entry, ModelPrice):
        return entry
    if not isinstance(entry, Mapping) or "input" not in entry or set(entry) - {"input", "cached_input", "output"}:
        raise ConfigurationError(
            f"the price of {name!r} must be {{'input': ..., 'cached_input': ..., 'output': ...}} (USD per 1M "
            f"tokens; input required), got {entry!r}"
        )
    return ModelPrice(input=entry["input"], output=entry.get("output", 0.0), cached_input=entry.get("cached_input"))
