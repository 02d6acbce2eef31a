"""Time as a parameter: the pool reads time and sleeps only through a :class:`Clock`, so tests can replace it."""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["Clock", "LoopClock"]


class Clock(Protocol):
    """Monotonic seconds and a sleep that honours them."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The event loop's clock: the one every timer of the loop already uses.

    The pool runs on asyncio (the openai SDK's aiohttp transport needs it), so this asks asyncio directly:
    ``anyio.current_time()`` detects the backend on every call, which costs more than the rest of an admission.
    """

    __slots__ = ()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
