"""The benchmarks run, at sizes small enough for CI: they complete and report figures. No timing is asserted."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """The benchmark modules (they import each other by module name, as scripts do)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_efficiency
        import bench_faults
        import bench_memory
        import bench_overhead
        import loadtest
        import run_all

        yield {"efficiency": bench_efficiency, "memory": bench_memory, "overhead": bench_overhead,
               "loadtest": loadtest, "run_all": run_all, "faults": bench_faults}
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_overhead_reports_jobs_per_second(bench: dict[str, ModuleType]) -> None:
    overhead = bench["overhead"]
    common = sys.modules["common"]
    common.quiet_logs()
    figures: dict[str, Any] = asyncio.run(overhead.via_map(common.prompts(2000), 64))
    assert figures["done"] == figures["sent"] == 2000
    assert figures["jobs_per_s"] > 0
    estimates = overhead.estimate_cost(count=50)
    assert all(row["tiktoken_us"] > 0 and row["cache_hit_us"] > 0 for row in estimates)


def test_efficiency_scheduler_client_completes(bench: dict[str, ModuleType]) -> None:
    efficiency = bench["efficiency"]
    sys.modules["common"].quiet_logs()
    workload = efficiency.Workload(requests=100, rpm=600_000, tpm=100_000_000, latency_ms=0.0, latency_sigma=0.0)
    variant = efficiency.run_variant("base", workload, ["scheduler"], sys.modules["common"].prompts(100))
    (row,) = variant["rows"]
    assert row["failed"] == 0 and row["429s"] == 0
    assert row["wall_s"] > 0 and row["efficiency"] is not None
    assert row["server_tokens"] > 0
    assert variant["timelines"]["scheduler"]
    summary = bench["run_all"].summarize({"efficiency": [variant]})
    assert summary[0]["figure"].startswith("limit efficiency")


def test_faults_run_loses_nothing_and_writes_nothing_twice(bench: dict[str, ModuleType]) -> None:
    faults = bench["faults"]
    base = faults.Workload(requests=60, rpm=600_000, tpm=100_000_000, latency_ms=0.0, latency_sigma=0.0,
                           slow_ms=50.0)
    # Three times the benchmark's fault rates: a run this small still meets a few faults of each kind.
    done = faults.run(["cli", "library"], base, runs=1, fault_scale=3.0)
    assert [row["way"] for row in done["rows"]] == ["cli", "library"]
    for row in done["rows"]:
        assert (row["lost"], row["duplicates"], row["failed"], row["hang"], row["torn_lines"]) == (0, 0, 0, False, 0)
        assert row["faults_injected"] > 0 and row["efficiency"] > 0
    cli, library = done["rows"]
    assert cli["exit_code"] == 0
    assert library["stream_incomplete"] == library["mid_stream_faults"]
    assert [line["way"] for line in done["summary"]] == ["cli", "library"]


def test_efficiency_plot_is_written(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    timeline = [{"t": t, "requests": 10, "tokens": 1000, "rate_limited": 0} for t in range(3)]
    row = {"client": "scheduler", "wall_s": 3.0, "429s": 0, "failed": 0, "minimum_s": 3.0}
    variant = {"workload": {"requests": 30, "rpm": 600, "tpm": 60_000, "latency_ms": 0.0},
               "rows": [row], "timelines": {"scheduler": timeline}}
    bench["efficiency"].plot(variant, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_loadtest_closed_loop_against_the_mock(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    argv = ["--mock", "--concurrency", "4", "--requests", "20", "--json", str(tmp_path / "l.json")]
    out = bench["loadtest"].main(argv)
    assert out["ok"] == 20 and out["errors"] == 0
    assert out["latency_p50_ms"] is not None
    assert (tmp_path / "l.json").exists()


def test_memory_measure_reads_a_childs_peak(bench: dict[str, ModuleType]) -> None:
    # The peak is sampled while the child runs: it holds its memory for a moment.
    command = [sys.executable, "-c", "import time; block = bytearray(64 * 2**20); block[::4096] = "
               "b'x' * len(block[::4096]); time.sleep(0.5)"]
    figures = bench["memory"].measure(command, dict(os.environ), rss_limit_mib=4096)
    assert figures["exit_code"] == 0
    assert figures["peak_rss_mib"] >= 64


def test_litellm_benchmark_says_how_to_set_up_without_its_environment(tmp_path: Path) -> None:
    # LiteLLM is no dependency: without its environment the benchmark stops with the command that creates it.
    script = BENCHMARKS / "bench_litellm.py"
    env = {**os.environ, "LITELLM_PYTHON": str(tmp_path / "missing" / "python")}
    done = subprocess.run([sys.executable, str(script), "--requests", "1"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 2
    assert "bash benchmarks/litellm/setup.sh" in done.stderr
    assert "Traceback" not in done.stderr


def test_litellm_config_limits_are_rewritten(bench: dict[str, ModuleType]) -> None:
    import bench_litellm

    text = bench_litellm.config_text(bench_litellm.DEFAULT_CONFIG, tpm=100)
    assert "      tpm: 100\n" in text and "      rpm: 600\n" in text
    assert bench_litellm.master_key(text).startswith("sk-")


def test_tiers_benchmark_reports_cost_and_time_per_tier(tmp_path: Path) -> None:
    result = tmp_path / "tiers.json"
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_tiers.py"), "--requests", "40", "--tiers", "standard,batch",
         "--batch-size", "20", "--batch-lines-per-s", "200", "--latency-ms", "5", "--json", str(result)],
        capture_output=True, text=True, env=env, cwd=BENCHMARKS, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["tier"]: row for row in orjson.loads(result.read_bytes())["rows"]}
    assert rows["standard"]["served"] == "standard 40" and rows["batch"]["served"] == "batch 40"
    assert rows["batch"]["vs_standard"] == "-50%" and rows["batch"]["batches_created"] == 2
    assert rows["batch"]["online_requests"] == 0 and rows["batch"]["duplicate_lines"] == 0


def test_embeddings_benchmark_reports_both_modes(tmp_path: Path) -> None:
    result = tmp_path / "embeddings.json"
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_embeddings.py"), "--lines", "60", "--rpm", "60000",
         "--latency-ms", "5", "--json", str(result)],
        capture_output=True, text=True, env=env, cwd=BENCHMARKS, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["mode"]: row for row in orjson.loads(result.read_bytes())["runs"]}
    assert rows["single"]["requests"] == 60 and rows["coalesced"]["requests"] < 60
    assert all(row["lines"] == 60 and row["failed"] == row["wrong_vectors"] == 0 for row in rows.values())


def test_shared_limit_benchmark_runs_through_the_cli(tmp_path: Path) -> None:
    result = tmp_path / "shared.json"
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_shared_limit.py"), "--runs", "1", "--setups", "local,quarter4",
         "--requests", "40", "--rpm", "60000", "--tpm", "10000000", "--latency-ms", "5", "--json", str(result)],
        capture_output=True, text=True, env=env, cwd=BENCHMARKS, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["setup"]: row for row in orjson.loads(result.read_bytes())["rows"]}
    assert rows["local"]["lines"] == rows["quarter4"]["lines"] == 40
    assert rows["local"]["failed"] == rows["quarter4"]["failed"] == 0


def test_endpoints_benchmark_runs_two_endpoints_through_the_cli(tmp_path: Path) -> None:
    result = tmp_path / "endpoints.json"
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_endpoints.py"), "--runs", "1", "--scenarios", "two,errors",
         "--requests", "40", "--rpm", "60000", "--latency-ms", "5", "--json", str(result)],
        capture_output=True, text=True, env=env, cwd=BENCHMARKS, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["scenario"]: row for row in orjson.loads(result.read_bytes())["rows"]}
    assert all(row["lines"] == 40 and row["failed"] == 0 for row in rows.values())
    assert rows["errors"]["failing_requests"] > 0  # the failing endpoint was tried, and routed around
