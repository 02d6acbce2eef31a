"""Endpoints: several keys or servers as one pool, failover, Azure's short windows, and capacity held for urgent
work, each through ``scheduler run`` as users run it, against mock servers in their own processes.

Scenarios (each CLI run is a subprocess; ``--endpoints FILE`` names the keys and servers):

- ``two``: one mock server, two keys of ``--rpm`` each (their own buckets); efficiency against the combined
  minimum ``N / (2 * RPM)`` (target >= 0.95);
- ``quota``: two servers of ``--rpm`` each, the second's quota running out after ``--quota-after`` requests: 0
  failed (target), the second retired; efficiency against ``max((N - Q) / RPM, Q / RPM)``, what the two could do;
- ``errors``: two servers of ``--rpm`` each, the second answering every request 500: 0 failed (target);
  efficiency against ``N / RPM`` (the healthy one alone);
- ``azure``: one Azure-dialect server of ``--azure-rpm`` (its headers count a 10 s window: RPM / 6), limits
  learned from the headers; efficiency against ``N / RPM`` (target >= 0.95: the short window must not throttle);
- ``reserve``: one server of ``--reserve-rpm``, a bulk run at priority 5 saturating it (``scheduler run --redis
  URL --priority 5``) while this process submits a priority-0 request every half second through
  ``Pool(redis=URL)`` (the same key and limit, shared in Redis), with and without ``--reserve 0=0.2``: the
  priority-0 requests' waits (p50, p95, max; the mock answers at once, so a request's latency is its wait).

A run's time is from its first request leaving to its last result written (the summary says when both happened,
so start-up is apart). ``--runs N`` repeats every scenario; the report gives every run, the median and the worst.

Run: ``python benchmarks/bench_endpoints.py [--runs 5] [--scenarios two,quota,errors,azure,reserve]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import MODEL, RESULTS, machine, mock_server, percentile, private_redis, table, write_chats, write_json

SCENARIOS = ("two", "quota", "errors", "azure", "reserve")
KEYS = {"KEY_A": "sk-bench-a-0000000000aaaa", "KEY_B": "sk-bench-b-0000000000bbbb"}
TPM = 100_000_000  # far above what the runs send: requests bind


def endpoints_file(path: Path, *entries: dict[str, Any]) -> Path:
    lines = []
    for entry in entries:
        lines.append("[[endpoint]]")
        lines += [f"{name} = {json.dumps(value)}" for name, value in entry.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def run_cli(source: Path, output: Path, *args: str, timeout: float) -> dict[str, Any]:
    """One ``scheduler run``; its summary line, the lines written and the time from first request to end."""
    output.unlink(missing_ok=True)
    env = {**os.environ, **KEYS, "OPENAI_API_KEY": KEYS["KEY_A"]}
    env.pop("OPENAI_BASE_URL", None)
    command = [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(output), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    summary = next((json.loads(line) for line in done.stderr.splitlines() if '"run_summary"' in line), None)
    if summary is None:
        raise RuntimeError(f"no summary from scheduler run (exit {done.returncode}): {done.stderr[-2000:]}")
    lines = sum(1 for _ in output.open("rb")) if output.exists() else 0
    wall = summary["elapsed_s"] - (summary["first_request_s"] or 0.0)
    return {"summary": summary, "lines": lines, "wall_s": wall, "stderr": done.stderr}


def failover_row(name: str, run: int, result: dict[str, Any], minimum_s: float, requests: int) -> dict[str, Any]:
    summary = result["summary"]
    retired = [e["name"] for e in summary.get("endpoints") or () if e.get("retired")]
    complete = summary["failed"] == 0 and result["lines"] == requests
    return {"scenario": name, "run": run, "wall_s": round(result["wall_s"], 3), "minimum_s": round(minimum_s, 3),
            "efficiency": round(minimum_s / result["wall_s"], 4) if complete else None,
            "failed": summary["failed"], "lines": result["lines"], "429s": summary["rate_limited"],
            "retired": ",".join(retired) or None, "exit": summary["exit_code"]}


# ---------------------------------------------------------------------------- scenarios


def two(run: int, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    rpm = args.rpm
    keys = ["--key", f"{KEYS['KEY_A']}={rpm},{TPM}", "--key", f"{KEYS['KEY_B']}={rpm},{TPM}"]
    with mock_server(*keys, *latency(args)) as url:
        config = endpoints_file(folder / "two.toml",
                                {"base_url": url, "api_key_env": "KEY_A", "rpm": rpm, "tpm": TPM, "name": "a"},
                                {"base_url": url, "api_key_env": "KEY_B", "rpm": rpm, "tpm": TPM, "name": "b"})
        result = run_cli(folder / "in.jsonl", folder / "out.jsonl", "--endpoints", str(config), "--workers",
                         str(args.workers), timeout=args.timeout)
    return failover_row("two", run, result, 60.0 * args.requests / (2 * rpm), args.requests)


def quota(run: int, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    rpm, spent_after = args.rpm, args.quota_after
    with mock_server("--rpm", str(rpm), "--tpm", str(TPM), *latency(args)) as a, \
            mock_server("--rpm", str(rpm), "--tpm", str(TPM), "--quota-after", str(spent_after), *latency(args)) as b:
        config = endpoints_file(folder / "quota.toml",
                                {"base_url": a, "api_key_env": "KEY_A", "rpm": rpm, "tpm": TPM, "name": "steady"},
                                {"base_url": b, "api_key_env": "KEY_B", "rpm": rpm, "tpm": TPM, "name": "spent"})
        result = run_cli(folder / "in.jsonl", folder / "out.jsonl", "--endpoints", str(config), "--workers",
                         str(args.workers), timeout=args.timeout)
    minimum = 60.0 * max(args.requests - spent_after, spent_after) / rpm
    return failover_row("quota", run, result, minimum, args.requests)


def errors(run: int, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    rpm = args.rpm
    with mock_server("--rpm", str(rpm), "--tpm", str(TPM), *latency(args)) as a, \
            mock_server("--rpm", str(rpm), "--tpm", str(TPM), "--error-rate", "1", *latency(args)) as b:
        config = endpoints_file(folder / "errors.toml",
                                {"base_url": a, "api_key_env": "KEY_A", "rpm": rpm, "tpm": TPM, "name": "healthy"},
                                {"base_url": b, "api_key_env": "KEY_B", "rpm": rpm, "tpm": TPM, "name": "failing"})
        result = run_cli(folder / "in.jsonl", folder / "out.jsonl", "--endpoints", str(config), "--workers",
                         str(args.workers), timeout=args.timeout)
    failing = next(e for e in result["summary"]["endpoints"] if e["name"] == "failing")
    row = failover_row("errors", run, result, 60.0 * args.requests / rpm, args.requests)
    row["failing_requests"] = failing["requests"]
    return row


def azure(run: int, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    rpm = args.azure_rpm
    with mock_server("--dialect", "azure", "--rpm", str(rpm), "--tpm", str(TPM), *latency(args)) as url:
        # No limits given: learned from the headers, whose request count covers 10 s (RPM / 6).
        config = endpoints_file(folder / "azure.toml", {"base_url": url, "api_key_env": "KEY_A", "name": "azure"})
        result = run_cli(folder / "in.jsonl", folder / "out.jsonl", "--endpoints", str(config), "--workers",
                         str(args.workers), timeout=args.timeout)
    return failover_row("azure", run, result, 60.0 * args.requests / rpm, args.requests)


def reserve(run: int, folder: Path, args: argparse.Namespace, redis_url: str) -> list[dict[str, Any]]:
    rows = []
    rpm = args.reserve_rpm
    for reserved in (False, True):
        import redis

        with redis.Redis.from_url(redis_url) as connection:
            connection.flushdb()
        with mock_server("--rpm", str(rpm), "--tpm", str(TPM)) as url:
            extra = ["--reserve", "0=0.2"] if reserved else []
            command = [sys.executable, "-m", "scheduler", "run", str(folder / "bulk.jsonl"), "-o",
                       str(folder / "bulk-out.jsonl"), "--base-url", url, "--redis", redis_url, "--rpm", str(rpm),
                       "--tpm", str(TPM), "--priority", "5", "--workers", str(args.workers), *extra]
            (folder / "bulk-out.jsonl").unlink(missing_ok=True)
            env = {**os.environ, "OPENAI_API_KEY": KEYS["KEY_A"]}
            bulk = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                waits = asyncio.run(urgent(url, redis_url, rpm, args))
                _, err = bulk.communicate(timeout=args.timeout)
            finally:
                if bulk.poll() is None:
                    bulk.kill()
                    bulk.wait()
        summary = next(json.loads(line) for line in err.splitlines() if '"run_summary"' in line)
        rows.append({"scenario": "reserve" if reserved else "no-reserve", "run": run,
                     "p50_wait_s": round(percentile(waits, 50), 3), "p95_wait_s": round(percentile(waits, 95), 3),
                     "max_wait_s": round(max(waits), 3), "urgent": len(waits),
                     "bulk_wall_s": round(summary["elapsed_s"] - summary["first_request_s"], 3),
                     "bulk_minimum_s": round(60.0 * args.reserve_bulk / rpm, 3), "bulk_failed": summary["failed"]})
    return rows


async def urgent(base_url: str, redis_url: str, rpm: int, args: argparse.Namespace) -> list[float]:
    """The service: priority-0 requests through a pool sharing the bulk run's limit in Redis; their waits."""
    import openai
    import structlog

    import scheduler

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEYS["KEY_A"], http_client=openai.DefaultAioHttpClient())
    waits = []
    async with client, scheduler.Pool(client=client, model=MODEL, limits=scheduler.Limits(rpm=rpm, tpm=TPM),
                                      redis=redis_url) as pool:
        await asyncio.sleep(args.reserve_delay)  # the bulk run is under way and saturating the limit
        for _ in range(args.urgent):
            result = await pool.submit("Is the service still answering?", max_tokens=5, priority=0)
            waits.append(result.latency_s)
            await asyncio.sleep(0.5)
    return waits


def latency(args: argparse.Namespace) -> list[str]:
    return ["--latency-ms", str(args.latency_ms), "--latency-sigma", "0.3"]


# ---------------------------------------------------------------------------- report


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(row["scenario"] for row in rows):
        runs = [row for row in rows if row["scenario"] == name]
        if "efficiency" in runs[0]:
            effs = [row["efficiency"] or 0.0 for row in runs]
            out.append({"scenario": name, "runs": len(runs), "median_efficiency": round(statistics.median(effs), 4),
                        "worst_efficiency": round(min(effs), 4), "failed": sum(row["failed"] for row in runs),
                        "max_429s": max(row["429s"] for row in runs)})
        else:
            out.append({"scenario": name, "runs": len(runs),
                        "median_p95_wait_s": round(statistics.median(row["p95_wait_s"] for row in runs), 3),
                        "worst_max_wait_s": max(row["max_wait_s"] for row in runs),
                        "median_bulk_wall_s": round(statistics.median(row["bulk_wall_s"] for row in runs), 3),
                        "bulk_minimum_s": runs[0]["bulk_minimum_s"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--requests", type=int, default=2000, help="requests of each run (default 2000)")
    parser.add_argument("--rpm", type=int, default=3000, help="each endpoint's RPM (default 3000)")
    parser.add_argument("--quota-after", type=int, default=500, help="quota: requests before the quota runs out")
    parser.add_argument("--azure-rpm", type=int, default=6000, help="azure: the deployment's RPM (default 6000)")
    parser.add_argument("--reserve-rpm", type=int, default=3000, help="reserve: the shared limit (default 3000)")
    parser.add_argument("--reserve-bulk", type=int, default=1500, help="reserve: requests of the bulk run")
    parser.add_argument("--urgent", type=int, default=40, help="reserve: priority-0 requests, one each 0.5 s")
    parser.add_argument("--reserve-delay", type=float, default=3.0,
                        help="reserve: seconds after the bulk run starts before the first priority-0 request")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=RESULTS / "endpoints.json")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        write_chats(folder / "in.jsonl", args.requests, args.max_tokens)
        write_chats(folder / "bulk.jsonl", args.reserve_bulk, args.max_tokens)
        redis_url = stack.enter_context(private_redis()) if "reserve" in scenarios else ""
        for run in range(1, args.runs + 1):
            for name in scenarios:
                started = time.monotonic()
                found = reserve(run, folder, args, redis_url) if name == "reserve" else [
                    {"two": two, "quota": quota, "errors": errors, "azure": azure}[name](run, folder, args)]
                for row in found:
                    rows.append(row)
                    print(table([row], list(row)), f"  ({time.monotonic() - started:.0f} s)", flush=True)
    summary = summarize(rows)
    print()
    for name in dict.fromkeys(row["scenario"] for row in summary):
        line = [row for row in summary if row["scenario"] == name]
        print(table(line, list(line[0])))
        print()
    write_json(args.json, {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "rows": rows,
                           "summary": summary})


if __name__ == "__main__":
    main()
