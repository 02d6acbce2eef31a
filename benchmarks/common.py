"""Shared pieces of the benchmarks: a mock server in its own process, its counters, workloads, small stats."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

HERE = Path(__file__).resolve().parent
#: where figures go (git-ignored)
RESULTS = HERE / "results"
MODEL = "gpt-4o-mini"
WORDS = (
    "token", "bucket", "rate", "limit", "request", "latency", "throughput", "queue", "priority", "worker", "retry",
    "backoff", "jitter", "model", "prompt", "answer", "budget", "cost", "header", "window", "minute", "second",
    "burst", "server", "client",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mock_server(*args: str) -> Iterator[str]:
    """Run ``python -m scheduler.mock`` with ``args`` in its own process (its own core); yield its base URL."""
    with mock_process(*args) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def mock_process(*args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """:func:`mock_server`, also yielding the process (to read its CPU time or memory)."""
    port = free_port()
    cmd = [sys.executable, "-m", "scheduler.mock", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()  # the server prints its base URL once it listens
        if "http://" not in line:
            raise RuntimeError(f"mock server did not start: {line!r}")
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server on a free loopback port, no persistence, for the benchmark's life; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(500):
                with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(url) as connection:
                    connection.ping()
                    break
                time.sleep(0.02)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def stats(base_url: str) -> dict[str, Any]:
    """The mock's counters (GET /stats): requests, ok, rate_limited, admitted_tokens, timeline..."""
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/stats", timeout=10) as response:
        return orjson.loads(response.read())  # type: ignore[no-any-return]


def reset(base_url: str) -> None:
    """Zero the mock's counters and refill its buckets, so each client starts alike."""
    root = base_url.removesuffix("/v1")
    request = urllib.request.Request(f"{root}/stats/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def prompts(count: int, seed: int = 0, words: tuple[int, int] = (20, 60)) -> list[str]:
    """Varied prompts of ``words`` words (about 5 characters each), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(count)]


def chat_line(custom_id: str, text: str, max_tokens: int, model: str = MODEL) -> bytes:
    """One Batch API input line: a chat completion of ``text`` as the user's message."""
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body},
                        option=orjson.OPT_APPEND_NEWLINE)


def write_chats(path: Path, count: int, max_tokens: int, model: str = MODEL) -> None:
    """``count`` chat lines (prompts of 20-60 words, ids ``r000000`` on) in a Batch API input file."""
    with path.open("wb") as file:
        for i, text in enumerate(prompts(count)):
            file.write(chat_line(f"r{i:06d}", text, max_tokens, model))


def quiet_logs(level: int = logging.WARNING) -> None:
    """Drop the library's log events below ``level`` before they are built (as a production setup would)."""
    # Not cached on first use: run_all.py sets a different level per benchmark in one process.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` (0..100) percentile by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine() -> dict[str, Any]:
    """Where and on what the figures were measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date": datetime.date.today().isoformat(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "commit": commit,
        "load_average": os.getloadavg(),
    }


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table of ``rows`` (dicts) with the given columns; floats get 3 significant decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return "-" if value is None else str(value)

    cells = [[cell(row.get(name)) for name in columns] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) if cells else len(name)
              for i, name in enumerate(columns)]
    lines = ["  ".join(name.ljust(w) for name, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
              for line in cells]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
