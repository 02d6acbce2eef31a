"""Throughput of the mock server: a raw aiohttp client at fixed concurrency against a subprocess mock.

Usage: python benchmarks/bench_mock_server.py [--requests 5000] [--concurrency 64] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson
from common import mock_server, stats


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

    # The mock in its own process, so client and server do not share one event loop.
    with mock_server("--rpm", "10000000", "--tpm", "10000000000") as base_url:
        elapsed, failures = await drive(base_url, args.requests, args.concurrency, args.stream)
        seen = stats(base_url)
    mode = "stream" if args.stream else "json"
    print(
        f"{args.requests} requests ({mode}) at concurrency {args.concurrency}: {elapsed:.2f} s, "
        f"{args.requests / elapsed:,.0f} req/s, {failures} non-200; server saw {seen['ok']} ok"
    )


if __name__ == "__main__":
    asyncio.run(main())
