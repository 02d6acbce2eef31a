"""The bulk run's progress lines and summary: what they show, read as the user (or a script) reads them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import orjson
import pytest

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
