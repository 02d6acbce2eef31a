"""Tests of the bulk run's files: input forms, bad lines, duplicate ids, the resume scan (request hashes,
invalid lines, money spent), torn-line repair, and the output writer (whole lines, the lock)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from scheduler.jsonl import (
    IdMap,
    IdSet,
    InputLine,
    OutputScan,
    describe_input,
    line_hash,
    parse_line,
    read_lines,
    request_hash,
    scan_input,
    scan_output,
)
from scheduler.output import OutputLocked, OutputUnwritable, OutputWriter
from scheduler.results import ErrorInfo, Result, Usage

MODEL = "gpt-4o-mini"


def parse(line: Any, number: int = 7) -> InputLine:
    raw = line if isinstance(line, bytes) else orjson.dumps(line)
    return parse_line(number, raw, model=MODEL)


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines))
    return path


def ok(custom_id: str) -> Result:
    body = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
    return Result(custom_id=custom_id, endpoint="/v1/chat/completions", status=200, body=body,
                  request_id="req_1", usage=Usage(3, 1), model=MODEL)


def failed(custom_id: str, code: str) -> Result:
    return Result(custom_id=custom_id, endpoint="/v1/chat/completions", status=None, body=None,
                  error=ErrorInfo(code, "why"))


# ---------------------------------------------------------------------------------------------- input forms


def test_batch_api_line() -> None:
    line = parse({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "priority": 2,
                  "body": {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}})
    assert line.problem is None and line.custom_id == "a"
    assert line.request is not None
    assert line.request.endpoint == "/v1/chat/completions"
    assert line.request.custom_id == "a" and line.request.priority == 2
    assert line.request.body == {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_batch_api_line_gets_the_default_model_and_other_endpoints() -> None:
    line = parse({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "text"}})
    assert line.request is not None
    assert line.request.endpoint == "/v1/embeddings"
    assert line.request.body == {"input": "text", "model": MODEL}


def test_bare_body_with_metadata() -> None:
    line = parse({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "metadata": {"row": 3},
                  "priority": -1})
    assert line.custom_id == "line-7"
    assert line.metadata == {"row": 3}
    assert line.request is not None
    assert line.request.endpoint == "/v1/chat/completions" and line.request.priority == -1
    # metadata and priority are ours, not the API's: they are not sent
    assert line.request.body == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def test_bare_bodies_of_embeddings_and_responses() -> None:
    embed = parse({"custom_id": "x", "model": "text-embedding-3-small", "input": ["a", "b"]})
    assert embed.request is not None and embed.request.endpoint == "/v1/embeddings"
    assert embed.request.body == {"model": "text-embedding-3-small", "input": ["a", "b"]}
    responses = parse({"model": "gpt-4.1", "input": "hello"})
    assert responses.request is not None and responses.request.endpoint == "/v1/responses"


def test_prompt_line() -> None:
    line = parse({"prompt": "Explain token buckets", "max_tokens": 50, "priority": 1})
    assert line.custom_id == "line-7"
    assert line.request is not None
    assert line.request.endpoint == "/v1/chat/completions" and line.request.priority == 1
    assert line.request.body == {
        "max_tokens": 50, "messages": [{"role": "user", "content": "Explain token buckets"}], "model": MODEL,
    }


def test_line_numbers_are_stable_ids() -> None:
    assert parse({"prompt": "a"}, number=12).custom_id == "line-12"
    assert parse(b"not json", number=13).custom_id == "line-13"


# ---------------------------------------------------------------------------------------------- bad lines


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"custom_id": "a", "prompt": ', "invalid JSON"),
        (b'{"custom_id": "a", "prompt": "x", "temperature": NaN}', "invalid JSON"),
        (b'{"custom_id": "a", "prompt": "x", "temperature": Infinity}', "invalid JSON"),
        (b'[1, 2]', "must be a JSON object, not an array"),
        (b'"just a string"', "must be a JSON object, not a string"),
        (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}', "missing 'method'"),
        (b'{"custom_id": "a", "method": "POST", "body": {}}', "missing 'url'"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}', "missing 'body'"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}', "method must be POST"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/images", "body": {}}', "unknown url '/v1/images'"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": [1]}',
         "body must be a JSON object, not an array"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}',
         "messages must be a non-empty list"),
        (b'{"custom_id": 5, "prompt": "x"}', "custom_id must be a non-empty string"),
        (b'{"custom_id": "a", "prompt": "x", "priority": "high"}', "priority must be an integer"),
        (b'{"custom_id": "a", "prompt": ""}', "prompt must be a non-empty string"),
        (b'{"custom_id": "a", "model": "gpt-4o"}', "not a request"),
        (b'{"custom_id": "a", "prompt": "x", "model": 4}', "model must be a non-empty string"),
    ],
)
def test_bad_lines_say_what_is_wrong(raw: bytes, problem: str) -> None:
    line = parse_line(9, raw, model=MODEL)
    assert line.request is None
    assert line.problem is not None and problem in line.problem
    record = line.error_result()
    assert record.error is not None and record.error.code == "invalid_request"
    assert record.error.message.startswith("line 9: ")


def test_bad_line_keeps_its_own_id_when_it_has_one() -> None:
    assert parse_line(3, b'{"custom_id": "a", "method": "GET"}', model=MODEL).custom_id == "a"
    assert parse_line(3, b'{"custom_id": 5}', model=MODEL).custom_id == "line-3"


def test_read_lines_skips_blank_lines_and_refuses_long_ones() -> None:
    data = b'\xef\xbb\xbf{"a": 1}\n\n   \n' + b"x" * 100 + b"\n" + b'{"b": 2}\r\n{"c": 3}'
    lines = list(read_lines(io.BytesIO(data), max_bytes=50))
    assert lines == [(1, b'{"a": 1}\n'), (4, None), (5, b'{"b": 2}\r\n'), (6, b'{"c": 3}')]
    assert parse_line(5, b'{"b": 2}\r\n', model=MODEL).problem == "not a request: " + (
        'expected a Batch API line (custom_id, method, url, body), a request body (messages or input) '
        'or a {"prompt": ...} line'
    )
    oversize = parse_line(4, None, model=MODEL, max_bytes=50)
    assert oversize.problem == "line longer than 50 bytes"


def test_a_line_exactly_at_the_cap_is_read() -> None:
    line = b'{"prompt": "' + b"x" * 20 + b'"}\n'
    assert list(read_lines(io.BytesIO(line), max_bytes=len(line))) == [(1, line)]


# ---------------------------------------------------------------------------------------------- duplicates


def test_idset() -> None:
    ids = IdSet()
    for i in range(5000):
        ids.add(f"id-{i}")
    assert len(ids) == 5000
    assert "id-0" in ids and "id-4999" in ids and "id-5000" not in ids
    assert ids.repeated() == frozenset()
    ids.add("id-17")
    assert ids.repeated() == {hash("id-17")}


def test_scan_input_counts_and_finds_duplicates(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [
        {"custom_id": "a", "prompt": "x"},
        {"prompt": "no id: line-2"},
        b"",
        {"custom_id": "a", "prompt": "again"},
        {"custom_id": "line-2", "prompt": "collides with the generated id"},
        b"{broken",
        {"custom_id": "a", "prompt": "a third time"},
    ])
    prior = OutputScan()
    prior.done["line-6"] = 0  # a result (without a request hash) for what is now a broken line
    scan = scan_input(path, prior, model=MODEL)
    assert scan.lines == 6
    assert (scan.done, scan.not_objects) == (0, 1)
    assert scan.first_problem is not None and scan.first_problem.startswith("line 6: invalid JSON")
    assert scan.now_invalid == 1 and scan.mismatches[0][:2] == (6, "line-6")
    assert sorted(scan.duplicates) == [("a", [1, 4, 7]), ("line-2", [2, 5])]


def test_scan_input_without_duplicates(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [{"custom_id": f"r{i}", "prompt": "x"} for i in range(100)])
    scan = scan_input(path, model=MODEL)
    assert (scan.lines, scan.done, scan.duplicates) == (100, 0, [])


# ---------------------------------------------------------------------------------------------- output


def records(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


def test_writer_writes_batch_lines_and_skips_stopped_jobs(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = OutputWriter(path)
    writer.expect("a", 0xABC, {"row": 1})
    assert writer.write(ok("a"))
    assert writer.write(failed("b", "retries_exhausted"))
    for code in ("run_stopped", "insufficient_quota", "authentication_failed", "budget_exhausted"):
        assert not writer.write(failed(f"stopped-{code}", code))
    writer.close()
    first, second = records(path)
    assert set(first) == {"id", "custom_id", "response", "error", "scheduler"}
    assert first["custom_id"] == "a" and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"] == "req_1"
    assert first["scheduler"]["metadata"] == {"row": 1}
    assert first["scheduler"]["request_hash"] == "000000000abc"
    assert second["custom_id"] == "b" and second["error"] == {"code": "retries_exhausted", "message": "why"}
    assert "request_hash" not in second["scheduler"]  # nothing noted for it
    assert writer.pending == {}


def test_scan_output_reads_done_ids(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = OutputWriter(path)
    writer.write(ok("a"))
    writer.write(failed("b", "request_rejected"))
    writer.close()
    scan = scan_output(path)
    assert "a" in scan.done and "b" in scan.done and "c" not in scan.done
    assert scan.is_done("a") and scan.is_done("b") and not scan.is_done("c")
    assert (len(scan.done), scan.repaired_bytes) == (2, 0)


def test_scan_output_without_a_file(tmp_path: Path) -> None:
    scan = scan_output(tmp_path / "none.jsonl")
    assert len(scan.done) == 0
    assert not (tmp_path / "none.jsonl").exists()


def test_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = OutputWriter(path)
    writer.write(ok("a"))
    writer.write(ok("b"))
    writer.close()
    whole = path.read_bytes()
    torn = whole[: len(whole) - 40]  # the second line loses its end (and its newline)
    path.write_bytes(torn)
    scan = scan_output(path)
    assert "a" in scan.done and "b" not in scan.done
    assert scan.repaired_bytes > 0
    assert [r["custom_id"] for r in records(path)] == ["a"]
    # appending after the repair makes whole lines
    writer = OutputWriter(path)
    writer.write(ok("b"))
    writer.close()
    assert [r["custom_id"] for r in records(path)] == ["a", "b"]


def test_whole_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = OutputWriter(path)
    writer.write(ok("a"))
    writer.close()
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    scan = scan_output(path)
    assert "a" in scan.done and scan.repaired_bytes == 0
    assert [r["custom_id"] for r in records(path)] == ["a"]


def test_unreadable_line_in_the_middle_is_reported_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"custom_id": "a", "error": null}\n{"custom_id": "b", "err\n{"custom_id": "c", "error": null}\n')
    scan = scan_output(path)
    assert "a" in scan.done and "c" in scan.done and "b" not in scan.done
    assert scan.unreadable == [2]
    assert path.read_bytes().count(b"\n") == 3  # left as it is


# ---------------------------------------------------------------------------------------------- request hashes


def test_idmap_keeps_the_last_value_set_for_each_key() -> None:
    ids = IdMap()
    for i in range(5000):
        ids[f"id-{i}"] = i
    ids["id-17"] = 99_999
    ids["id-17"] = 12
    assert len(ids) == 5000
    assert ids.get("id-17") == 12 and ids.get("id-4999") == 4999 and ids.get("id-5000") is None
    assert "id-0" in ids and "nope" not in ids
    assert sorted(ids.values())[:3] == [0, 1, 2]


def test_the_request_hash_is_the_request_not_its_spelling() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    same = {"max_tokens": 5, "messages": [{"content": "hi", "role": "user"}], "model": MODEL}
    assert request_hash("/v1/chat/completions", body) == request_hash("/v1/chat/completions", same)
    assert request_hash("/v1/chat/completions", body) != request_hash("/v1/chat/completions", {**body, "max_tokens": 6})
    assert request_hash("/v1/chat/completions", body) != request_hash("/v1/responses", body)
    assert 0 <= request_hash("/v1/chat/completions", body) < 2**48
    assert line_hash(b'{"x": 1}\n') == line_hash(b'  {"x": 1}') != line_hash(b'{"x": 2}')


def written(path: Path, lines: list[tuple[Result, int | None]]) -> OutputScan:
    writer = OutputWriter(path)
    for result, fingerprint in lines:
        writer.write(result, fingerprint)
    writer.close()
    return scan_output(path)


def test_resume_compares_each_done_line_with_the_request_its_result_answers(tmp_path: Path) -> None:
    requests = {name: {"custom_id": name, "prompt": f"question {name}", "max_tokens": 5} for name in "abcd"}
    source = write_lines(tmp_path / "in.jsonl", list(requests.values()))

    def fingerprint(name: str) -> int:
        request = parse(requests[name]).request
        assert request is not None
        return request_hash(request.endpoint, request.body)

    prior = written(tmp_path / "out.jsonl", [
        (ok("a"), fingerprint("a")),
        (failed("b", "request_rejected"), fingerprint("b")),
        (ok("c"), None),  # written by an older version: no hash to compare
    ])
    assert scan_input(source, prior, model=MODEL).done == 3
    # The same file with "a" changed, and "b" given another default model (the body sent differs too).
    requests["a"]["max_tokens"] = 50
    source = write_lines(tmp_path / "in.jsonl", list(requests.values()))
    scan = scan_input(source, prior, model=MODEL)
    assert (scan.done, scan.done_failed, scan.unchecked, scan.mismatched) == (2, 1, 1, 1)
    assert scan.mismatches == [(1, "a", "differs from the request its result answers")]
    assert "a" in scan.changed and "b" not in scan.changed
    other_model = scan_input(source, prior, model="gpt-4.1")
    assert {custom_id for _, custom_id, _ in other_model.mismatches} == {"a", "b"}


def test_records_of_invalid_lines_never_count_as_done(tmp_path: Path) -> None:
    raw = b'{"custom_id": "x", "prompt": ""}'
    line = parse_line(1, raw, model=MODEL)
    prior = written(tmp_path / "out.jsonl", [(line.error_result(), line_hash(raw)), (ok("y"), None)])
    assert "x" in prior.done and not prior.is_done("x") and prior.is_done("y")
    assert prior.recorded_invalid("x", raw + b"\n")
    assert not prior.recorded_invalid("x", b'{"custom_id": "x", "prompt": "fixed"}')
    source = write_lines(tmp_path / "in.jsonl",
                         [{"custom_id": "x", "prompt": "fixed"}, {"custom_id": "y", "prompt": "q"}])
    scan = scan_input(source, prior, model=MODEL)
    assert (scan.lines, scan.done, scan.mismatched) == (2, 1, 0)
    # Once the fixed line ran, its result supersedes the invalid record: the last line of an id wins.
    prior = written(tmp_path / "out.jsonl", [(ok("x"), 1)])
    assert prior.is_done("x") and not prior.recorded_invalid("x", raw)


def test_scan_output_adds_up_the_money_spent(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    lines = [{"custom_id": "a", "error": None, "scheduler": {"cost_usd": 0.25}},
             {"custom_id": "a", "error": None, "scheduler": {"cost_usd": 0.5}},  # superseded: spent all the same
             {"custom_id": "b", "error": {"code": "x", "message": "y"}, "scheduler": {"cost_usd": 0.125}},
             {"custom_id": "c", "error": None, "scheduler": {"cost_usd": None}},
             {"custom_id": "d", "error": None}]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    scan = scan_output(path)
    assert scan.spent_usd == 0.875
    assert len(scan.done) == 4


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (b"custom_id,prompt\n1,hello\n", "CSV"),
        (b"custom_id\tprompt\n1\thello\n", "TSV"),
        (b'[{"prompt": "a"}, {"prompt": "b"}]\n', "a JSON array"),
        (b'{\n  "prompt": "a"\n}\n', "pretty-printed JSON, or one body a file"),
        (b"hello world\n", "not JSON Lines"),
    ],
)
def test_describe_input_says_what_the_file_looks_like(tmp_path: Path, text: bytes, said: str) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(text)
    assert said in describe_input(path)
    scan = scan_input(path, model=MODEL)
    assert scan.not_objects * 2 > scan.lines  # what makes the CLI refuse it


# ---------------------------------------------------------------------------------------------- the writer


def test_a_write_that_fails_part_way_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.jsonl"
    writer = OutputWriter(path)
    assert writer.write(ok("a"))
    real_write = os.write
    calls = []

    def disk_fills_up(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write: half the line
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_fills_up)
    with pytest.raises(OutputUnwritable, match="the disk is full") as raised:
        writer.write(ok("b"))
    monkeypatch.undo()
    assert raised.value.resumable and len(calls) == 2
    assert [r["custom_id"] for r in records(path)] == ["a"]  # cut back to the line's start
    with pytest.raises(OutputUnwritable):  # and nothing more is written
        writer.write(ok("c"))
    writer.close()
    assert [r["custom_id"] for r in records(path)] == ["a"]


def test_a_deleted_output_is_noticed_before_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = OutputWriter(path)
    writer.write(ok("a"))
    writer.check()
    path.unlink()
    with pytest.raises(OutputUnwritable, match="deleted") as raised:
        writer.write(ok("b"))
    assert not raised.value.resumable
    writer.close()
    replaced = OutputWriter(path)
    path.rename(tmp_path / "moved.jsonl")
    path.write_bytes(b"")
    with pytest.raises(OutputUnwritable, match="moved or replaced"):
        replaced.check()
    replaced.close()


def test_one_writer_at_a_time_and_the_second_is_told_who(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    first = OutputWriter(path)
    with pytest.raises(OutputLocked, match=f"another run \\(pid {os.getpid()}\\) is writing"):
        OutputWriter(path)
    first.close()
    OutputWriter(path).close()  # free again once the first is closed


def test_a_writer_that_wrote_nothing_removes_the_file_it_created(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    created = OutputWriter(path)
    assert created.created
    created.discard_if_unused()
    created.close()
    assert not path.exists()
    path.write_bytes(b"")
    existing = OutputWriter(path)  # not created by this writer: kept, even empty
    existing.discard_if_unused()
    existing.close()
    assert path.exists()
