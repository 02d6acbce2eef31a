"""Embeddings coalescing through the CLI: one-text embeddings lines, coalesced (the default) and not.

The mock server runs in its own process with OpenAI's tier-1 limits of text-embedding-3-small (3,000 RPM,
1,000,000 TPM), quantized per second and answering 429s as OpenAI does. The same input of one-text embeddings
lines runs through ``scheduler run IN -o OUT --base-url ... --rpm 3000 --tpm 1000000``, with and without
``--no-coalesce``. Reported: wall time from the first request to the last result, requests the server saw, its
429s, failed lines, and lines whose vector is not the one the mock computes for their text (0 expected).

One text per request, the run is bound by the request limit: N / 3,000 minutes (20,000 lines: 400 s). Coalesced,
it is bound by the token limit (or by a few requests).

Run: ``python benchmarks/bench_embeddings.py [--lines 20000] [--runs 1] [--modes coalesced,single]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from common import RESULTS, machine, mock_server, reset, stats, table, write_json

from scheduler.mock import embedding_of

MODEL = "text-embedding-3-small"


def write_input(path: Path, count: int) -> list[str]:
    """``count`` one-text embeddings lines (short texts, as a pipeline of titles or sentences sends)."""
    texts = [f"document {i}: a short sentence to embed, number {i * 7919 % 10007}" for i in range(count)]
    with path.open("wb") as file:
        for i, text in enumerate(texts):
            file.write(orjson.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                     "body": {"model": MODEL, "input": text}}) + b"\n")
    return texts


def run_once(base_url: str, source: Path, texts: list[str], folder: Path, mode: str, args: argparse.Namespace
             ) -> dict[str, Any]:
    reset(base_url)
    out = folder / f"out-{mode}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "scheduler", "run", str(source), "-o", str(out), "--base-url", base_url,
           "--rpm", str(args.rpm), "--tpm", str(args.tpm)]
    if mode == "single":
        cmd.append("--no-coalesce")
    started = time.time()
    done = subprocess.run(cmd, env={**os.environ, "OPENAI_API_KEY": "mock-key"}, capture_output=True, text=True,
                          timeout=args.timeout, check=False)
    summary = next(json.loads(line) for line in done.stderr.splitlines() if '"run_summary"' in line)
    seen = stats(base_url)
    wrong = lines = 0
    for raw in out.open("rb"):
        record = orjson.loads(raw)
        lines += 1
        if record["error"] is not None:
            continue
        vector = record["response"]["body"]["data"][0]["embedding"]
        text = texts[int(record["custom_id"][1:])]
        wrong += not all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(vector, embedding_of(text), strict=True))
    return {
        "mode": mode, "wall_s": round(summary["elapsed_s"] - summary["first_request_s"], 3),
        "requests": seen["requests"], "inputs_per_request": round(args.lines / max(1, seen["ok"]), 1),
        "429s": seen["rate_limited"], "failed": summary["failed"], "lines": lines, "wrong_vectors": wrong,
        "prompt_tokens": seen["prompt_tokens"], "exit_code": done.returncode, "started": started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--modes", default="coalesced,single")
    parser.add_argument("--rpm", type=int, default=3_000)
    parser.add_argument("--tpm", type=int, default=1_000_000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--timeout", type=float, default=1_800.0)
    parser.add_argument("--json", type=Path, default=RESULTS / "embeddings.json")
    args = parser.parse_args()
    mock_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency-ms", str(args.latency_ms)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, mock_server(*mock_args) as base_url:
        folder = Path(tmp)
        source = folder / "in.jsonl"
        texts = write_input(source, args.lines)
        for run in range(1, args.runs + 1):
            for mode in args.modes.split(","):
                row = {"run": run, **run_once(base_url, source, texts, folder, mode, args)}
                rows.append(row)
                print(table([row], ("mode", "run", "wall_s", "requests", "inputs_per_request", "429s", "failed",
                                    "lines", "wrong_vectors")), flush=True)
    summary = []
    for mode in args.modes.split(","):
        walls = [row["wall_s"] for row in rows if row["mode"] == mode]
        requests = [row["requests"] for row in rows if row["mode"] == mode]
        summary.append({"mode": mode, "runs": len(walls), "median_wall_s": statistics.median(walls),
                        "worst_wall_s": max(walls), "median_requests": statistics.median(requests),
                        "worst_requests": max(requests)})
    print()
    print(table(summary, ("mode", "runs", "median_wall_s", "worst_wall_s", "median_requests", "worst_requests")))
    if len(summary) == 2:
        print(f"\ncoalesced / single: time {summary[0]['median_wall_s'] / summary[1]['median_wall_s']:.4f}, "
              f"requests {summary[0]['median_requests'] / summary[1]['median_requests']:.4f}")
    write_json(args.json, {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "runs": rows,
                           "summary": summary})


if __name__ == "__main__":
    main()
