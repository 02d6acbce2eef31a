from __future__ import annotations

import base64
import io
import json
import math
import os
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from tiktoken_encodings import HOW_TO_PROVIDE, needs_encoding

from scheduler import _media, tiktoken_cache, tokens
from scheduler.tokens import TokenEstimator, encoding_available, encoding_name_for_model, output_reservation

CHAT = "/v1/chat/completions"
ENDPOINTS = [CHAT, "/v1/completions", "/v1/embeddings", "/v1/moderations", "/v1/responses", "/v1/other", ""]
# The property tests run in CI: bounded, no deadline on a shared CPU, no example database in the checkout.
BOUNDED = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def o200k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("o200k_base")


def cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base")


def count(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text))


# --- the OpenAI cookbook's formulas ("How to count tokens with tiktoken"), written out independently -------------


def cookbook_messages(messages: list[dict[str, str]], enc: tiktoken.Encoding) -> int:
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += 3
        for key, value in message.items():
            total += count(enc, value)
            if key == "name":
                total += 1
    return total


def cookbook_tools(tools: list[dict[str, Any]], enc: tiktoken.Encoding, func_init: int) -> int:
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    total = 0
    for tool in tools:
        total += func_init
        function = tool["function"]
        description = function["description"].removesuffix(".")
        total += count(enc, f"{function['name']}:{description}")
        properties = function["parameters"]["properties"]
        if properties:
            total += prop_init
            for key, prop in properties.items():
                total += prop_key
                if "enum" in prop:
                    total += enum_init + sum(enum_item + count(enc, item) for item in prop["enum"])
                total += count(enc, f"{key}:{prop['type']}:{prop['description'].removesuffix('.')}")
    return total + func_end if tools else total


COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
     "into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch "
     "base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do "
     "better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client "
     "deliverable."},
]
COOKBOOK_TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]},
    }, "required": ["location"]},
}}]
COOKBOOK_TOOL_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


# --- encodings, chat messages, output reservation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o-mini", "o200k_base"), ("gpt-4.1", "o200k_base"), ("o3-mini", "o200k_base"), ("gpt-5", "o200k_base"),
     ("gpt-4", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
     ("openai/gpt-4o", "o200k_base"), ("ft:gpt-4o-mini-2024-07-18:org::x", "o200k_base"),
     ("some-local-llama", "o200k_base")],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


@needs_encoding("o200k_base", "cl100k_base")
@pytest.mark.parametrize(("model", "api_count"), [("gpt-4o", 124), ("gpt-4o-mini", 124), ("gpt-4", 129),
                                                  ("gpt-3.5-turbo", 129)])
def test_chat_prompt_matches_what_the_api_counted_for_the_cookbook_example(model: str, api_count: int) -> None:
    # The cookbook prints the API's usage.prompt_tokens for this conversation: 124 on o200k, 129 on cl100k.
    body = {"model": model, "messages": COOKBOOK_MESSAGES, "max_tokens": 1}
    assert TokenEstimator().prompt_tokens(CHAT, body) == api_count


@needs_encoding("o200k_base")
def test_chat_estimate_counts_messages_overhead_and_the_output_reservation_times_n() -> None:
    body = {"model": "gpt-4o-mini", "max_tokens": 50, "n": 2, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Explain token buckets", "name": "ann"},
    ]}
    assert TokenEstimator().estimate(CHAT, body) == cookbook_messages(body["messages"], o200k()) + 100  # type: ignore[arg-type]


def test_the_output_reservation_follows_the_endpoint() -> None:
    assert output_reservation(CHAT, {"max_completion_tokens": 70, "max_tokens": 50, "n": 3}, 1024) == 210
    assert output_reservation("/v1/responses", {"max_output_tokens": 80}, 1024) == 80
    # Legacy completions generate best_of candidates server-side and bill them all.
    assert output_reservation("/v1/completions", {"max_tokens": 10, "n": 2, "best_of": 5}, 1024) == 50
    assert output_reservation(CHAT, {"max_tokens": True, "n": -1}, 1024) == 1024
    # Embeddings and moderations produce no tokens: nothing is set aside for output.
    assert output_reservation("/v1/embeddings", {"max_tokens": 50}, 1024) == 0
    assert output_reservation("/v1/moderations", {}, 1024) == 0


def test_uncapped_requests_get_the_default_reservation_and_one_warning() -> None:
    estimator = TokenEstimator(default_output_tokens=700, tokenizer=len)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with capture_logs() as logs:
        first = estimator.estimate(CHAT, body)
        estimator.estimate(CHAT, body)
        estimator.estimate("/v1/embeddings", {"input": "no output here"})
    assert first == estimator.prompt_tokens(CHAT, body) + 700
    assert [e["event"] for e in logs] == ["output_cap_missing"]


def test_embeddings_and_moderations_are_charged_their_input_only() -> None:
    estimator = TokenEstimator(tokenizer=lambda text: len(text.split()))
    with capture_logs() as logs:
        assert estimator.estimate("/v1/embeddings", {"model": "text-embedding-3-small",
                                                     "input": ["alpha beta", "gamma"]}) == 3
        assert estimator.estimate("/v1/moderations", {"input": "one two three"}) == 3
    assert logs == []  # no "output cap missing" warning: these endpoints have no output


def test_token_arrays_count_their_integers_not_their_digits() -> None:
    estimator = TokenEstimator(tokenizer=len)
    assert estimator.prompt_tokens("/v1/embeddings", {"input": [123456, 7, 99999]}) == 3
    assert estimator.prompt_tokens("/v1/embeddings", {"input": [[1, 2, 3], [40000, 5]]}) == 5
    assert estimator.input_tokens({"input": [[1, 2, 3], [40000, 5]]}) == [3, 2]
    assert estimator.input_tokens({"input": [1, 2, 3]}) == [3]
    assert estimator.prompt_tokens("/v1/completions", {"prompt": [15496, 11, 995], "max_tokens": 5}) == 3
    assert estimator.prompt_tokens("/v1/completions", {"prompt": [[1] * 1000, [2] * 24]}) == 1024
    assert estimator.input_tokens({"input": ["abc", "de"]}) == [3, 2]


# --- tools, tool calls, structured outputs -----------------------------------------------------------------------


@needs_encoding("o200k_base", "cl100k_base")
@pytest.mark.parametrize(("model", "api_count"), [("gpt-4o", 101), ("gpt-4o-mini", 101), ("gpt-4", 105),
                                                  ("gpt-3.5-turbo", 105)])
def test_tool_definitions_are_counted_at_least_as_the_api_counts_them(model: str, api_count: int) -> None:
    # The cookbook's API output for these messages and this tool: 101 prompt tokens on o200k, 105 on cl100k.
    body = {"model": model, "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    prompt = TokenEstimator().prompt_tokens(CHAT, body)
    assert api_count <= prompt <= api_count * 1.5
    legacy = {"model": model, "messages": COOKBOOK_TOOL_MESSAGES, "functions": [COOKBOOK_TOOLS[0]["function"]]}
    assert TokenEstimator().prompt_tokens(CHAT, legacy) >= api_count


@needs_encoding("o200k_base")
def test_tool_calls_and_tool_results_in_messages_are_counted() -> None:
    enc = o200k()
    arguments = json.dumps({"location": "San Francisco, CA", "unit": "celsius"})
    result = json.dumps({"temperature": 18, "conditions": "fog rolling in over the bay"})
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in SF?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_current_weather", "arguments": arguments}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]
    estimator = TokenEstimator()
    prompt = estimator.prompt_tokens(CHAT, {"model": "gpt-4o", "messages": messages})
    plain = estimator.prompt_tokens(CHAT, {"model": "gpt-4o", "messages": messages[:1]})
    assert prompt - plain >= count(enc, arguments) + count(enc, "get_current_weather") + count(enc, result) + 6


@needs_encoding("o200k_base")
def test_structured_output_schemas_count_as_prompt() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "description": "the final answer"},
                                               "confidence": {"type": "number"}}, "required": ["answer"]}
    schema_tokens = count(o200k(), json.dumps(schema, separators=(",", ":")))
    estimator = TokenEstimator()
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Q"}]}
    with_schema = {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
    assert estimator.prompt_tokens(CHAT, with_schema) - estimator.prompt_tokens(CHAT, chat) >= schema_tokens
    responses = {"model": "gpt-4o", "input": "Q"}
    with_format = {**responses, "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}}}
    delta = estimator.prompt_tokens("/v1/responses", with_format) - estimator.prompt_tokens("/v1/responses", responses)
    assert delta >= schema_tokens


@needs_encoding("o200k_base")
def test_responses_api_inputs_are_counted() -> None:
    enc = o200k()
    estimator = TokenEstimator()
    body = {"model": "gpt-4o", "instructions": "Answer in French.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is a token bucket?"}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": "token bucket"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "A rate limiting algorithm."},
    ], "tools": [{"type": "function", "name": "lookup", "description": "Look a term up",
                  "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]}
    texts = ["Answer in French.", "What is a token bucket?", '{"q": "token bucket"}', "A rate limiting algorithm."]
    assert estimator.prompt_tokens("/v1/responses", body) >= sum(count(enc, text) for text in texts) + 3 * 4
    assert estimator.prompt_tokens("/v1/responses", {"model": "gpt-4o", "input": "hello"}) == 3 + 1 + 1 + 3


# --- images, audio, files ----------------------------------------------------------------------------------------


def image_url(fmt: str, size: tuple[int, int], mode: str = "RGB", **save: Any) -> str:
    image_module = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    image_module.new(mode, size).save(buffer, format=fmt, **save)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def with_big_metadata(url: str, size: int = 20_000) -> str:
    """A JPEG whose frame header comes after a 20 KB APP1 segment, as with large EXIF data."""
    head, payload = url.split(",", 1)
    data = base64.b64decode(payload)
    segment = b"\xff\xe1" + (size + 2).to_bytes(2, "big") + b"\0" * size
    return f"{head},{base64.b64encode(data[:2] + segment + data[2:]).decode()}"


@pytest.mark.parametrize(("fmt", "options", "chunk"), [
    ("PNG", {}, None), ("GIF", {}, None), ("JPEG", {}, None), ("WEBP", {}, b"VP8 "),
    ("WEBP", {"lossless": True}, b"VP8L"), ("WEBP", {"mode": "RGBA"}, b"VP8X"),
])
def test_the_image_size_is_read_from_a_data_urls_header(fmt: str, options: dict[str, Any], chunk: bytes | None) -> None:
    url = image_url(fmt, (1000, 300), **options)
    if chunk is not None:
        assert base64.b64decode(url.split(",", 1)[1])[12:16] == chunk
    assert _media.image_size(url) == (1000, 300)


def test_a_jpeg_frame_header_behind_large_metadata_is_still_found() -> None:
    assert _media.image_size(with_big_metadata(image_url("JPEG", (640, 480)))) == (640, 480)


@pytest.mark.parametrize("url", ["https://example.com/a.png", "data:image/png;base64,", "data:,plain",
                                 "data:image/png;base64,!!!!", "data:image/png;base64,iVBORw0KGgo="])
def test_an_unknown_image_size_is_none(url: str) -> None:
    assert _media.image_size(url) is None


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    spec = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": spec}


@pytest.mark.parametrize(("model", "size", "detail", "tokens"), [
    # OpenAI's worked examples: 1024x1024 high -> 4 tiles, 765; 2048x4096 -> 6 tiles, 1105; low -> 85.
    ("gpt-4o", (1024, 1024), "high", 765), ("gpt-4o", (2048, 4096), "high", 1105), ("gpt-4o", (4000, 3000), "low", 85),
    ("gpt-4o", (1024, 1024), None, 765),  # auto is charged as high
    ("gpt-4o-mini-2024-07-18", (1024, 1024), "high", 2833 + 4 * 5667), ("gpt-4o-mini", (512, 512), "low", 2833),
    ("o3", (512, 512), "high", 75 + 150), ("gpt-5", (512, 512), "high", 70 + 140),
    # Patch models: 1024x1024 is 1,024 patches, times 1.62 on gpt-4.1-mini; detail does not lower it.
    ("gpt-4.1-mini", (1024, 1024), "low", math.ceil(1024 * 1.62)),
    ("gpt-4.1-nano", (64, 32), "high", math.ceil(2 * 2.46)),
    # 1800x2400 is 4,275 patches, scaled down under the 1,536 cap (OpenAI's example: 1,452 patches): the cap.
    ("gpt-4.1-mini", (1800, 2400), "high", math.ceil(1536 * 1.62)),
])
def test_image_tokens_follow_openais_formulas(
    model: str, size: tuple[int, int], detail: str | None, tokens: int
) -> None:
    assert _media.image_tokens(image_part(image_url("PNG", size), detail), model) == tokens


@pytest.mark.parametrize(("model", "most", "least"), [
    ("gpt-4o", 85 + 8 * 170, 85), ("gpt-4o-mini", 2833 + 8 * 5667, 2833),
    ("gpt-4.1-mini", math.ceil(1536 * 1.62), 2), ("some-vision-model", 85 + 8 * 170, 85),
])
def test_an_image_of_unknown_size_is_charged_the_most_and_checked_at_the_least(
    model: str, most: int, least: int
) -> None:
    remote = {"type": "input_image", "image_url": "https://example.com/photo.jpg", "detail": "auto"}
    assert _media.image_tokens(remote, model) == most
    assert _media.image_tokens(remote, model, lower=True) == least


def test_image_parts_are_charged_in_chat_and_responses_bodies_without_counting_their_data_as_text() -> None:
    url = image_url("PNG", (1024, 1024))
    estimator = TokenEstimator(tokenizer=len)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                                          image_part(url, "high")]}]}
    assert estimator.prompt_tokens(CHAT, chat) == 3 + 3 + len("user") + len("what?") + 765
    responses = {"model": "gpt-4o", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url, "detail": "low"}]}]}
    assert estimator.prompt_tokens("/v1/responses", responses) == 3 + 3 + len("user") + 85


def wav_base64(seconds: float, rate: int = 16_000) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return base64.b64encode(buffer.getvalue()).decode()


def test_audio_is_charged_10_tokens_a_second_from_a_wav_header() -> None:
    part = {"type": "input_audio", "input_audio": {"data": wav_base64(2.5), "format": "wav"}}
    assert 25 <= _media.audio_tokens(part) <= 26
    assert 25 <= _media.audio_tokens(part, lower=True) <= 26
    stereo_48k = {"type": "input_audio", "input_audio": {"data": wav_base64(1.0, rate=48_000), "format": "wav"}}
    assert 10 <= _media.audio_tokens(stereo_48k) <= 11


def test_audio_of_unknown_duration_is_assumed_a_low_bitrate() -> None:
    data = base64.b64encode(b"\xff\xfb" + b"\0" * 31_998).decode()  # 32,000 bytes of "mp3"
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "mp3"}}
    assert _media.audio_tokens(part) == 160  # 16 s at 2,000 bytes a second
    assert _media.audio_tokens(part, lower=True) == 0


def test_file_parts_are_charged_by_size_not_tokenized_as_text() -> None:
    data = base64.b64encode(b"%PDF-1.7" + b"x" * 39_992).decode()
    estimator = TokenEstimator(tokenizer=len)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{data}"}}]}]}
    assert estimator.prompt_tokens(CHAT, chat) == 3 + 3 + len("user") + len("a.pdf") + 10_000
    responses = {"model": "gpt-4o", "input": [{"role": "user", "content": [
        {"type": "input_file", "filename": "a.pdf", "file_data": f"data:application/pdf;base64,{data}"}]}]}
    assert estimator.prompt_tokens("/v1/responses", responses) == 3 + 3 + len("user") + len("a.pdf") + 10_000


# --- never raising; never below the true count -------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
MAGIC = [b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"RIFF\0\0\0\0WEBPVP8L",
         b"RIFF\0\0\0\0WEBPVP8X", b"\xff\xd8", b"\xff\xd8\xff\xc0", b"RIFF\0\0\0\0WAVEfmt ", b""]
BLOBS = st.builds(lambda magic, rest: base64.b64encode(magic + rest).decode(), st.sampled_from(MAGIC),
                  st.binary(max_size=64))
DATA_URLS = BLOBS.map(lambda blob: f"data:image/png;base64,{blob}")
DETAILS = st.sampled_from(["low", "high", "auto", "original"]) | JSON
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text() | JSON}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": DATA_URLS | JSON, "detail": DETAILS}) | JSON}),
    st.fixed_dictionaries({"type": st.just("input_image"), "image_url": DATA_URLS | JSON, "detail": DETAILS}),
    st.fixed_dictionaries({"type": st.just("input_audio"),
                           "input_audio": st.fixed_dictionaries({"data": BLOBS | JSON, "format": JSON}) | JSON}),
    st.fixed_dictionaries({"type": st.sampled_from(["file", "input_file"]),
                           "file": st.fixed_dictionaries({"file_data": DATA_URLS | JSON, "filename": JSON}) | JSON,
                           "file_data": DATA_URLS | JSON}),
    JSON,
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]) | JSON},
                          optional={"content": st.text() | st.lists(PARTS, max_size=3) | JSON, "name": JSON,
                                    "tool_calls": st.lists(JSON, max_size=2) | JSON, "type": JSON}) | JSON,
    max_size=4,
)
MODELS = st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "gpt-4", "gpt-5", "o3", "text-embedding-3-small",
                          "omni-moderation-latest", "unknown"]) | JSON
BODIES = JSON | st.fixed_dictionaries({}, optional={
    "model": MODELS, "messages": MESSAGES, "input": MESSAGES | st.lists(PARTS, max_size=3) | JSON,
    "prompt": JSON, "instructions": JSON, "tools": st.lists(JSON, max_size=3) | JSON, "functions": JSON,
    "tool_choice": JSON, "response_format": JSON, "text": JSON, "prediction": JSON, "suffix": JSON,
    "max_tokens": JSON, "max_completion_tokens": JSON, "max_output_tokens": JSON, "n": JSON, "best_of": JSON,
})


@BOUNDED
@given(endpoint=st.sampled_from(ENDPOINTS), body=BODIES)
def test_no_json_body_makes_the_estimator_raise(endpoint: str, body: Any) -> None:
    estimator = TokenEstimator()
    estimate = estimator.estimate(endpoint, body)
    least = estimator.prompt_tokens(endpoint, body, lower=True)
    assert isinstance(estimate, int) and estimate >= 0
    assert 0 <= least <= estimator.prompt_tokens(endpoint, body) <= estimate
    assert estimator.prompt_chars(endpoint, body) >= 0
    assert all(tokens >= 0 for tokens in estimator.input_tokens(body))


def test_deeply_nested_bodies_do_not_exhaust_the_stack() -> None:
    nested: Any = "deep"
    for _ in range(20_000):
        nested = [{"content": nested}]
    estimator = TokenEstimator(tokenizer=len)
    for endpoint in ENDPOINTS:
        assert estimator.estimate(endpoint, {"messages": nested, "input": nested, "tools": [nested]}) >= 4


@BOUNDED
@given(data=st.binary(max_size=96), magic=st.sampled_from(MAGIC))
def test_no_bytes_make_the_image_or_audio_readers_raise(data: bytes, magic: bytes) -> None:
    blob = base64.b64encode(magic + data).decode()
    size = _media.image_size(f"data:image/png;base64,{blob}")
    assert size is None or (size[0] > 0 and size[1] > 0)
    assert _media.audio_tokens({"input_audio": {"data": blob}}) >= 0


TEXT_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": st.text()},
        optional={"name": st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)},
    ),
    min_size=1, max_size=6,
)


@needs_encoding("o200k_base", "cl100k_base")
@BOUNDED
@given(model=st.sampled_from(["gpt-4o-mini", "gpt-4"]), messages=TEXT_MESSAGES,
       cap=st.none() | st.integers(1, 4000), n=st.integers(1, 3))
def test_a_text_chat_is_never_estimated_below_the_cookbook_count(
    model: str, messages: list[dict[str, str]], cap: int | None, n: int
) -> None:
    enc = tiktoken.get_encoding(encoding_name_for_model(model))
    body: dict[str, Any] = {"model": model, "messages": messages, "n": n}
    if cap is not None:
        body["max_tokens"] = cap
    estimator = TokenEstimator(default_output_tokens=512)
    true_prompt = cookbook_messages(messages, enc)
    assert estimator.prompt_tokens(CHAT, body) >= true_prompt
    assert estimator.estimate(CHAT, body) >= true_prompt + (cap or 512) * n


PROPERTY = st.fixed_dictionaries(
    {"type": st.sampled_from(["string", "number", "integer", "boolean"]), "description": st.text(max_size=40)},
    optional={"enum": st.lists(st.text(max_size=12), min_size=1, max_size=6)},
)
TOOLS = st.lists(
    st.builds(
        lambda name, description, properties: {"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": properties}}},
        st.from_regex(r"[a-z_]{1,24}", fullmatch=True), st.text(max_size=60),
        st.dictionaries(st.from_regex(r"[a-z_]{1,16}", fullmatch=True), PROPERTY, max_size=5),
    ),
    min_size=1, max_size=3,
)


@needs_encoding("o200k_base", "cl100k_base")
@BOUNDED
@given(model=st.sampled_from(["gpt-4o", "gpt-4"]), tools=TOOLS, messages=TEXT_MESSAGES)
def test_tool_definitions_are_never_estimated_below_the_cookbook_count(
    model: str, tools: list[dict[str, Any]], messages: list[dict[str, str]]
) -> None:
    enc = tiktoken.get_encoding(encoding_name_for_model(model))
    func_init = 7 if model == "gpt-4o" else 10
    body = {"model": model, "messages": messages, "tools": tools}
    true_prompt = cookbook_messages(messages, enc) + cookbook_tools(tools, enc, func_init)
    assert TokenEstimator().prompt_tokens(CHAT, body) >= true_prompt


# --- offline: the fallback, one whole warning, the cache command --------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """tiktoken cannot load any encoding, as on a machine without network and without a cache."""
    def unreachable(name: str) -> None:
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max "
                              "retries exceeded with url: /encodings/o200k_base.tiktoken (Caused by NameResolution"
                              "Error(...)) " * 3)

    tokens._load_encoder.cache_clear()
    monkeypatch.setattr(tokens, "_warned_unavailable", False)
    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)
    yield
    tokens._load_encoder.cache_clear()


@pytest.mark.usefixtures("offline")
def test_offline_estimates_fall_back_to_two_bytes_a_token_with_one_whole_warning() -> None:
    with capture_logs() as logs:
        body = {"model": "gpt-4o", "input": "x" * 40, "max_output_tokens": 5}
        assert TokenEstimator().estimate("/v1/responses", body) == 3 + 2 + 20 + 3 + 5  # framing, "user", text
        TokenEstimator().estimate(CHAT, {"model": "gpt-4", "messages": [{"role": "user", "content": "日本語"}],
                                         "max_tokens": 5})
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["tokenizer_unavailable"]  # one, for both encodings
    warning = warnings[0]
    assert warning["encoding"] == "o200k_base"
    assert warning["error"] == (
        "could not load the tiktoken encoding o200k_base (ConnectionError: no network, or no readable cache?)"
    )
    assert "TIKTOKEN_CACHE_DIR" in warning["fix"] and "Offline machines" in warning["fix"]
    assert "2 bytes" in warning["fallback"]


@pytest.mark.usefixtures("offline")
def test_offline_the_context_check_counts_no_text_so_that_it_refuses_nothing_on_a_guess() -> None:
    estimator = TokenEstimator()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a fairly long text " * 100}]}
    assert not estimator.has_encoding("gpt-4o")
    assert estimator.prompt_tokens(CHAT, body) >= len("a fairly long text " * 100) // 2
    assert estimator.prompt_tokens(CHAT, body, lower=True) == 3 + 3


@needs_encoding("o200k_base", "cl100k_base")
@pytest.mark.parametrize("sample", [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def f(x):\n    return {'a': [x, x * 2]}\n" * 20,
    " ".join(str(n * 7919) for n in range(300)),
    "お誕生日おめでとう。今日は天気がいいですね。我们今天去公园散步吧。" * 20,
    json.dumps([{"id": n, "name": f"user{n}", "score": n / 7} for n in range(50)]),
    "Привет, как дела? Сегодня хорошая погода. " * 20,
])
def test_the_fallback_does_not_undercount_everyday_texts(sample: str) -> None:
    # The reason for 2 bytes a token rather than 4 characters: prose, code, digits, CJK and JSON stay covered.
    for enc in (o200k(), cl100k()):
        assert tokens._fallback_count(sample) >= count(enc, sample)


def test_a_hanging_download_is_given_up_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(name: str) -> None:
        release.wait(5)
        raise ConnectionError("gave up")

    tokens._load_encoder.cache_clear()
    monkeypatch.setattr(tokens, "_warned_unavailable", False)
    monkeypatch.setattr(tokens, "_LOAD_TIMEOUT_S", 0.05)
    monkeypatch.setattr(tiktoken, "get_encoding", hang)
    try:
        with capture_logs() as logs:
            assert TokenEstimator().text_tokens("abcd", "gpt-4o") == 2
        assert "TimeoutError" in logs[0]["error"]
        assert not encoding_available("o200k_base", timeout_s=0.05)
    finally:
        release.set()
        tokens._load_encoder.cache_clear()


def test_the_download_command_has_tiktoken_fill_the_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[tuple[str, str | None]] = []

    def fake_get_encoding(name: str) -> None:
        folder = os.environ.get("TIKTOKEN_CACHE_DIR")
        seen.append((name, folder))
        Path(folder or ".", f"hash-of-{name}").write_bytes(b"ranks")

    monkeypatch.setattr(tiktoken, "get_encoding", fake_get_encoding)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/elsewhere")
    target = tmp_path / "cache"
    assert tiktoken_cache.main(["download", str(target)]) == 0
    assert seen == [("o200k_base", str(target.resolve())), ("cl100k_base", str(target.resolve()))]
    assert sorted(path.name for path in target.iterdir()) == ["hash-of-cl100k_base", "hash-of-o200k_base"]
    assert "TIKTOKEN_CACHE_DIR" in capsys.readouterr().out
    assert os.environ["TIKTOKEN_CACHE_DIR"] == "/elsewhere"  # restored


@pytest.mark.usefixtures("offline")
def test_the_download_command_says_it_needs_network(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiktoken_cache.main(["download", str(tmp_path)]) == 1
    assert "needs network access" in capsys.readouterr().err
    assert tiktoken_cache.main(["check"]) == 1
    assert "o200k_base: missing" in capsys.readouterr().out


def test_tests_that_need_a_missing_encoding_skip_saying_how_to_provide_it() -> None:
    mark = needs_encoding("no_such_encoding")
    assert mark.args == (True,)
    assert mark.kwargs["reason"] == f"no tiktoken encoding no_such_encoding: {HOW_TO_PROVIDE}"
    assert "TIKTOKEN_CACHE_DIR" in mark.kwargs["reason"] and "Offline machines" in mark.kwargs["reason"]
