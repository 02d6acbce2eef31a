"""The bulk run's progress lines and summary: what they show, read as the user (or a script) reads them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import orjson
import pytest

from scheduler.batch_api import BatchProgress, BatchRunStatistics
from scheduler.limits import Limits
from scheduler.pool import PoolStatistics
from scheduler.progress import Progress, RunCounts, endpoint_summary
from scheduler.results import Result
from scheduler.statistics import EndpointStatistics, ScopeStatistics

pytestmark = pytest.mark.anyio


def statistics(**figures: Any) -> PoolStatistics:
    fields: dict[str, Any] = dict(
        submitted=0, queued=0, in_flight=0, succeeded=0, failed=0, retries=0, rate_limited=0, attempts=0,
        prompt_tokens=0, completion_tokens=0, charged_tokens=0, requests_per_minute=0.0, tokens_per_minute=0.0,
        limits=None, token_ratio=1.0, truncated=0, cost_usd=0.0, stopped=None,
    )
    fields.update(figures)
    return PoolStatistics(**fields)


async def first_status_line(progress: Progress, stats: PoolStatistics, capsys: pytest.CaptureFixture[str]) -> Any:
    lines: list[str] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(progress.watch, lambda: stats)
        with anyio.fail_after(10):
            while not lines:
                await anyio.sleep(0.01)
                lines = [line for line in capsys.readouterr().err.splitlines() if line]
        tasks.cancel_scope.cancel()
    return orjson.loads(lines[0])


async def test_the_first_status_line_has_an_eta_the_pauses_and_the_servers_token_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = [100.0]
    counts = RunCounts(lines=100)
    progress = Progress(counts, title="t", live=False, interval_s=0.01, clock=lambda: now[0])
    counts.server_rpm, counts.server_tpm = 500, 150_000  # announced by the server's headers
    for _ in range(10):
        counts.add(Result(custom_id="x", endpoint="/v1/chat/completions", status=200, body={}), written=True)
    now[0] = 105.0  # 10 done in the first 5 seconds: 2 a second, 90 to go
    line = await first_status_line(progress, statistics(limits=Limits(rpm=600), pauses=3, rate_limited=4), capsys)
    assert line["event"] == "run_progress"
    assert (line["done"], line["total"], line["eta_s"]) == (10, 100, 45.0)
    assert (line["rpm_limit"], line["tpm_limit"]) == (600, 150_000)  # the one configured, else the server's
    assert (line["pauses"], line["rate_limited"]) == (3, 4)


async def test_quiet_shows_no_progress_and_only_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(RunCounts(lines=1), title="t", live=False, quiet=True, interval_s=0.01)
    await progress.watch(lambda: statistics())  # returns at once: nothing to show
    progress.say("Stopping", "run_stopping")
    progress.summary({"exit_code": 0}, "Done: every request succeeded")
    assert capsys.readouterr().err == ""
    progress.summary({"exit_code": 1}, "Done: 1 request(s) failed")
    assert capsys.readouterr().err == "scheduler run: Done: 1 request(s) failed\n"


def test_counts_tell_truncated_answers_and_jobs_not_run() -> None:
    counts = RunCounts(lines=3)
    cut = {"choices": [{"message": {"content": "a"}, "finish_reason": "length"}]}
    counts.add(Result(custom_id="a", endpoint="/v1/chat/completions", status=200, body=cut), written=True)
    counts.add(Result(custom_id="b", endpoint="/v1/chat/completions", status=200, body={}), written=True)
    counts.add(Result(custom_id="c", endpoint="/v1/chat/completions", status=None, body=None), written=False)
    assert (counts.succeeded, counts.truncated, counts.not_run, counts.done) == (2, 1, 1, 2)


def batch_statistics(*batches: BatchProgress) -> BatchRunStatistics:
    return BatchRunStatistics(requests=sum(b.total for b in batches), finished=0, succeeded=0, failed=0, skipped=0,
                              retried=0, refusals=1, cost_usd=0.0, requests_left=70, tokens_left=0,
                              batches=batches)


async def test_a_batch_run_shows_each_batch_and_the_cost_at_the_tier_that_served(
    capsys: pytest.CaptureFixture[str],
) -> None:
    counts = RunCounts(lines=100)
    batch = Result(custom_id="a", endpoint="/v1/chat/completions", status=200, body={}, cost_usd=0.5, tier="batch")
    counts.add(batch, written=True, standard_usd=1.0)
    progress = Progress(counts, title="t", live=False, interval_s=0.01)
    progress.tier = "batch"
    running = BatchProgress(2, "batch_b", "in_progress", 50, 20, 1)
    progress.follow_batches(lambda: batch_statistics(BatchProgress(1, "batch_a", "completed", 50, 50, 0), running))
    lines: list[str] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(progress.watch)
        with anyio.fail_after(10):
            while not lines:
                await anyio.sleep(0.01)
                lines = [line for line in capsys.readouterr().err.splitlines() if line]
        tasks.cancel_scope.cancel()
    line = orjson.loads(lines[0])
    assert line["tier"] == "batch" and line["cost_usd"] == 0.5 and line["batch_refusals"] == 1
    assert line["batches"][1] == {"part": 2, "batch_id": "batch_b", "status": "in_progress", "completed": 20,
                                  "failed": 1, "total": 50}
    assert "in_flight" not in line  # no pool: no online figures
    assert counts.cost_by_tier == {"batch": 0.5} and counts.standard_usd == 1.0


def test_the_live_display_lists_the_running_batches_first() -> None:
    from rich.console import Console

    progress = Progress(RunCounts(lines=10), title="t", live=False)
    progress.follow_batches(lambda: batch_statistics(
        *(BatchProgress(n, f"batch_{n}", "completed", 1, 1, 0) for n in range(1, 12)),
        BatchProgress(12, "batch_12", "in_progress", 5, 2, 0),
    ))
    console = Console(width=120, record=True)
    console.print(progress._render())
    text = console.export_text()
    assert "batch_12" in text and "in_progress" in text and "2/5 done" in text
    assert "4 more" in text and "11 of 12 ended" in text  # the first rows: the running one, then the ended


async def test_status_lines_show_each_endpoint_and_each_models_limits_and_the_combined_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    counts = RunCounts(lines=10)
    for name in ("a", "a", "b"):
        counts.add(Result(custom_id="x", endpoint="/v1/chat/completions", status=200, body={}, served_by=name),
                   written=True)
    endpoints = (
        EndpointStatistics("a", 3, 1, 0, "closed", None, "openai", None),
        EndpointStatistics("b", 2, 0, 0, "open", "b: the API reports the quota exhausted", "openai", None),
    )
    scopes = (ScopeStatistics("a", "gpt-4o-mini", Limits(rpm=500, tpm=1000), 1.0),
              ScopeStatistics("a", "gpt-4o", Limits(rpm=100, tpm=300), 1.0),
              ScopeStatistics("b", "gpt-4o-mini", Limits(rpm=900, tpm=9000), 1.0))
    progress = Progress(counts, title="t", live=False, interval_s=0.01)
    stats = statistics(limits=Limits(rpm=500), endpoints=endpoints, scopes=scopes)
    line = await first_status_line(progress, stats, capsys)
    assert line["endpoints"] == [
        {"name": "a", "answered": 2, "requests": 3, "failures": 1, "circuit": "closed"},
        {"name": "b", "answered": 1, "requests": 2, "failures": 0, "circuit": "open",
         "retired": "b: the API reports the quota exhausted"},
    ]
    assert [(s["endpoint"], s["model"], s["rpm_limit"]) for s in line["scopes"]] == [
        ("a", "gpt-4o-mini", 500), ("a", "gpt-4o", 100), ("b", "gpt-4o-mini", 900)]
    # The run works under the sum of its endpoints' limits (models are not summed: a server may hold one limit
    # for all), the retired endpoint's left out.
    assert (line["rpm_limit"], line["tpm_limit"]) == (500, 1000)
    live = statistics(limits=Limits(rpm=500), endpoints=(endpoints[0], replace(endpoints[1], retired=None)),
                      scopes=scopes)
    capsys.readouterr()
    again = Progress(counts, title="t", live=False, interval_s=0.01)
    assert (await first_status_line(again, live, capsys))["rpm_limit"] == 1400
    assert endpoint_summary(stats, counts) == line["endpoints"]
    assert endpoint_summary(statistics(endpoints=endpoints[:1]), counts) is None  # one endpoint: nothing to add
