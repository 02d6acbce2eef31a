"""Structured outputs: ``submit(prompt, response_format=MyModel)`` sends the SDK's strict schema and parses the
answer into ``result.parsed``; refusals, answers that do not parse, parse retries, the estimate and the mock's
answers for pydantic schemas. Through the real openai SDK over HTTP to the mock where it is a user path."""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import pickle
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import httpx2
import openai
import orjson
import pytest
from openai.lib._parsing._completions import type_to_response_format_param
from openai.lib._parsing._responses import type_to_text_format_param
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field
from tiktoken_encodings import needs_encoding

from scheduler import ConfigurationError, MemorySink, OutputInvalid, Pool
from scheduler.mock import MockConfig, MockServer
from scheduler.mock.schema import instance_of
from scheduler.requests import CHAT
from scheduler.sinks import batch_line
from scheduler.structured import Parsed, Unparsed, parse_answer, prepare_body
from scheduler.testing import FakeTransport
from scheduler.tokens import TokenEstimator

pytestmark = pytest.mark.anyio

RESPONSES = "/v1/responses"


class Street(BaseModel):
    name: str
    number: int | None


class Kind(enum.Enum):
    HOME = "home"
    WORK = "work"


class Address(BaseModel):
    kind: Kind
    street: Street
    city: str = Field(description="the city")
    tags: list[Literal["old", "new"]]
    previous: list[Street]
    note: str | None = None


# -- sending the SDK's strict schema ----------------------------------------------------------------------


def test_a_model_class_becomes_the_sdks_strict_schema_and_a_dict_passes_through() -> None:
    body, model = prepare_body(CHAT, {"model": "m", "messages": [], "response_format": Address})
    assert model is Address
    assert body["response_format"] == type_to_response_format_param(Address)
    assert body["response_format"]["json_schema"]["schema"] == to_strict_json_schema(Address)
    given = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}
    assert prepare_body(CHAT, {"response_format": given}) == ({"response_format": given}, None)
    body, model = prepare_body(RESPONSES, {"model": "m", "input": "hi", "text_format": Address,
                                           "text": {"verbosity": "low"}})
    assert model is Address and "text_format" not in body
    assert body["text"] == {"verbosity": "low", "format": type_to_text_format_param(Address)}
    body, model = prepare_body(RESPONSES, {"model": "m", "input": "hi", "response_format": Street})
    assert model is Street and "response_format" not in body
    assert body["text"]["format"] == type_to_text_format_param(Street)


@pytest.mark.parametrize(("endpoint", "body", "match"), [
    (CHAT, {"response_format": int}, "pydantic BaseModel"),
    ("/v1/embeddings", {"input": "x", "response_format": Address}, "not /v1/embeddings"),
    (CHAT, {"response_format": Address, "text_format": Address}, "text_format is the Responses API's"),
    (RESPONSES, {"response_format": Address, "text_format": Street}, "not both"),
])
def test_what_cannot_be_a_response_format_is_a_configuration_error(
    endpoint: str, body: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        prepare_body(endpoint, body)


@needs_encoding("o200k_base")
def test_the_estimate_counts_the_schema() -> None:
    estimator = TokenEstimator()
    plain = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Where do you live?"}], "max_tokens": 50}
    body, _ = prepare_body(CHAT, {**plain, "response_format": Address})
    schema_text = orjson.dumps(body["response_format"]).decode()
    extra = estimator.estimate(CHAT, body) - estimator.estimate(CHAT, plain)
    assert extra >= estimator.text_tokens(schema_text, "gpt-4o") > 50


# -- parsing answers, as the SDK's parse does ---------------------------------------------------------------


def _chat(content: str | None, refusal: str | None = None, finish: str = "stop") -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "refusal": refusal}
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def test_answers_parse_refuse_or_say_what_is_wrong() -> None:
    good = {"name": "Main", "number": None}
    assert parse_answer(CHAT, _chat(json.dumps(good)), Street) == Parsed(Street(name="Main", number=None))
    assert parse_answer(CHAT, _chat(None, "I can't"), Street) == Parsed(None, "I can't")
    broken = parse_answer(CHAT, _chat('{"name": "Ma'), Street)
    assert isinstance(broken, Unparsed) and broken.retry and broken.problem.startswith("the answer is not valid JSON")
    wrong = parse_answer(CHAT, _chat('{"name": 3, "secret": "sk-abc"}'), Street)
    assert isinstance(wrong, Unparsed) and wrong.retry
    assert wrong.problem == ("the answer does not validate against Street: name: Input should be a valid string; "
                             "number: Field required")
    assert "sk-abc" not in wrong.problem  # the values are not repeated
    cut = parse_answer(CHAT, _chat('{"name": "Ma', finish="length"), Street)
    assert isinstance(cut, Unparsed) and not cut.retry and "max_tokens" in cut.problem
    assert parse_answer(CHAT, _chat("", finish="content_filter"), Street) == Unparsed(
        "the content filter stopped the answer (finish_reason content_filter)", retry=False)
    assert parse_answer(CHAT, _chat(""), Street) == Unparsed("the answer has no content")


def test_responses_api_answers_parse_and_refuse() -> None:
    def response(*parts: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        return {"status": status, "output": [{"type": "reasoning", "summary": []},
                                             {"type": "message", "content": list(parts)}]}

    text = json.dumps({"name": "Main", "number": 4})
    assert parse_answer(RESPONSES, response({"type": "output_text", "text": text}), Street) == Parsed(
        Street(name="Main", number=4))
    assert parse_answer(RESPONSES, response({"type": "refusal", "refusal": "no"}), Street) == Parsed(None, "no")
    incomplete = parse_answer(RESPONSES, response(status="incomplete"), Street)
    assert isinstance(incomplete, Unparsed) and not incomplete.retry


# -- through the SDK over HTTP to the mock -------------------------------------------------------------------


@asynccontextmanager
async def pool_on_mock(config: MockConfig | None = None, **options: Any
                       ) -> AsyncIterator[tuple[Pool, MockServer, list[dict[str, Any]]]]:
    """A pool on a running mock, and the bodies its client sends (read off the wire)."""
    sent: list[dict[str, Any]] = []

    async def record(request: httpx2.Request) -> None:
        sent.append(json.loads(request.content))

    async with (
        MockServer(config or MockConfig()) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="x",
                           http_client=httpx2.AsyncClient(event_hooks={"request": [record]})) as client,
        Pool(client=client, model="gpt-4o-mini", **options) as pool,
    ):
        yield pool, server, sent


async def test_a_nested_model_is_parsed_and_the_body_sent_carries_the_sdks_strict_schema() -> None:
    async with pool_on_mock() as (pool, _, sent):
        result = await pool.submit("Where do you live?", response_format=Address, max_tokens=300)
    assert isinstance(result.parsed, Address) and result.refusal is None
    assert isinstance(result.parsed.street, Street) and result.parsed.kind is Kind.HOME
    assert result.parsed == Address.model_validate_json(result.text)
    assert sent[0]["response_format"] == json.loads(json.dumps(type_to_response_format_param(Address)))


async def test_a_refusal_is_an_answer_without_parsed_output() -> None:
    async with pool_on_mock() as (pool, server, _):
        server.inject("refusal")
        result = await pool.submit("Where do you live?", response_format=Address, max_tokens=300)
    assert result.ok and result.parsed is None
    assert result.refusal == "I'm sorry, but I can't help with that request."
    assert result.attempts == 1


async def test_an_answer_that_is_not_json_is_asked_again_without_using_an_attempt() -> None:
    async with pool_on_mock(max_attempts=1) as (pool, server, sent):
        server.inject("invalid_json")
        result = await pool.submit("Where do you live?", response_format=Address, max_tokens=300)
        stats = pool.statistics()
    assert isinstance(result.parsed, Address)
    assert result.attempts == 2 and len(sent) == 2 and sent[0] == sent[1]
    assert (stats.parse_retries, stats.retries, stats.succeeded) == (1, 0, 1)


async def test_invalid_twice_fails_with_output_invalid_carrying_the_raw_text() -> None:
    async with pool_on_mock() as (pool, server, sent):
        server.inject("invalid_json", "invalid_json:schema")
        with pytest.raises(OutputInvalid) as info:
            await pool.submit("Where do you live?", response_format=Address, max_tokens=300)
        stats = pool.statistics()
    result = info.value.result
    assert result is not None and result.error is not None
    assert result.error.code == "output_invalid" == OutputInvalid.code
    assert str(info.value) == ("the answer does not validate against Address: (root): Input should be an object "
                               "(2 answers)")
    assert result.text == '["mock"]' and result.parsed is None
    assert result.body["choices"][0]["message"]["content"] == '["mock"]'
    assert result.usage is not None and result.attempts == 2 and len(sent) == 2
    assert (stats.failed, stats.parse_retries) == (1, 1)


async def test_parse_retries_is_a_pool_setting_with_a_per_submit_override() -> None:
    async with pool_on_mock(parse_retries=2) as (pool, server, sent):
        server.inject("invalid_json", "invalid_json:schema")
        result = await pool.submit("Where do you live?", response_format=Street, max_tokens=300)
        assert isinstance(result.parsed, Street) and result.attempts == 3
        server.inject("invalid_json")
        failed = await pool.submit("Where?", response_format=Street, max_tokens=300, parse_retries=0,
                                   raise_errors=False)
    assert failed.error is not None and failed.error.code == "output_invalid" and failed.attempts == 1
    assert failed.error.message.startswith("the answer is not valid JSON")
    assert len(sent) == 4
    with pytest.raises(ConfigurationError, match="parse_retries"):
        Pool(transport=FakeTransport(), parse_retries=-1)


async def test_an_answer_cut_at_the_output_cap_fails_at_once() -> None:
    async with pool_on_mock() as (pool, _, sent):
        result = await pool.submit("Where?", response_format=Address, max_tokens=5, raise_errors=False)
    assert result.error is not None and result.error.code == "output_invalid"
    assert "finish_reason length" in result.error.message and result.truncated
    assert len(sent) == 1


async def test_the_responses_api_parses_too() -> None:
    async with pool_on_mock() as (pool, server, sent):
        result = await pool.submit({"input": "Where?"}, endpoint=RESPONSES, text_format=Street,
                                   max_output_tokens=300)
        server.inject("refusal")
        refused = await pool.submit({"input": "Where?"}, endpoint=RESPONSES, response_format=Street,
                                    max_output_tokens=300)
    assert isinstance(result.parsed, Street)
    assert sent[0]["text"]["format"] == json.loads(json.dumps(type_to_text_format_param(Street)))
    assert refused.ok and refused.parsed is None and refused.refusal


async def test_map_parses_and_cached_answers_are_parsed_too() -> None:
    async with pool_on_mock(cache=True) as (pool, _, sent):
        results = [r async for r in pool.map(["a", "b"], response_format=Street, max_tokens=300, temperature=0)]
        again = await pool.submit("a", response_format=Street, max_tokens=300, temperature=0)
    assert all(isinstance(r.parsed, Street) for r in results)
    assert again.cached and isinstance(again.parsed, Street) and len(sent) == 2


async def test_stream_refuses_a_model_class() -> None:
    async with pool_on_mock() as (pool, _, sent):
        with pytest.raises(ConfigurationError, match="stream"):
            pool.stream("hi", response_format=Street)
    assert sent == []


async def test_a_parsed_result_pickles_and_writes_the_batch_output_line() -> None:
    sink = MemorySink()
    async with pool_on_mock(sink=sink) as (pool, _, _):
        result = await pool.submit("Where?", response_format=Address, max_tokens=300, custom_id="a-1")
    assert pickle.loads(pickle.dumps(result)) == result
    line = orjson.loads(orjson.dumps(batch_line(sink.results[0])))
    assert set(line) == {"id", "custom_id", "response", "error", "scheduler"}
    assert Address.model_validate_json(line["response"]["body"]["choices"][0]["message"]["content"]) == result.parsed


# -- the mock answers JSON that validates --------------------------------------------------------------------


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Everything(BaseModel):
    level: Level
    when: datetime.datetime
    day: datetime.date
    at: datetime.time
    ident: uuid.UUID
    price: decimal.Decimal
    pet: Cat | Dog
    pet2: Annotated[Cat | Dog, Field(discriminator="kind")]
    code: str = Field(pattern=r"^[A-Z]{3}-\d{2,4}(x|yz)?$")
    not_vowel: str = Field(pattern=r"^[^aeiou]\w+$")
    even: int = Field(ge=3, multiple_of=2)
    step: float = Field(gt=1, multiple_of=0.25)
    pair: tuple[int, str]
    items: list[Address] = Field(min_length=2, max_length=3)
    maybe: Address | None
    short: str = Field(max_length=3)
    ratio: float = Field(lt=1)


@pytest.mark.parametrize("model", [Address, Everything])
def test_the_mock_answers_json_that_validates_against_pydantic_schemas(model: type[BaseModel]) -> None:
    model.model_validate_json(json.dumps(instance_of(to_strict_json_schema(model), "hello")))


async def test_the_mock_answers_a_rich_model_through_the_pool() -> None:
    async with pool_on_mock() as (pool, _, _):
        result = await pool.submit("All of it", response_format=Everything, max_tokens=2000)
    assert isinstance(result.parsed, Everything) and len(result.parsed.items) == 2
