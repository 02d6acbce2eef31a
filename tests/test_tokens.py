from __future__ import annotations

import pytest
import tiktoken
from structlog.testing import capture_logs

from scheduler import tokens
from scheduler.tokens import TokenEstimator, encoding_name_for_model


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o-mini", "o200k_base"), ("gpt-4.1", "o200k_base"), ("o3-mini", "o200k_base"), ("gpt-5", "o200k_base"),
     ("gpt-4", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
     ("openai/gpt-4o", "o200k_base"), ("some-local-llama", "o200k_base")],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


def test_chat_estimate_counts_messages_overhead_and_the_output_reservation_times_n() -> None:
    enc = tiktoken.get_encoding("o200k_base")
    body = {"model": "gpt-4o-mini", "max_tokens": 50, "n": 2, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Explain token buckets", "name": "ann"},
    ]}
    prompt = sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in body["messages"])  # type: ignore[index]
    prompt += len(enc.encode("ann")) + 1 + 3
    assert TokenEstimator().estimate("/v1/chat/completions", body) == prompt + 100


def test_embeddings_have_no_output_reservation() -> None:
    enc = tiktoken.get_encoding("cl100k_base")
    body = {"model": "text-embedding-3-small", "input": ["alpha beta", "gamma"]}
    assert TokenEstimator().estimate("/v1/embeddings", body) == len(enc.encode("alpha beta")) + len(enc.encode("gamma"))


def test_uncapped_requests_get_the_default_reservation_and_one_warning() -> None:
    estimator = TokenEstimator(default_output_tokens=700)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with capture_logs() as logs:
        first = estimator.estimate("/v1/chat/completions", body)
        estimator.estimate("/v1/chat/completions", body)
    assert first >= 700
    assert [e["event"] for e in logs] == ["output_cap_missing"]


def test_falls_back_to_characters_with_one_warning_when_the_encoding_cannot_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(name: str) -> None:
        raise ConnectionError("no network")

    tokens._load_encoder.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    try:
        with capture_logs() as logs:
            body = {"model": "gpt-4o", "input": "x" * 40, "max_output_tokens": 5}
            assert TokenEstimator().estimate("/v1/responses", body) == 10 + 5
            TokenEstimator().estimate("/v1/responses", body)
        assert [e["event"] for e in logs] == ["tokenizer_unavailable"]
    finally:
        tokens._load_encoder.cache_clear()
