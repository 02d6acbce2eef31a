"""What the mock answers: structured outputs, refusals, context windows, embeddings, flex, and every shape
checked against the openai SDK's own types."""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any, Literal

import aiohttp
import openai
import pytest
from mock_client import USER, running
from openai.lib._pydantic import to_strict_json_schema
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from openai.types.responses import Response
from pydantic import BaseModel, Field

from scheduler.mock import MockConfig, embedding_of
from scheduler.mock.schema import SchemaError, instance_of

pytestmark = pytest.mark.anyio



class Address(BaseModel):
    street: str
    zip_code: str | None
    country: Literal["FR", "DE"]


class Node(BaseModel):
    value: int
    children: list[Node]


class Person(BaseModel):
    name: str = Field(min_length=12)
    age: int = Field(ge=18, le=99)
    score: float
    active: bool
    tags: list[Literal["a", "b"]]
    home: Address
    previous: list[Address]
    nickname: str | None
    kind: Literal["person"]
    tree: Node


# -- JSON from a schema ----------------------------------------------------------------------------


def test_instances_validate_against_pydantic_schemas() -> None:
    for schema in (Person.model_json_schema(), to_strict_json_schema(Person)):
        person = Person.model_validate(instance_of(schema, "hello"))
        assert person.kind == "person" and 18 <= person.age <= 99 and len(person.name) >= 12
        assert person.name.startswith("mock")
    assert instance_of(to_strict_json_schema(Person)) == instance_of(to_strict_json_schema(Person))


def test_instances_of_hand_written_schemas() -> None:
    assert instance_of({"type": ["string", "null"]}) == "mock mock"
    assert instance_of({"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 5}]}) == 5
    assert instance_of({"enum": [3, 4]}) == 3
    assert instance_of({"type": "array", "items": {"type": "boolean"}, "minItems": 3}) == [True] * 3
    assert instance_of({"type": "string", "format": "date-time"}) == "2026-01-01T00:00:00Z"
    assert instance_of({"allOf": [{"properties": {"a": {"type": "integer"}}},
                                  {"properties": {"b": {"const": "x"}}}]}) == {"a": 1, "b": "x"}
    assert instance_of({"type": "number", "exclusiveMaximum": 0}) == -1
    with pytest.raises(SchemaError):
        instance_of({"$ref": "#/$defs/missing"})
    with pytest.raises(SchemaError):
        instance_of({"type": "tuple"})


# -- structured outputs through the SDK's parse ----------------------------------------------------


async def test_parse_with_a_pydantic_model() -> None:
    async with running() as (_, client):
        completion = await client.chat.completions.parse(model="gpt-4o", messages=USER, response_format=Person)
        person = completion.choices[0].message.parsed
        assert isinstance(person, Person)
        assert completion.choices[0].finish_reason == "stop"
        content = completion.choices[0].message.content or ""
        assert completion.usage is not None and completion.usage.completion_tokens == math.ceil(len(content) / 4)
        response = await client.responses.parse(model="gpt-4o", input="hello", text_format=Address)
        assert isinstance(response.output_parsed, Address)
        r = await client.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


async def test_refusal_and_invalid_json_and_length() -> None:
    async with running() as (server, client):
        server.inject("refusal", "invalid_json", "invalid_json:schema", "refusal")
        completion = await client.chat.completions.parse(model="gpt-4o", messages=USER, response_format=Person)
        message = completion.choices[0].message
        assert (message.content, message.parsed) == (None, None)
        assert message.refusal == "I'm sorry, but I can't help with that request."
        for _ in range(2):
            with pytest.raises(ValueError):  # broken JSON, then JSON that breaks the schema
                await client.chat.completions.parse(model="gpt-4o", messages=USER, response_format=Person)
        stream = await client.chat.completions.create(model="m", messages=USER, stream=True)
        refusal = ""
        async for chunk in stream:
            refusal += chunk.choices[0].delta.refusal or ""
        assert refusal == "I'm sorry, but I can't help with that request."
        with pytest.raises(openai.LengthFinishReasonError):
            await client.chat.completions.parse(model="gpt-4o", messages=USER, response_format=Person, max_tokens=20)


# -- context windows -------------------------------------------------------------------------------


async def test_context_length_exceeded() -> None:
    async with running(MockConfig(context_windows={"small": 100})) as (_, client):
        long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x" * 440}]  # 110 tokens
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="small", messages=long)
        err = info.value
        assert (err.code, err.param, err.type) == ("context_length_exceeded", "messages", "invalid_request_error")
        assert err.body == {
            "message": "This model's maximum context length is 100 tokens. However, your messages resulted in "
            "110 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
        }
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="small", messages=USER, max_tokens=200)
        assert "you requested 205 tokens (5 in the messages, 200 in the completion)" in str(info.value.body)
        await client.chat.completions.create(model="small", messages=USER, max_tokens=95)
        await client.chat.completions.create(model="other", messages=long)  # not in the table: unchecked
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(model="small", input="x" * 440)
        assert info.value.code == "context_length_exceeded"


# -- embeddings ------------------------------------------------------------------------------------


async def test_embeddings_in_all_input_forms_land_on_their_lines() -> None:
    async with running() as (server, client):
        e = await client.embeddings.create(model="text-embedding-3-small", input=["ab", "cd"])
        assert [d.embedding for d in e.data] == [embedding_of("ab"), embedding_of("cd")]
        e = await client.embeddings.create(model="text-embedding-3-small", input="ab")
        assert e.data[0].embedding == embedding_of("ab")
        e = await client.embeddings.create(model="text-embedding-3-small", input=[1, 2, 3])
        assert (len(e.data), e.data[0].embedding, e.usage.prompt_tokens) == (1, embedding_of([1, 2, 3]), 3)
        e = await client.embeddings.create(model="text-embedding-3-small", input=[[1, 2], [3]])
        assert [d.embedding for d in e.data] == [embedding_of([1, 2]), embedding_of([3])]
        e = await client.embeddings.create(model="text-embedding-3-small", input="ab", dimensions=3)
        cut = embedding_of("ab")[:3]
        norm = math.sqrt(sum(v * v for v in cut))
        assert e.data[0].embedding == pytest.approx([v / norm for v in cut])
        e = await client.embeddings.create(model="m", input="ab", dimensions=3, encoding_format="base64")
        raw_vector = e.data[0].embedding
        floats = struct.unpack("<3f", base64.b64decode(raw_vector)) if isinstance(raw_vector, str) else raw_vector
        assert list(floats) == pytest.approx(embedding_of("ab", 3), abs=1e-6)
        embeddings = server.stats()["embeddings"]
        assert embeddings == {"requests": 6, "inputs": 8, "max_inputs": 2,
                              "inputs_per_request": {"1": 4, "2": 2}}


async def test_embeddings_limits() -> None:
    async with running(MockConfig(embedding_request_limit=100)) as (_, client):
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model="m", input=["a"] * 2049)
        assert info.value.body == {
            "message": "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/"
            "api-reference.", "type": "invalid_request_error", "param": None, "code": None,
        }
        await client.embeddings.create(model="m", input=["a"] * 100)
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model="m", input=["ok", "x" * (4 * 8192 + 1)])
        assert info.value.message.endswith("Invalid 'input[1]': maximum input length is 8192 tokens.")
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model="m", input=["x" * 16] * 30)
        assert info.value.body == {"message": "Requested 120 tokens, max 100 tokens per request",
                                   "type": "max_tokens_per_request", "param": None,
                                   "code": "max_tokens_per_request"}
        for bad in ("", [], [""], [1, "a"]):
            with pytest.raises(openai.BadRequestError):
                await client.embeddings.create(model="m", input=bad)  # type: ignore[arg-type]


# -- flex processing -------------------------------------------------------------------------------


async def test_flex_tier_is_echoed_and_may_find_no_capacity() -> None:
    async with running(MockConfig(flex_capacity=0.0)) as (server, client):
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=USER, service_tier="flex")
        assert (info.value.code, info.value.type) == ("resource_unavailable", "resource_unavailable")
        assert "retry-after" not in info.value.response.headers
        r = await client.chat.completions.create(model="m", messages=USER, service_tier="auto")
        assert r.service_tier == "default"
        stats = server.stats()
        assert (stats["admitted"], stats["rate_limited"], stats["flex"]) == (1, 0, {"served": 0, "unavailable": 1})
    async with running(MockConfig(flex_capacity=0.5, seed=3)) as (server, client):
        served = 0
        for _ in range(20):
            try:
                r = await client.chat.completions.create(model="m", messages=USER, service_tier="flex")
            except openai.RateLimitError:
                continue
            assert r.service_tier == "flex"
            served += 1
        assert 0 < served < 20 and server.stats()["flex"]["served"] == served
        resp = await client.responses.create(model="m", input="hi", service_tier="priority")
        assert resp.service_tier == "priority"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=USER, service_tier="cheap")  # type: ignore[arg-type]


# -- every shape against the SDK's types -----------------------------------------------------------


async def test_shapes_validate_against_the_sdk_types() -> None:
    async with running() as (server, _), aiohttp.ClientSession() as http:
        url = server.base_url

        async def post(path: str, body: dict[str, Any]) -> bytes:
            async with http.post(url + path, json=body) as r:
                assert r.status == 200
                return await r.read()

        messages = [{"role": "user", "content": "hi"}]
        fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": to_strict_json_schema(Person)}}
        for extra in ({}, {"n": 2, "max_tokens": 3}, {"response_format": fmt}, {"service_tier": "flex"}):
            ChatCompletion.model_validate_json(await post("/chat/completions", {"model": "m", "messages": messages,
                                                                                 **extra}))
        server.inject("refusal")
        ChatCompletion.model_validate_json(await post("/chat/completions", {"model": "m", "messages": messages}))
        sse = await post("/chat/completions", {"model": "m", "messages": messages, "stream": True,
                                               "stream_options": {"include_usage": True}})
        events = [e.removeprefix(b"data: ") for e in sse.split(b"\n\n") if e]
        assert events[-1] == b"[DONE]"
        for event in events[:-1]:
            ChatCompletionChunk.model_validate_json(event)
        Response.model_validate_json(await post("/responses", {"model": "m", "input": "hi", "max_output_tokens": 2}))
        Response.model_validate_json(await post("/responses", {
            "model": "m", "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "a", "schema": to_strict_json_schema(Address)}},
        }))
        CreateEmbeddingResponse.model_validate_json(await post("/embeddings", {"model": "m", "input": [[1], [2]]}))
