"""Time as a parameter: the pool reads time, sleeps and sets timers only through a :class:`Clock`, so tests can
replace it (see :class:`scheduler.testing.FakeClock`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "LoopClock", "Timer"]


class Timer(Protocol):
    """A callback set for a time; ``cancel()`` keeps it from running."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds, a sleep that honours them, and timers on the same time line; and the wall clock."""

    def now(self) -> float: ...

    def wall(self) -> float:
        """Wall-clock seconds (Unix time), moving with :meth:`now`: providers state some reset times as
        wall-clock times, and gateways count per calendar minute."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback()`` on the event loop once the clock reads ``when``."""
        ...


class LoopClock:
    """The event loop's clock: the one every timer of the loop already uses.

    The pool runs on asyncio (the openai SDK's aiohttp transport needs it), whose loop time is
    ``time.monotonic()``: read directly, it costs a third of asking the running loop, and it is read several
    times per job (``anyio.current_time()`` detects the backend on every call, which costs more still).
    """

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_at(when, callback)
