"""What requests cost: a price table per model and service tier, looked up by the longest matching prefix.

Prices are US dollars per million tokens: uncached input, cached input (the provider's prompt cache) and output.
Each model has its standard prices and, per tier, those of the Batch API (``batch``) and of flex processing
(``service_tier="flex"``, ``flex``). OpenAI's Batch API costs half the standard price on every model, and flex
"tokens are priced at Batch API rates" on the models that offer it (https://platform.openai.com/docs/guides/batch,
https://platform.openai.com/docs/guides/flex-processing). :data:`DEFAULT_PRICES` covers current OpenAI models;
``Pool(prices=...)`` extends or overrides it with a mapping or a JSON file of the same shape::

    {"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60},
     "my-finetune": {"input": 0.30, "output": 1.20,
                     "batch": {"input": 0.15, "output": 0.60}, "flex": {"input": 0.15, "output": 0.60}}}

``cached_input`` defaults to ``input`` and ``output`` to 0 (embeddings). ``batch`` defaults to half of every
standard price; a model without ``flex`` has no flex price (its flex cost is unknown). A dated snapshot such as
``gpt-4o-mini-2024-07-18`` takes the price of its longest listed prefix, ``gpt-4o-mini``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import orjson
import structlog

from .errors import ConfigurationError
from .results import Usage

__all__ = ["DEFAULT_PRICES", "TIERS", "ModelPrice", "PriceTable", "Tier"]

log = structlog.get_logger("scheduler")

_PER_TOKEN = 1e-6  # prices are per million tokens
_BATCH_DISCOUNT = 0.5  # the Batch API's price, as a share of the standard price

#: the service tiers a price can be asked for: standard (online), flex (``service_tier="flex"``), the Batch API
Tier = Literal["standard", "flex", "batch"]
TIERS: tuple[Tier, ...] = get_args(Tier)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's list prices in US dollars per million tokens."""

    input: float
    output: float = 0.0
    #: input tokens served from the provider's prompt cache; None: the input price
    cached_input: float | None = None
    #: prices on the Batch API; None: half of these
    batch: ModelPrice | None = None
    #: prices of flex processing; None: the model offers no flex tier
    flex: ModelPrice | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ConfigurationError(f"ModelPrice.{name} must be a non-negative number, got {value!r}")
        for name in ("batch", "flex"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, ModelPrice):
                raise ConfigurationError(f"ModelPrice.{name} must be a ModelPrice or None, got {value!r}")

    def for_tier(self, tier: Tier) -> ModelPrice | None:
        """The prices on ``tier``: these (standard), the Batch API's, or flex's (None when not offered).

        Raises:
            ConfigurationError: ``tier`` is not one of :data:`TIERS`.
        """
        if tier == "standard":
            return self
        if tier == "batch":
            return self.batch if self.batch is not None else self.discounted(_BATCH_DISCOUNT)
        if tier == "flex":
            return self.flex
        raise ConfigurationError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)}")

    def discounted(self, share: float) -> ModelPrice:
        """Every price of this one times ``share`` (0.5: the Batch API's discount)."""
        cached = None if self.cached_input is None else self.cached_input * share
        return ModelPrice(input=self.input * share, output=self.output * share, cached_input=cached)

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


def _with_flex(price: ModelPrice) -> ModelPrice:
    """``price`` with a flex tier at Batch API rates (what OpenAI charges for flex)."""
    return ModelPrice(price.input, price.output, price.cached_input, flex=price.discounted(_BATCH_DISCOUNT))


# OpenAI list prices (standard tier, USD per 1M tokens) at the time of writing (2025). They change: check
# https://openai.com/api/pricing and override with Pool(prices=...) or a JSON file. Batch prices are half of these
# on every model; flex (at batch prices) is offered on the o3, o4-mini and gpt-5 families only.
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o": ModelPrice(input=2.50, cached_input=1.25, output=10.00),
    "gpt-4o-2024-05-13": ModelPrice(input=5.00, output=15.00),  # the first gpt-4o snapshot, priced higher
    "gpt-4o-mini": ModelPrice(input=0.15, cached_input=0.075, output=0.60),
    "gpt-4.1": ModelPrice(input=2.00, cached_input=0.50, output=8.00),
    "gpt-4.1-mini": ModelPrice(input=0.40, cached_input=0.10, output=1.60),
    "gpt-4.1-nano": ModelPrice(input=0.10, cached_input=0.025, output=0.40),
    "o3": _with_flex(ModelPrice(input=2.00, cached_input=0.50, output=8.00)),
    "o3-pro": ModelPrice(input=20.00, output=80.00),  # listed so that "o3-pro" does not match "o3"
    "o3-mini": ModelPrice(input=1.10, cached_input=0.55, output=4.40),
    "o4-mini": _with_flex(ModelPrice(input=1.10, cached_input=0.275, output=4.40)),
    "gpt-5": _with_flex(ModelPrice(input=1.25, cached_input=0.125, output=10.00)),
    "gpt-5-mini": _with_flex(ModelPrice(input=0.25, cached_input=0.025, output=2.00)),
    "gpt-5-nano": _with_flex(ModelPrice(input=0.05, cached_input=0.005, output=0.40)),
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
        self._found: dict[tuple[str, Tier], ModelPrice | None] = {}
        self._warned: set[tuple[str, Tier]] = set()

    @classmethod
    def load(cls, source: PriceTable | str | os.PathLike[str] | Mapping[str, Any] | None = None) -> PriceTable:
        """The default prices, extended or overridden by ``source``: a mapping of model name to
        :class:`ModelPrice` (or to ``{"input", "cached_input", "output"}``, with optional ``"batch"`` and ``"flex"``
        mappings of the same keys), or the path of a JSON file of them.

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

    def price(self, model: str, tier: Tier = "standard") -> ModelPrice | None:
        """The price of ``model`` (its longest listed prefix) on ``tier``, or None when none matches or the model
        has no price on that tier.

        Raises:
            ConfigurationError: ``tier`` is not one of :data:`TIERS`.
        """
        key = (model, tier)
        try:
            return self._found[key]
        except KeyError:
            pass
        if tier == "standard":
            name = model.rsplit("/", 1)[-1].lower()
            best = max((p for p in self._prices if name.startswith(p)), key=len, default=None)
            found = self._prices[best] if best is not None else None
        else:
            standard = self.price(model)
            found = None if standard is None else standard.for_tier(tier)
        self._found[key] = found
        return found

    def cost(self, model: str | None, usage: Usage | None, tier: Tier = "standard") -> float | None:
        """US dollars for ``usage`` on ``model`` served on ``tier``; None when either is unknown, or the model has
        no price on that tier (warned once per model and tier).

        Raises:
            ConfigurationError: ``tier`` is not one of :data:`TIERS`.
        """
        if usage is None or model is None:
            return None
        price = self.price(model, tier)
        if price is None:
            self.warn_unknown(model, tier)
            return None
        return price.cost(usage)

    def warn_unknown(self, model: str, tier: Tier = "standard") -> None:
        """Warn, once per model and tier, that a cost cannot be counted."""
        if (model, tier) not in self._warned:
            self._warned.add((model, tier))
            if tier == "standard":
                log.warning("price_unknown", model=model, detail="its cost is not counted: add it with prices=")
            else:
                log.warning("price_unknown", model=model, tier=tier,
                            detail=f"no {tier} price: its cost is not counted; add it with prices=")


_PRICE_KEYS = frozenset({"input", "cached_input", "output"})


def _price(name: str, entry: Any, tiers: bool = True) -> ModelPrice:
    if isinstance(entry, ModelPrice):
        return entry
    allowed = _PRICE_KEYS | {"batch", "flex"} if tiers else _PRICE_KEYS
    if not isinstance(entry, Mapping) or "input" not in entry or set(entry) - allowed:
        raise ConfigurationError(
            f"the price of {name!r} must be {{'input': ..., 'cached_input': ..., 'output': ...}} (USD per 1M "
            f"tokens; input required{'; optional batch and flex prices of the same shape' if tiers else ''}), "
            f"got {entry!r}"
        )
    batch, flex = (
        None if entry.get(tier) is None else _price(f"{name} ({tier})", entry[tier], tiers=False)
        for tier in ("batch", "flex")
    )
    return ModelPrice(
        input=entry["input"], output=entry.get("output", 0.0), cached_input=entry.get("cached_input"),
        batch=batch, flex=flex,
    )
