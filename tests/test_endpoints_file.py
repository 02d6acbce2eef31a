"""``scheduler run --endpoints FILE``: the TOML file read and checked, and the CLI running through its endpoints.

The file's checks are tested on :func:`read_endpoints` (every message names the file, the endpoint and the
field; a key is refused without being echoed); what the CLI does with the file runs as a subprocess against mock
servers in this test's event loop, each key with its own limits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from scheduler.cli.endpoints_file import EndpointsFileError, read_endpoints
from scheduler.cli.options import NO_KEY
from scheduler.limits import Limits
from scheduler.mock import KeyLimits, MockConfig, MockServer

REPO = Path(__file__).resolve().parents[1]
KEY_A = "sk-project-a-0123456789aaaa"
KEY_B = "sk-project-b-0123456789bbbb"

GOOD = """
[[endpoint]]
base_url = "https://api.openai.com/v1"
api_key_env = "KEY_A"
rpm = 5000
tpm = 4000000
models = ["gpt-4o-mini", "gpt-4o"]
name = "project-a"

[endpoint.model_limits]
"gpt-4o" = { rpm = 500, tpm = 30000 }

[[endpoint]]
base_url = "https://example.openai.azure.com/openai/v1/"
api_key_env = "KEY_B"
weight = 2.5
dialect = "azure"

[[endpoint]]
base_url = "http://localhost:8000/v1"    # a vLLM server of our own: no key, limits learned
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "endpoints.toml"
    path.write_text(text)
    return path


def test_a_good_file_gives_each_endpoint_its_key_limits_models_and_weight(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    a, b, local = read_endpoints(path, environ={"KEY_A": KEY_A, "KEY_B": KEY_B}, reserve={0: 0.2})
    assert (a.base_url, a.api_key_env, a.key, a.name, a.models) == (
        "https://api.openai.com/v1", "KEY_A", KEY_A, "project-a", ("gpt-4o-mini", "gpt-4o"))
    # --reserve goes into every limit the file gives.
    assert a.limits == Limits(rpm=5000, tpm=4_000_000, reserve={0: 0.2})
    assert a.model_limits == {"gpt-4o": Limits(rpm=500, tpm=30_000, reserve={0: 0.2})}
    assert (b.key, b.weight, b.dialect, b.limits, b.models) == (KEY_B, 2.5, "azure", None, None)
    assert (local.key, local.limits, local.api_key_env) == (NO_KEY, None, None)
    assert KEY_A not in repr(a)  # the key never shows


@pytest.mark.parametrize(("text", "field"), [
    ('[[endpoint]]\nbase_url = "https://api.openai.com/v1"\napi_key = "whatever-it-is"\n', "'api_key'"),
    (f'[[endpoint]]\nbase_url = "https://api.openai.com/v1"\napi_key_env = "{KEY_A}"\n', "'api_key_env'"),
    ('[[endpoint]]\nbase_url = "https://api.openai.com/v1"\napi_key_env = "Zq9vT3kLm8xWp2RbN7cYd4Hs"\n',
     "'api_key_env'"),
    (f'[[endpoint]]\nbase_url = "https://api.openai.com/v1"\napi_key_env = "K"\nname = "{KEY_A}"\n', "'name'"),
    (f'[[endpoint]]\nbase_url = "https://api.openai.com/v1?key={KEY_A}"\napi_key_env = "K"\n', "'base_url'"),
])
def test_a_key_in_the_file_is_refused_saying_to_use_api_key_env(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(EndpointsFileError) as caught:
        read_endpoints(write(tmp_path, text), environ={"K": "x" * 10})
    message = str(caught.value)
    assert str(tmp_path / "endpoints.toml") in message and "[[endpoint]] 1" in message and field in message
    assert "api_key_env" in message and "environment variable" in message
    assert KEY_A not in message and "Zq9vT3kLm8xWp2RbN7cYd4Hs" not in message


def test_a_missing_environment_variable_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(EndpointsFileError) as caught:
        read_endpoints(path, environ={"KEY_A": KEY_A})
    assert str(caught.value) == (f"{path}: [[endpoint]] 2: api_key_env: the environment variable KEY_B is not set "
                                 "(or empty): set it to this endpoint's API key")


@pytest.mark.parametrize(("table", "where"), [
    ('base_url = "ftp://x"', "[[endpoint]] 1: base_url: must be an http:// or https:// URL"),
    ("rpm = 5", "[[endpoint]] 1: api_key_env: required for OpenAI's API (no base_url given)"),
    ('base_url = "http://h/v1"\napi_key_env = "NOT-A-NAME"', "[[endpoint]] 1: api_key_env: must be the name of"),
    ('base_url = "http://h/v1"\nrpm = -5', "[[endpoint]] 1: rpm: must be a positive integer (per minute), got -5"),
    ('base_url = "http://h/v1"\ntpm = 1.5', "[[endpoint]] 1: tpm: must be a positive integer"),
    ('base_url = "http://h/v1"\notpm = true', "[[endpoint]] 1: otpm: must be a positive integer"),
    ('base_url = "http://h/v1"\nmodels = []', "[[endpoint]] 1: models: must be a non-empty list"),
    ('base_url = "http://h/v1"\nmodels = "gpt-4o"', "[[endpoint]] 1: models: must be a non-empty list"),
    ('base_url = "http://h/v1"\nweight = 0', "[[endpoint]] 1: weight: must be a positive number, got 0"),
    ('base_url = "http://h/v1"\ndialect = "bedrock"', "[[endpoint]] 1: dialect: must be one of openai, azure"),
    ('base_url = "http://h/v1"\nname = ""', "[[endpoint]] 1: name: must be a non-empty string"),
    ('base_url = "http://h/v1"\nrmp = 5', "[[endpoint]] 1: rmp: unknown field; the fields are base_url"),
    ('base_url = "http://h/v1"\nmodel_limits = { "gpt-4o" = { rpm = 0 } }',
     "[[endpoint]] 1: model_limits.gpt-4o.rpm: must be a positive integer"),
    ('base_url = "http://h/v1"\nmodel_limits = { "gpt-4o" = { rps = 3 } }',
     "[[endpoint]] 1: model_limits.gpt-4o.rps: unknown field"),
    ('base_url = "http://h/v1"\nmodel_limits = { "gpt-4o" = {} }', "[[endpoint]] 1: model_limits.gpt-4o: gives no"),
])
def test_a_bad_field_is_named_with_the_file_the_endpoint_and_the_field(tmp_path: Path, table: str, where: str
                                                                        ) -> None:
    path = write(tmp_path, f"[[endpoint]]\n{table}\n")
    with pytest.raises(EndpointsFileError) as caught:
        read_endpoints(path, environ={"K": "k" * 8})
    assert str(caught.value).startswith(f"{path}: {where}")


@pytest.mark.parametrize(("text", "problem"), [
    ("", "names no endpoint"),
    ("endpoint = 3\n", "names no endpoint"),
    ("[defaults]\nrpm = 3\n", "unknown top-level key(s) 'defaults'"),
    ("[[endpoint]\n", "is not valid TOML"),
    ('[[endpoint]]\nbase_url = "http://h/v1"\nname = "x"\n[[endpoint]]\nbase_url = "http://g/v1"\nname = "x"\n',
     "[[endpoint]] 2: name: 'x' is the name of [[endpoint]] 1 too"),
    ('[[endpoint]]\nbase_url = "http://h/v1"\napi_key_env = "K"\n[[endpoint]]\nbase_url = "http://h/v1"\n'
     'api_key_env = "K"\n', "[[endpoint]] 2: api_key_env: the same key at the same base_url as [[endpoint]] 1"),
])
def test_a_file_that_is_not_a_list_of_endpoints_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(EndpointsFileError) as caught:
        read_endpoints(path, environ={"K": "k" * 8})
    assert problem in str(caught.value) and str(path) in str(caught.value)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(EndpointsFileError, match=r"cannot read the endpoints file .*missing\.toml"):
        read_endpoints(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------- the CLI


def write_input(path: Path, count: int, *, priority: int | None = None) -> None:
    with path.open("wb") as file:
        for i in range(count):
            body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": f"hi {i}"}]}
            line: dict[str, Any] = {"custom_id": f"r{i:04d}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": body}
            if priority is not None:
                line["priority"] = priority
            file.write(orjson.dumps(line) + b"\n")


async def run(tmp_path: Path, *args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    env.update(environ or {})
    command = [sys.executable, "-m", "scheduler", "run", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
               *args]
    return await anyio.run_process(command, check=False, cwd=REPO, env=env)


def summary(stderr: bytes) -> dict[str, Any]:
    for line in stderr.splitlines():
        if b'"run_summary"' in line:
            return orjson.loads(line)  # type: ignore[no-any-return]
    raise AssertionError(f"no summary in {stderr.decode()[-2000:]}")


@pytest.mark.anyio
async def test_the_cli_runs_through_every_endpoint_of_the_file_and_each_line_names_its_endpoint(tmp_path: Path
                                                                                                ) -> None:
    # One server, two keys with their own limits; the second key's quota runs out after 20 requests.
    config = MockConfig(keys={KEY_A: KeyLimits(60_000, 10_000_000), KEY_B: KeyLimits(60_000, 10_000_000)})
    async with MockServer(config) as server, MockServer(MockConfig(quota_after=20)) as spent:
        write(tmp_path, f"""
[[endpoint]]
base_url = "{server.base_url}"
api_key_env = "KEY_A"
rpm = 60000
tpm = 10000000
name = "a"

[[endpoint]]
base_url = "{server.base_url}"
api_key_env = "KEY_B"
rpm = 60000
tpm = 10000000
name = "b"

[[endpoint]]
base_url = "{spent.base_url}"
api_key_env = "KEY_C"
rpm = 60000
tpm = 10000000
name = "c"
""")
        write_input(tmp_path / "in.jsonl", 200)
        done = await run(tmp_path, "--endpoints", str(tmp_path / "endpoints.toml"), "--workers", "8",
                         environ={"KEY_A": KEY_A, "KEY_B": KEY_B, "KEY_C": "sk-c-0123456789"})
        keys = server.stats()["keys"]
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert len(records) == 200 and all(record["error"] is None for record in records)
    served = Counter(record["scheduler"]["endpoint"] for record in records)
    assert set(served) == {"a", "b", "c"} and served["c"] == 20
    # Each key was paced and counted by its own buckets on the server.
    assert sorted(v["ok"] for v in keys.values()) == sorted([served["a"], served["b"]])
    figures = summary(done.stderr)
    by_name = {e["name"]: e for e in figures["endpoints"]}
    assert {name: e["answered"] for name, e in by_name.items()} == dict(served)
    assert "quota" in by_name["c"]["retired"] and "retired" not in by_name["a"]
    assert b"endpoint_retired" in done.stderr
    for key in (KEY_A, KEY_B):
        assert key.encode() not in done.stderr and key.encode() not in (tmp_path / "out.jsonl").read_bytes()


@pytest.mark.anyio
@pytest.mark.parametrize(("args", "environ", "message"), [
    (["--endpoints", "{tmp}/endpoints.toml"], {}, "[[endpoint]] 1: api_key_env: the environment variable KEY_A"),
    (["--endpoints", "{tmp}/endpoints.toml", "--base-url", "http://h/v1"], {"KEY_A": KEY_A},
     "--endpoints names every endpoint's base_url"),
    (["--endpoints", "{tmp}/endpoints.toml", "--reserve", "0=0.7", "--reserve", "1=0.5"], {"KEY_A": KEY_A},
     "--reserve: shares must be in (0, 1) and sum below 1"),
    (["--reserve", "high=0.2", "--mock"], {}, "expected PRIORITY=SHARE"),
])
async def test_a_bad_endpoints_file_or_reservation_exits_2_before_anything_is_sent(
    tmp_path: Path, args: list[str], environ: dict[str, str], message: str
) -> None:
    write(tmp_path, '[[endpoint]]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "KEY_A"\n')
    write_input(tmp_path / "in.jsonl", 3)
    done = await run(tmp_path, *(arg.format(tmp=tmp_path) for arg in args), environ=environ)
    assert done.returncode == 2
    assert message in done.stderr.decode()
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.anyio
async def test_priority_sets_the_priority_of_lines_that_give_none(tmp_path: Path) -> None:
    from scheduler.jsonl import parse_line

    raw = orjson.dumps({"custom_id": "x", "prompt": "hi"})
    assert parse_line(1, raw, model="m", priority=5).request.priority == 5  # type: ignore[union-attr]
    own = orjson.dumps({"custom_id": "x", "prompt": "hi", "priority": 1})
    assert parse_line(1, own, model="m", priority=5).request.priority == 1  # type: ignore[union-attr]
    write_input(tmp_path / "in.jsonl", 3)
    done = await run(tmp_path, "--mock", "--priority", "5")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
