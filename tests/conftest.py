from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture
def anyio_backend() -> str:
    # The library runs on asyncio (the aiohttp transport and the openai SDK's default both need it).
    return "asyncio"


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Tests that configure structlog (the CLI's set-up, the benchmarks') must not leak it into the next."""
    yield
    structlog.reset_defaults()
