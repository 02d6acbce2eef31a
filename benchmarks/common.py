"""Shared pieces of the benchmarks: a mock server in its own process, its counters, a workload."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson

WORDS = ("token bucket rate limit request latency throughput queue priority worker retry backoff jitter "
         "model prompt answer budget cost header window minute second burst server client").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mock_server(*args: str) -> Iterator[str]:
    """Run ``python -m scheduler.mock`` with ``args`` in its own process (its own core); yield its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "scheduler.mock", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()  # the server prints its base URL once it listens
        if "http://" not in line:
            raise RuntimeError(f"mock server did not start: {line!r}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


def stats(base_url: str) -> dict[str, Any]:
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/stats", timeout=10) as response:
        return orjson.loads(response.read())  # type: ignore[no-any-return]


def reset(base_url: str) -> None:
    root = base_url.removesuffix("/v1")
    request = urllib.request.Request(f"{root}/stats/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def prompts(count: int, seed: int = 0, words: tuple[int, int] = (20, 60)) -> list[str]:
    """Varied prompts of ``words`` words (about 5 characters each), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(count)]
