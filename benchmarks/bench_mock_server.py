"""Throughput of the mock server: a raw aiohttp client at fixed concurrency against a subprocess mock.

Usage: python benchmarks/bench_mock_server.py [--requests 5000] [--concurrency 64] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

import aiohttp
import orjson


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mock(port: int) -> subprocess.Popen[bytes]:
    """Start the mock in its own process (so client and server do not share one event loop)."""
    cmd = [sys.executable, "-m", "scheduler.mock", "--port", str(port)]
    cmd += ["--rpm", "10000000", "--tpm", "10000000000"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()  # the server prints its base URL once it listens
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"mock server did not start: {line!r}")
    return proc


async def drive(base_url: str, total: int, concurrency: int, stream: bool) -> tuple[float, int]:
    """Send `total` chat completions, `concurrency` at a time; return (seconds, non-200 count)."""
    body = orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "A benchmark prompt of a modest length."}],
            "max_tokens": 16,
            "stream": stream,
        }
    )
    headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
    url = f"{base_url}/chat/completions"
    failures = 0
    remaining = total

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures, remaining
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                failures += r.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm up the connection pool so the timing measures steady state.
        remaining = concurrency
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        remaining, failures = total, 0
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - start, failures


async def main() -> None:
    parser = argparse.ArgumentParser(description="Throughput of the mock server.")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="request SSE streams")
    args = parser.parse_args()

    port = free_port()
    proc = start_mock(port)
    try:
        base = f"http://127.0.0.1:{port}"
        elapsed, failures = await drive(f"{base}/v1", args.requests, args.concurrency, args.stream)
        async with aiohttp.ClientSession() as session, session.get(f"{base}/stats") as r:
            stats = await r.json()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    mode = "stream" if args.stream else "json"
    print(
        f"{args.requests} requests ({mode}) at concurrency {args.concurrency}: {elapsed:.2f} s, "
        f"{args.requests / elapsed:,.0f} req/s, {failures} non-200; server saw {stats['ok']} ok"
    )


if __name__ == "__main__":
    asyncio.run(main())
