"""The rate limits a pool stays under (:class:`Limits`); admission itself lives in :mod:`scheduler.admission`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """The rate limits to stay under. ``None`` for a limit means that dimension is not limited.

    Pass ``limits=None`` to :class:`~scheduler.Pool` instead to learn them from the response headers.
    """

    #: requests per minute
    rpm: int | None = None
    #: tokens per minute, counted as the server counts them (prompt estimate plus the output reservation)
    tpm: int | None = None
    #: input tokens per minute (Anthropic's ITPM)
    itpm: int | None = None
    #: output tokens per minute (Anthropic's OTPM), charged the output cap and settled to what was generated
    otpm: int | None = None
    #: the largest burst, in seconds of the rate. Providers enforce per-minute limits over short slices
    #: (60,000 RPM may be enforced as 1,000 per second), so a minute-sized burst would meet 429s.
    burst_s: float = 1.0
    #: give back the unused output reservation after each response, for providers that count real usage.
    #: OpenAI keeps the reservation, so the default is off (a server's headers can also say it counts usage).
    refund_unused: bool = False
    #: share of a burst kept in reserve below what the headers report, to absorb arrival jitter
    safety: float = 0.05
    #: capacity held for urgent work: ``{0: 0.2}`` keeps 20% of each bucket for jobs of priority 0 or lower
    #: (more urgent); ``{0: 0.2, 5: 0.1}`` also keeps another 10% from jobs above priority 5
    reserve: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "itpm", "otpm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"Limits.{name} must be a positive integer or None, got {value!r}")
        if not self.burst_s > 0:
            raise ValueError(f"Limits.burst_s must be positive, got {self.burst_s!r}")
        if not 0 <= self.safety < 1:
            raise ValueError(f"Limits.safety must be in [0, 1), got {self.safety!r}")
        shares = list(self.reserve.values())
        if any(not 0 < share < 1 for share in shares) or sum(shares) >= 1:
            raise ValueError(f"Limits.reserve shares must be in (0, 1) and sum below 1, got {dict(self.reserve)!r}")
        object.__setattr__(self, "reserve", dict(sorted(self.reserve.items())))

    def __hash__(self) -> int:
        return hash((self.rpm, self.tpm, self.itpm, self.otpm, self.burst_s, self.refund_unused, self.safety,
                     tuple(self.reserve.items())))

    def per_minute(self) -> dict[str, int]:
        """The limited dimensions and their per-minute limits."""
        named = (("requests", self.rpm), ("tokens", self.tpm), ("input_tokens", self.itpm),
                 ("output_tokens", self.otpm))
        return {dim: value for dim, value in named if value is not None}
