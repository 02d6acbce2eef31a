"""Shared by the mock server's tests: a running mock with an openai client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import openai
from openai.types.chat import ChatCompletionMessageParam

from scheduler.mock import MockConfig, MockServer

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there friend"}]  # 18 chars: 5 tokens


@asynccontextmanager
async def running(
    config: MockConfig | None = None, api_key: str = "x", clock: Callable[[], float] | None = None
) -> AsyncIterator[tuple[MockServer, openai.AsyncOpenAI]]:
    """A mock on a free loopback port and an AsyncOpenAI on it, its retries off (429s and 5xx reach the test)."""
    async with (
        MockServer(config or MockConfig(), clock=clock) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=10) as client,
    ):
        yield server, client
