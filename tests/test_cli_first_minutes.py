"""The traps of a newcomer's first runs of `scheduler run`, and the habits of the people who use it: each one run
as a subprocess against the mock server."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import orjson
import pytest
from test_cli import REPO, command, env, id_counts, line_count, read_output, run, summary, write_input

from scheduler.mock import MockConfig, MockServer

pytestmark = pytest.mark.anyio


def write_raw(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


# ---------------------------------------------------------------------------------------------- the budget


async def test_the_budget_belongs_to_the_job_a_rerun_counts_what_was_spent(tmp_path: Path) -> None:
    source, output, prices = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "prices.json"
    ids = write_input(source, 40)
    # A dollar per thousand tokens: each request reserves a few cents, so $0.50 runs only some of them.
    prices.write_bytes(orjson.dumps({"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}))
    async with MockServer(MockConfig(rpm=60_000, tpm=10_000_000)) as mock:
        budget = ("--base-url", mock.base_url, "--prices", str(prices), "--workers", "4", "--budget", "0.5")
        first = await run(source, output, *budget)
        assert first.returncode == 3, first.stderr.decode()
        assert "Raise --budget" in summary(first.stderr)["message"]
        sent = mock.stats()["requests"]
        # Following the message literally (the same command) spends nothing more.
        again = await run(source, output, *budget)
        assert again.returncode == 3, again.stderr.decode()
        assert mock.stats()["requests"] == sent
        message = summary(again.stderr)["message"]
        assert "the budget of $0.5 is spent" in message and "Raise --budget" in message
        assert b'"run_stopped"' not in again.stderr  # the pool's view (this run's share of the budget) is not shown
        spent = sum(record["scheduler"]["cost_usd"] for record in read_output(output))
        assert 0 < spent <= 0.5
        more = await run(source, output, *budget[:-1], "100")
    assert more.returncode == 0, more.stderr.decode()
    assert summary(more.stderr)["earlier_cost_usd"] == pytest.approx(spent)
    assert id_counts(output) == dict.fromkeys(ids, 1)


# ---------------------------------------------------------------------------------------------- invalid lines


GOOD = b'{"custom_id": "a", "prompt": "hello", "max_tokens": 5}'
TYPO = b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completion", "body": {"messages": [{"role": "user", "content": "hi"}]}}'  # noqa: E501
FIXED = TYPO.replace(b"/v1/chat/completion", b"/v1/chat/completions")


async def test_a_fixed_invalid_line_runs_when_the_run_is_repeated(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_raw(source, [GOOD, TYPO])
    async with MockServer(MockConfig()) as server:
        first = await run(source, output, "--base-url", server.base_url)
        assert first.returncode == 1 and summary(first.stderr)["invalid_lines"] == 1
        write_raw(source, [GOOD, FIXED])
        fixed = await run(source, output, "--base-url", server.base_url)
        assert server.stats()["requests"] == 2  # the good line once, the fixed line once
    assert fixed.returncode == 0, fixed.stderr.decode()
    figures = summary(fixed.stderr)
    assert (figures["already_done"], figures["succeeded"], figures["failed"]) == (1, 1, 0)
    assert figures["message"].startswith("Done: every request succeeded")
    last = {record["custom_id"]: record for record in read_output(output)}  # the last line of an id wins
    assert last["b"]["error"] is None


async def test_an_unchanged_invalid_line_is_not_written_again_nor_counted_twice(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_raw(source, [GOOD, TYPO])
    async with MockServer(MockConfig()) as server:
        assert (await run(source, output, "--base-url", server.base_url)).returncode == 1
        again = await run(source, output, "--base-url", server.base_url)
    assert again.returncode == 1
    figures = summary(again.stderr)
    assert (figures["requests"], figures["already_done"], figures["failed"]) == (2, 1, 1)
    assert "Done: 1 request(s) failed" in figures["message"]
    assert line_count(output) == 2


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"custom_id,prompt\nq1,What is a token bucket?\nq2,Why pace requests?\n", b"it looks like CSV"),
        (b'[{"prompt": "a"}, {"prompt": "b"}]\n', b"it is a JSON array"),
        (b'{\n  "model": "gpt-4o-mini",\n  "messages": [{"role": "user", "content": "hi"}]\n}\n',
         b"pretty-printed JSON, or one body a file"),
    ],
)
async def test_a_file_that_is_not_json_lines_is_described_and_nothing_is_sent(
    tmp_path: Path, content: bytes, said: bytes
) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(content)
    done = await run(source, output, "--base-url", "http://127.0.0.1:9/v1")
    assert done.returncode == 2
    assert said in done.stderr and b"is not JSON Lines" in done.stderr
    assert b'Expected one JSON object a line, like:\n  {"custom_id": "q1", "method": "POST"' in done.stderr
    assert not output.exists()


async def test_when_most_lines_are_not_requests_the_summary_shows_a_good_line(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_raw(source, [b'{"question": "q1", "answer": "a1"}', b'{"question": "q2", "answer": "a2"}', GOOD])
    async with MockServer(MockConfig()) as server:
        done = await run(source, output, "--base-url", server.base_url)
    assert done.returncode == 1
    message = summary(done.stderr)["message"]
    assert "Most lines are not requests (2 of 3; first: line 1: not a request" in message
    assert 'A line looks like: {"custom_id": "q3", "prompt": "Hello"' in message


# ---------------------------------------------------------------------------------------------- keys and starts


def without_key() -> dict[str, str]:
    return {k: v for k, v in env().items() if k != "OPENAI_API_KEY"}


async def test_a_local_server_needs_no_key(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 5)
    async with MockServer(MockConfig()) as server:  # no api_key: like vLLM or Ollama without auth
        done = await anyio.run_process(command(source, output, "--base-url", server.base_url), check=False,
                                       cwd=REPO, env=without_key())
    assert done.returncode == 0, done.stderr.decode()
    assert id_counts(output) == dict.fromkeys(ids, 1)


async def test_a_local_server_that_wants_a_key_says_to_set_it(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 5)
    async with MockServer(MockConfig(api_key="the-servers-key")) as server:
        done = await anyio.run_process(command(source, output, "--base-url", server.base_url), check=False,
                                       cwd=REPO, env=without_key())
    assert done.returncode == 3, done.stderr.decode()
    message = summary(done.stderr)["message"]
    assert "wants an API key and OPENAI_API_KEY is not set" in message
    openai_without_key = await anyio.run_process(command(source, output), check=False, cwd=REPO, env=without_key())
    assert openai_without_key.returncode == 2 and b"set OPENAI_API_KEY" in openai_without_key.stderr


async def test_a_failed_start_leaves_no_output_file(tmp_path: Path) -> None:
    source, output, prices = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "prices.json"
    write_input(source, 3)
    prices.write_bytes(b"{not json")
    done = await run(source, output, "--base-url", "http://127.0.0.1:9/v1", "--prices", str(prices))
    assert done.returncode == 2 and b"error:" in done.stderr
    assert not output.exists()
    bad_flag = await run(source, output, "--workers", "none")
    assert bad_flag.returncode == 2 and not output.exists()


async def test_an_unknown_flag_shows_the_run_usage(tmp_path: Path) -> None:
    done = await run(tmp_path / "in.jsonl", tmp_path / "out.jsonl", "--mock", "--max-tokens", "50")
    assert done.returncode == 2
    assert done.stderr.startswith(b"usage: scheduler run ")
    assert b"unrecognized arguments: --max-tokens 50" in done.stderr


# ---------------------------------------------------------------------------------------------- what runs say


async def test_a_resumed_run_with_nothing_left_says_so_plainly(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 5)
    async with MockServer(MockConfig()) as server:
        assert (await run(source, output, "--base-url", server.base_url)).returncode == 0
        again = await run(source, output, "--base-url", server.base_url)
        assert server.stats()["requests"] == 5
    assert again.returncode == 0
    assert summary(again.stderr)["message"] == (
        f"Nothing to do: every one of the 5 request(s) of {source} already has its result in {output}."
    )


async def test_the_summary_mentions_truncated_answers(tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    done = await run(REPO / "examples" / "requests.jsonl", output, "--mock")
    assert done.returncode == 0, done.stderr.decode()
    truncated = sum(1 for record in read_output(output) if record["scheduler"].get("truncated"))
    assert truncated > 0
    figures = summary(done.stderr)
    assert figures["truncated"] == truncated
    assert f"{truncated} of {figures['succeeded']} answers hit max_tokens" in figures["message"]


async def test_quiet_says_nothing_on_success_and_one_line_otherwise(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 5)
    async with MockServer(MockConfig()) as server:
        done = await run(source, output, "--base-url", server.base_url, "--quiet")
    assert (done.returncode, done.stderr, done.stdout) == (0, b"", b"")
    write_raw(source, [GOOD, TYPO])
    failed = await run(source, tmp_path / "other.jsonl", "--mock", "-q")
    assert failed.returncode == 1
    assert failed.stderr.count(b"\n") == 1 and failed.stderr.startswith(b"scheduler run: Done: 1 request(s) failed")


async def test_echo_request_copies_each_body_for_the_join(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_raw(source, [GOOD, b'{"messages": [{"role": "user", "content": "bare"}], "metadata": {"row": 7}}'])
    done = await run(source, output, "--mock", "--echo-request")
    assert done.returncode == 0, done.stderr.decode()
    by_id = {record["custom_id"]: record["scheduler"] for record in read_output(output)}
    assert by_id["a"]["request_body"] == {"model": "gpt-4o-mini", "max_tokens": 5,
                                          "messages": [{"role": "user", "content": "hello"}]}
    assert by_id["line-2"]["request_body"]["messages"][0]["content"] == "bare"
    assert by_id["line-2"]["metadata"] == {"row": 7}


async def test_rate_limit_pauses_are_counted_not_logged_as_warnings(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(source, 30)
    # Told a limit ten times the server's: the first burst meets 429s, and the pool pauses on them.
    async with MockServer(MockConfig(rpm=1200, tpm=10_000_000)) as server:
        done = await run(source, output, "--base-url", server.base_url, "--rpm", "12000")
        assert server.stats()["rate_limited"] > 0
    assert done.returncode == 0, done.stderr.decode()
    figures = summary(done.stderr)
    assert figures["pauses"] > 0 and figures["rate_limited"] > 0
    events = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith(b"{")]
    assert not [e for e in events if e.get("level") in ("warning", "error") and "pause" in e.get("event", "")]
    assert id_counts(output) == dict.fromkeys(ids, 1)


async def test_ctrl_c_says_one_calm_line_and_logs_no_error(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 200)
    async with MockServer(MockConfig(latency_ms=40)) as server:
        cmd = command(source, output, "--base-url", server.base_url, "--workers", "4")
        async with await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                                            env=env()) as process:
            with anyio.fail_after(30):
                while line_count(output) < 20:
                    await anyio.sleep(0.01)
            process.send_signal(signal.SIGINT)
            assert process.stderr is not None
            stderr = b"".join([chunk async for chunk in process.stderr])
            assert await process.wait() == 130
    events = [orjson.loads(line) for line in stderr.splitlines()]
    said = [e for e in events if e["event"] == "run_stopping"]
    assert len(said) == 1 and said[0]["message"].startswith("Stopping: waiting for the ")
    assert not [e for e in events if e.get("level") == "error" or e["event"] == "run_stopped"]


async def test_on_a_terminal_the_summary_speaks_words_not_field_names(tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    parent, child = pty.openpty()
    cmd = [*command(REPO / "examples" / "requests.jsonl", output, "--mock")]
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child, cwd=REPO,
                               env={**env(), "COLUMNS": "160", "TERM": "xterm"})
    os.close(child)
    screen = bytearray()
    with anyio.fail_after(60):
        while True:
            try:
                chunk = await anyio.to_thread.run_sync(os.read, parent, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            screen.extend(chunk)
    os.close(parent)
    assert await anyio.to_thread.run_sync(process.wait) == 0
    text = screen.decode(errors="replace")
    assert "first request sent after" in text and "requests in the input" in text
    assert "first_request_s" not in text and not re.search(r"first request s\b", text)
    assert "tokens/min" in text and "/ 50,000,000" in text  # the limit, from the mock's headers


# ---------------------------------------------------------------------------------------------- offline


async def test_offline_the_estimate_prints_its_json_alone_and_the_warning_on_stderr(tmp_path: Path) -> None:
    """No tiktoken encoding can be loaded (an empty cache, and every download sent to a proxy on a closed port):
    ``scheduler estimate --json`` falls back with one warning, on stderr; its stdout is the JSON alone. The
    warning used to come out on stdout, in front of the JSON, and broke every reader of it."""
    source = tmp_path / "in.jsonl"
    write_input(source, 3)
    closed = "http://127.0.0.1:9"
    offline = {**env(), "TIKTOKEN_CACHE_DIR": str(tmp_path / "no-encodings"), "HTTPS_PROXY": closed,
               "https_proxy": closed, "NO_PROXY": "", "no_proxy": ""}
    cmd = [sys.executable, "-m", "scheduler", "estimate", str(source), "--rpm", "60", "--tpm", "1000000", "--json"]
    done = await anyio.run_process(cmd, check=False, cwd=REPO, env=offline)
    assert done.returncode == 0, done.stderr.decode()
    assert b"tokenizer_unavailable" in done.stderr  # the fallback did run
    assert orjson.loads(done.stdout)["requests"] == 3
