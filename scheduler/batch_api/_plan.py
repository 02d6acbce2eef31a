"""Pure planning: cutting requests into Batch API input files, and when the ``auto`` tier must cut over to online.

No I/O and no clock here: :class:`Splitter` decides which part each line goes to, :func:`split` does it for a
whole list, and :func:`cutover_at` says how long the Batch API may keep the work before what is left must run
online to meet a deadline.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import ConfigurationError

__all__ = ["BatchLimits", "Splitter", "cutover_at", "online_seconds", "split"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """What one Batch API input file may hold. OpenAI's limits are the defaults: 50,000 requests and 200 MB
    (https://platform.openai.com/docs/guides/batch, "Rate limits"). Smaller ones serve tests and smaller batches.

    Raises:
        ConfigurationError: a limit is below 1.
    """

    #: requests a file may hold
    max_requests: int = 50_000
    #: bytes a file may hold, newlines included
    max_bytes: int = 200 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"BatchLimits.{name} must be an integer >= 1, got {value!r}")


class Splitter:
    """Assigns lines to parts: each part holds lines of one key (an endpoint and model: a Batch API file takes one
    of each) and stays within the limits. A part is closed when the next line of its key would not fit.

    Args:
        limits: what a part may hold.
        first_part: the number of the first part opened.
    """

    __slots__ = ("_limits", "_next", "_open")

    def __init__(self, limits: BatchLimits, first_part: int = 1) -> None:
        self._limits = limits
        self._next = first_part
        #: key -> [part, lines, bytes] of the part filling for that key
        self._open: dict[Hashable, list[int]] = {}

    def place(self, key: Hashable, size: int) -> tuple[int, int | None]:
        """The part for a line of ``key`` that is ``size`` bytes long (its newline included), and the part that was
        closed to make room for it (None when none was).

        Raises:
            ConfigurationError: the line alone is larger than a part may be.
        """
        limits = self._limits
        if size > limits.max_bytes:
            raise ConfigurationError(
                f"a request of {size:,} bytes cannot go into a batch input file of at most {limits.max_bytes:,} bytes"
            )
        closed = None
        entry = self._open.get(key)
        if entry is not None and (entry[1] + 1 > limits.max_requests or entry[2] + size > limits.max_bytes):
            closed = entry[0]
            entry = None
        if entry is None:
            entry = [self._next, 0, 0]
            self._next += 1
            self._open[key] = entry
        entry[1] += 1
        entry[2] += size
        return entry[0], closed

    def open_parts(self) -> list[int]:
        """The parts still filling (every part not yet closed), in the order they were opened."""
        return sorted(entry[0] for entry in self._open.values())

    @property
    def next_part(self) -> int:
        """The number the next part opened will get."""
        return self._next


def split(items: Iterable[tuple[K, int]], limits: BatchLimits) -> list[tuple[K, list[int]]]:
    """Cut ``(key, size)`` items into parts: ``(key, indices of its items)`` in the order the parts were opened."""
    splitter = Splitter(limits)
    parts: dict[int, tuple[K, list[int]]] = {}
    for index, (key, size) in enumerate(items):
        part, _ = splitter.place(key, size)
        parts.setdefault(part, (key, []))[1].append(index)
    return [parts[number] for number in sorted(parts)]


def online_seconds(requests: int, tokens: int, *, rpm: float | None, tpm: float | None) -> float:
    """Seconds that ``requests`` costing ``tokens`` take online at ``rpm`` and ``tpm`` (None: that limit does not
    bind): the slower of the two limits decides."""
    minutes = 0.0
    if rpm is not None:
        minutes = max(minutes, requests / rpm)
    if tpm is not None:
        minutes = max(minutes, tokens / tpm)
    return minutes * 60.0


def cutover_at(
    deadline: float,
    *,
    requests: int,
    tokens: int,
    rpm: float | None,
    tpm: float | None,
    safety: float = 1.25,
    margin_s: float = 60.0,
) -> float:
    """The latest time to stop the Batch API and run what is left online, and still meet ``deadline``: the
    deadline less the time the rest takes online (:func:`online_seconds`, times ``safety`` for retries and a pace
    below the limits) less ``margin_s`` for cancelling the batches and collecting what they finished.

    Times are on the caller's clock. When the result is already past, the work should go online at once.

    Args:
        deadline: when every request must be done.
        requests: requests not done yet.
        tokens: their estimated tokens (prompt and output reservation).
        rpm: the online request limit (None: not binding).
        tpm: the online token limit (None: not binding).
        safety: how much longer than the limits allow the online run is assumed to take (>= 1).
        margin_s: seconds kept for the cut-over itself.

    Raises:
        ConfigurationError: ``safety`` < 1 or ``margin_s`` < 0.
    """
    if safety < 1.0 or margin_s < 0.0:
        raise ConfigurationError(f"safety must be >= 1 and margin_s >= 0, got {safety!r} and {margin_s!r}")
    return deadline - online_seconds(requests, tokens, rpm=rpm, tpm=tpm) * safety - margin_s
