"""Faults: the efficiency run with every fault at once; nothing may be lost, written twice or hang.

The workload of ``bench_efficiency.py`` (N chat completions, ``max_tokens=50``, prompts of 20-60 words; a mock
server in its own process enforcing RPM/TPM with one-second quantization, lognormal latency around 200 ms), with
the mock injecting faults at rates (``--fault NAME=RATE``), two ways:

- ``cli``: ``scheduler run IN -o OUT --base-url URL --rpm R --tpm T`` in a child process, as users run it. The
  CLI does not stream, so its faults are 5xx, dropped connections, HTML pages and JSON of the wrong shape answered
  with status 200, slow answers and garbage rate-limit headers. Read from the output file: requests lost (input
  ids missing from the output), duplicate lines, failed lines; a hang is the child still running at a hard time
  limit (it is killed).
- ``library``: ``scheduler.Pool`` in this process, every request a ``pool.stream()``, so the stream faults are
  exercised too: connections cut mid-stream, streams that end without a finish reason, SSE error events of both
  forms, before and after the first delta. A stream that broke after text reached its reader fails with
  ``stream_incomplete`` by design (repeating text already shown would be worse): those are counted apart, and
  must equal the mid-stream faults the mock injected. Duplicates here are streams whose text came twice.
- ``cli_baseline``: the ``cli`` run without faults, to tell the cost of the faults from the CLI's start-up.

Efficiency is the theoretical minimum, ``max(N / RPM, server-counted tokens / TPM)`` minutes (the tokens include
retried attempts: the server charged them against the limit), over the wall time; for ``cli`` the wall time is
the child's whole life, start-up and exit included. ``--runs N`` repeats each way with a fresh mock (seeded with
the run's number) and reports the median and the worst run.

Usage: python benchmarks/bench_faults.py [--requests 2000] [--runs 3] [--ways cli,library,cli_baseline] [--rpm 6000]
           [--tpm 600000] [--latency-ms 200] [--slow-ms 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from common import MODEL, RESULTS, chat_line, machine, mock_server, prompts, quiet_logs, reset, stats, table, write_json

#: What the CLI's requests meet (the CLI does not stream): shares of admitted requests.
CLI_FAULTS: dict[str, float] = {
    "server_error": 0.02, "drop": 0.01, "html": 0.01, "bad_shape": 0.005, "slow": 0.02, "headers_garbage": 0.01,
}
#: What the library's streams meet: the same, and every way a stream breaks (shares of streamed requests).
STREAM_FAULTS: dict[str, float] = {
    **CLI_FAULTS, "stream_cut": 0.01, "stream_truncated": 0.005, "stream_error": 0.005, "stream_error_event": 0.005,
    "stream_error_first": 0.005,
}
#: Stream faults that strike after deltas went out: each must end its stream as stream_incomplete.
MID_STREAM = ("stream_cut", "stream_truncated", "stream_error", "stream_error_event")
#: the faults of each way: ``cli_baseline`` is the CLI's run with none, what the faults' cost is measured against
WAY_FAULTS: dict[str, dict[str, float]] = {"cli": CLI_FAULTS, "library": STREAM_FAULTS, "cli_baseline": {}}
WAYS = tuple(WAY_FAULTS)
WORKERS = 128


@dataclass(frozen=True, slots=True)
class Workload:
    """One run's server, faults and workload."""

    requests: int = 2000
    rpm: int = 6000
    tpm: int = 600_000
    latency_ms: float = 200.0
    latency_sigma: float = 0.3
    max_tokens: int = 50
    slow_ms: float = 2000.0
    seed: int = 0
    faults: Mapping[str, float] = field(default_factory=lambda: dict(CLI_FAULTS))

    def mock_args(self) -> list[str]:
        args = ["--rpm", str(self.rpm), "--tpm", str(self.tpm), "--latency-ms", str(self.latency_ms),
                "--latency-sigma", str(self.latency_sigma), "--slow-ms", str(self.slow_ms), "--seed", str(self.seed)]
        for name, rate in self.faults.items():
            args += ["--fault", f"{name}={rate}"]
        return args

    def time_limit_s(self) -> float:
        """A hard bound on one run: past it the run counts as a hang."""
        return 60.0 + 4 * 60.0 * max(self.requests / self.rpm, self.requests * 150 / self.tpm)


def write_input(path: Path, texts: Sequence[str], max_tokens: int) -> list[str]:
    """A Batch API input of ``texts``; returns the custom_ids."""
    ids = [f"request-{i}" for i in range(len(texts))]
    with path.open("wb") as out:
        for custom_id, text in zip(ids, texts, strict=True):
            out.write(chat_line(custom_id, text, max_tokens))
    return ids


def read_output(path: Path, ids: Sequence[str]) -> dict[str, Any]:
    """Lost, duplicate and failed lines of a Batch API output, and the codes of the failures."""
    seen: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    torn = 0
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                torn += 1
                continue
            seen[record["custom_id"]] += 1
            if record.get("error"):
                codes[str(record["error"].get("code"))] += 1
    return {"lost": sum(1 for i in ids if i not in seen), "duplicates": sum(n - 1 for n in seen.values() if n > 1),
            "failed": sum(codes.values()), "failures": dict(codes), "torn_lines": torn}


def run_cli(w: Workload, base_url: str, folder: Path) -> dict[str, Any]:
    """One bulk run of the CLI in a child process; its figures."""
    source, output = folder / "input.jsonl", folder / "output.jsonl"
    ids = write_input(source, prompts(w.requests), w.max_tokens)
    output.unlink(missing_ok=True)
    command = [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(output), "--base-url", base_url,
               "--rpm", str(w.rpm), "--tpm", str(w.tpm)]
    env = {**os.environ, "OPENAI_API_KEY": "mock"}
    reset(base_url)
    began = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hang = False
    try:
        _, stderr = proc.communicate(timeout=w.time_limit_s())
    except subprocess.TimeoutExpired:
        hang = True
        proc.kill()
        _, stderr = proc.communicate()
    wall = time.perf_counter() - began
    summary = _summary(stderr)
    figures = read_output(output, ids)
    return {"exit_code": proc.returncode, "hang": hang, "wall_s": wall,
            "first_request_s": summary.get("first_request_s"), **figures}


def _summary(stderr: bytes) -> dict[str, Any]:
    """The CLI's run_summary line (it writes JSON lines when not on a terminal)."""
    for line in reversed(stderr.splitlines()):
        if b'"run_summary"' in line:
            try:
                return dict(orjson.loads(line))
            except orjson.JSONDecodeError:
                break
    return {}


async def run_library(w: Workload, base_url: str) -> dict[str, Any]:
    """Every request a ``pool.stream()`` through one pool; its figures."""
    import openai

    import scheduler

    texts = prompts(w.requests)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="mock", http_client=openai.DefaultAioHttpClient())
    pool = scheduler.Pool(client=client, model=MODEL, limits=scheduler.Limits(rpm=w.rpm, tpm=w.tpm), workers=WORKERS)
    codes: collections.Counter[str] = collections.Counter()
    duplicates = 0

    async def one(text: str) -> None:
        nonlocal duplicates
        stream = pool.stream(text, max_tokens=w.max_tokens)
        deltas: list[str] = []
        try:
            async for delta in stream:
                deltas.append(delta)
        except scheduler.JobError as exc:
            codes[exc.code] += 1
            delivered = "".join(deltas)
        else:
            assert stream.result is not None
            delivered = "".join(deltas)
            if delivered != stream.result.text:
                duplicates += 1
        # A retry after text went out would show the reply's opening twice.
        if delivered.count("Mock reply:") > 1:
            duplicates += 1

    async with client, pool:
        reset(base_url)
        began = time.perf_counter()
        tasks = [asyncio.ensure_future(one(text)) for text in texts]
        done, pending = await asyncio.wait(tasks, timeout=w.time_limit_s())
        wall = time.perf_counter() - began
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    crashed = sum(1 for t in done if not t.cancelled() and t.exception() is not None)
    return {"exit_code": None, "hang": bool(pending), "wall_s": wall, "first_request_s": None,
            "lost": len(pending) + crashed, "duplicates": duplicates, "failed": sum(codes.values()),
            "failures": dict(codes), "torn_lines": 0}


def run_once(way: str, w: Workload) -> dict[str, Any]:
    """One run of one way against a fresh mock; the row of figures."""
    with mock_server(*w.mock_args()) as base_url:
        if way.startswith("cli"):
            with tempfile.TemporaryDirectory(prefix="bench-faults-") as folder:
                outcome = run_cli(w, base_url, Path(folder))
        else:
            outcome = asyncio.run(run_library(w, base_url))
        seen = stats(base_url)
    return _row(way, w, outcome, seen)


def _row(way: str, w: Workload, outcome: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
    minimum = 60.0 * max(w.requests / w.rpm, seen["admitted_tokens"] / w.tpm)
    faults = seen["faults"]
    mid_stream = sum(faults.get(name, 0) for name in MID_STREAM)
    incomplete = outcome["failures"].get("stream_incomplete", 0)
    # Failures the design does not allow: any but the streams that broke after output began (library only).
    unexpected = outcome["failed"] - (min(incomplete, mid_stream) if way == "library" else 0)
    return {
        "way": way,
        "seed": w.seed,
        "requests": w.requests,
        "wall_s": round(outcome["wall_s"], 3),
        "minimum_s": round(minimum, 3),
        "efficiency": round(minimum / outcome["wall_s"], 4),
        "lost": outcome["lost"],
        "duplicates": outcome["duplicates"],
        "failed": unexpected,
        "stream_incomplete": incomplete if way == "library" else None,
        "mid_stream_faults": mid_stream if way == "library" else None,
        "hang": outcome["hang"],
        "429s": seen["rate_limited"],
        "retries": seen["requests"] - w.requests,
        "faults_injected": sum(faults.values()),
        "faults": faults,
        "failures": outcome["failures"],
        "torn_lines": outcome["torn_lines"],
        "exit_code": outcome["exit_code"],
        "first_request_s": outcome["first_request_s"],
    }


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per way: the median and the worst run (lowest efficiency), with the totals that must be zero."""
    out = []
    for way in dict.fromkeys(row["way"] for row in rows):
        runs = [row for row in rows if row["way"] == way]
        worst = min(runs, key=lambda row: row["efficiency"])
        out.append({
            "way": way, "runs": len(runs), "requests": runs[0]["requests"],
            "efficiency_median": round(statistics.median(row["efficiency"] for row in runs), 4),
            "efficiency_worst": worst["efficiency"],
            "wall_s_median": round(statistics.median(row["wall_s"] for row in runs), 3),
            "wall_s_worst": round(max(row["wall_s"] for row in runs), 3),
            "lost": sum(row["lost"] for row in runs), "duplicates": sum(row["duplicates"] for row in runs),
            "failed": sum(row["failed"] for row in runs), "hangs": sum(row["hang"] for row in runs),
            "429s_worst": max(row["429s"] for row in runs),
            "retries_median": statistics.median(row["retries"] for row in runs),
            "faults_median": statistics.median(row["faults_injected"] for row in runs),
        })
    return out


COLUMNS = ("way", "seed", "wall_s", "minimum_s", "efficiency", "lost", "duplicates", "failed", "stream_incomplete",
           "mid_stream_faults", "hang", "429s", "retries", "faults_injected")
SUMMARY = ("way", "runs", "efficiency_median", "efficiency_worst", "wall_s_median", "wall_s_worst", "lost",
           "duplicates", "failed", "hangs", "429s_worst", "retries_median", "faults_median")


def run(ways: Sequence[str], base: Workload, runs: int, fault_scale: float = 1.0) -> dict[str, Any]:
    """``runs`` runs of each way, fault rates times ``fault_scale``; the rows and their summary."""
    quiet_logs(logging.ERROR)
    rows = []
    for way in ways:
        faults = {name: min(1.0, rate * fault_scale) for name, rate in WAY_FAULTS[way].items()}
        for seed in range(runs):
            w = dataclasses.replace(base, seed=seed, faults=faults)
            rows.append(run_once(way, w))
            lines = table(rows[-1:], COLUMNS).splitlines()
            print("\n".join(lines if len(rows) == 1 else lines[2:]), flush=True)
    return {"machine": machine(), "workload": dataclasses.asdict(base), "fault_scale": fault_scale,
            "faults": WAY_FAULTS, "rows": rows, "summary": summarize(rows)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"some of {','.join(WAYS)}")
    parser.add_argument("--rpm", type=int, default=6000)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--slow-ms", type=float, default=2000.0, help="extra latency of a slow answer")
    parser.add_argument("--fault-scale", type=float, default=1.0, help="multiply every fault rate by this")
    parser.add_argument("--json", type=Path, default=RESULTS / "faults.json")
    args = parser.parse_args(argv)
    ways = [way for way in args.ways.split(",") if way]
    if set(ways) - set(WAYS) or args.runs < 1:
        parser.error(f"--ways takes some of {','.join(WAYS)}; --runs at least 1")
    base = Workload(requests=args.requests, rpm=args.rpm, tpm=args.tpm, latency_ms=args.latency_ms,
                    slow_ms=args.slow_ms)
    done = run(ways, base, args.runs, args.fault_scale)
    print(table(done["summary"], SUMMARY))
    write_json(args.json, done)
    print(f"results: {args.json}")
    return done


if __name__ == "__main__":
    main()
