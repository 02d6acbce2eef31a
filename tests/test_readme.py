"""The README's service example runs as written, against the mock server."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import anyio
import pytest

from scheduler.mock import MockConfig, MockServer

README = Path(__file__).parent.parent / "README.md"


@pytest.mark.anyio
async def test_the_service_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "scheduler.Pool(" in block)
    async with MockServer(MockConfig(rpm=500, tpm=200_000)) as server:
        # AsyncOpenAI() reads its URL and key from the environment, as it would in a user's service.
        env = {**os.environ, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-readme-example"}
        done = await anyio.run_process([sys.executable, "-c", example], env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Unclosed" not in done.stderr  # the example closes its client (and so its connections)
    output = done.stdout.decode()
    assert "Usage(prompt_tokens=" in output and "Mock reply" in output
