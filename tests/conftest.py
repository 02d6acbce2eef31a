from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # The library runs on asyncio (the aiohttp transport and the openai SDK's default both need it).
    return "asyncio"
