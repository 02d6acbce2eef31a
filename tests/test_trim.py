from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import ConfigurationError, RequestTooLarge
from scheduler.tokens import TokenEstimator
from scheduler.trim import (
    DEFAULT_WINDOWS,
    ContextWindow,
    ContextWindows,
    TrimPolicy,
    check_context,
    fit_request,
    prompt_limit,
    trim_messages,
)

CHAT = "/v1/chat/completions"


def words(text: str) -> int:
    return len(text.split())


# One token per word: counts the tests can do by hand, with no tiktoken encoding needed.
ESTIMATOR = TokenEstimator(tokenizer=words)


def say(role: str, n_words: int, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": " ".join(["w"] * n_words), **extra}


def call(call_id: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def answer(call_id: str, n_words: int) -> dict[str, Any]:
    return say("tool", n_words, tool_call_id=call_id)


def message_cost(message: dict[str, Any]) -> int:
    return ESTIMATOR.message_tokens(message, "")


# --- the table ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "tokens"), [
    ("gpt-4o", 128_000), ("gpt-4o-mini-2024-07-18", 128_000), ("openai/gpt-4.1-mini", 1_047_576),
    ("gpt-4", 8_192), ("gpt-4-0613", 8_192), ("gpt-4-turbo-2024-04-09", 128_000), ("gpt-4-32k", 32_768),
    ("gpt-3.5-turbo", 16_385), ("o1-mini", 128_000), ("o1", 200_000), ("o3-mini", 200_000), ("o4-mini", 200_000),
    ("gpt-5-mini", 400_000), ("gpt-5-chat-latest", 128_000), ("ft:gpt-4o-mini-2024-07-18:acme::abc", 128_000),
    ("text-embedding-3-large", 300_000),
])
def test_windows_are_found_by_the_longest_listed_prefix(model: str, tokens: int) -> None:
    window = ContextWindows().window(model)
    assert window is not None and window.tokens == tokens


def test_unknown_models_have_no_window_and_the_table_can_be_extended_or_overridden() -> None:
    windows = ContextWindows.load({"llama-3": 8_000, "gpt-4o": ContextWindow(64_000)})
    assert ContextWindows().window("llama-3-70b") is None
    assert windows.window("llama-3-70b") == ContextWindow(8_000)
    assert windows.window("gpt-4o-2024-08-06") == ContextWindow(64_000)
    assert windows.window("gpt-4.1") == DEFAULT_WINDOWS["gpt-4.1"]
    assert ContextWindows.load(windows) is windows


@pytest.mark.parametrize("entry", [0, -5, "128k", 1.5, True, {"tokens": 5}])
def test_a_bad_window_is_a_configuration_error(entry: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"context window of 'my-model'|ContextWindow\.tokens"):
        ContextWindows.load({"my-model": entry})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_input_tokens": 0}, "max_input_tokens"), ({"max_input_tokens": 2.5}, "max_input_tokens"),
    ({"keep_last": -1}, "keep_last"), ({"keep_last": True}, "keep_last"),
])
def test_a_bad_trim_policy_is_a_configuration_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        TrimPolicy(**kwargs)


def test_the_prompt_limit_leaves_room_for_the_output_within_the_input_limit() -> None:
    assert prompt_limit(ContextWindow(128_000), 1_000) == 127_000
    gpt5 = ContextWindow(400_000, max_input=272_000)
    assert prompt_limit(gpt5, 1_000) == 272_000  # the input limit binds
    assert prompt_limit(gpt5, 200_000) == 200_000  # the window binds
    assert prompt_limit(None, 1_000) is None
    assert prompt_limit(None, 1_000, max_input_tokens=500) == 500
    assert prompt_limit(gpt5, 1_000, max_input_tokens=500) == 500


# --- the check ---------------------------------------------------------------------------------------------------


def test_a_request_over_the_window_fails_at_once_naming_the_window_and_the_sizes() -> None:
    body = {"model": "gpt-4", "messages": [say("user", 8_000)], "max_tokens": 500}
    prompt = ESTIMATOR.prompt_tokens(CHAT, body)
    with pytest.raises(RequestTooLarge) as caught:
        fit_request(CHAT, body, ESTIMATOR, ContextWindows())
    assert str(caught.value) == (
        f"the prompt needs {prompt:,} tokens beside an output cap of 500: more than gpt-4's context window of "
        "8,192 tokens (trim=True, or --trim, drops the oldest messages)"
    )
    fitting = {**body, "max_tokens": 100}
    assert fit_request(CHAT, fitting, ESTIMATOR, ContextWindows()).body is fitting


def test_the_output_cap_counts_once_and_no_cap_reserves_nothing_in_the_window() -> None:
    windows = ContextWindows.load({"m": 1_000})
    body = {"model": "m", "messages": [say("user", 400)]}  # 407 tokens
    fit_request(CHAT, {**body, "max_tokens": 500, "n": 4}, ESTIMATOR, windows)  # each choice is its own generation
    fit_request(CHAT, body, ESTIMATOR, windows)  # uncapped: the server stops the output at the window's end
    with pytest.raises(RequestTooLarge):
        fit_request(CHAT, {**body, "max_completion_tokens": 600}, ESTIMATOR, windows)


def test_gpt5_prompts_are_held_to_its_input_limit() -> None:
    body = {"model": "gpt-5", "input": " ".join(["w"] * 280_000), "max_output_tokens": 1_000}
    with pytest.raises(RequestTooLarge, match="gpt-5's limit of 272,000 input tokens \\(context window: 400,000\\)"):
        fit_request("/v1/responses", body, ESTIMATOR, ContextWindows())


def test_each_embeddings_input_is_held_to_the_per_input_limit() -> None:
    windows = ContextWindows()
    fine = {"model": "text-embedding-3-small", "input": ["w " * 8_000, "w " * 8_000]}
    fit_request("/v1/embeddings", fine, ESTIMATOR, windows)
    too_long = {"model": "text-embedding-3-small", "input": ["short", "w " * 9_000]}
    with pytest.raises(RequestTooLarge, match="input 1 needs 9,000 tokens: more than text-embedding-3-small's limit "
                                              "of 8,192 tokens per input"):
        fit_request("/v1/embeddings", too_long, ESTIMATOR, windows)
    token_arrays = {"model": "text-embedding-3-small", "input": [[1] * 9_000]}
    with pytest.raises(RequestTooLarge, match="input 0 needs 9,000"):
        fit_request("/v1/embeddings", token_arrays, ESTIMATOR, windows)


def test_images_of_unknown_size_do_not_make_the_check_refuse_a_request_that_may_fit() -> None:
    # Ten remote images on gpt-4o-mini: at most 48,169 tokens each (charged so against TPM), at least 2,833.
    image = {"type": "image_url", "image_url": {"url": "https://example.com/p.jpg"}}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [image] * 10}], "max_tokens": 100}
    fitted = fit_request(CHAT, body, ESTIMATOR, ContextWindows())
    assert fitted.prompt_tokens > 128_000 and fitted.trimmed == 0
    with pytest.raises(RequestTooLarge):
        fit_request(CHAT, {**body, "messages": [{"role": "user", "content": [image] * 50}]}, ESTIMATOR,
                    ContextWindows())


def test_an_explicit_input_limit_is_checked_without_a_window() -> None:
    body = {"model": "gpt-4", "messages": [say("user", 10)]}
    check_context(CHAT, body, ESTIMATOR, window=None, output_tokens=0, max_input_tokens=17)
    with pytest.raises(RequestTooLarge, match="needs 17 tokens: more than the limit of 16 input tokens "
                                              "\\(max_input_tokens\\)"):
        check_context(CHAT, body, ESTIMATOR, window=None, output_tokens=0, max_input_tokens=16)


# --- trimming ----------------------------------------------------------------------------------------------------


def conversation() -> list[dict[str, Any]]:
    return [
        say("system", 20),                      # 0 kept
        say("user", 100), say("assistant", 100),  # 1, 2
        call("c1"), answer("c1", 100), answer("c1", 100),  # 3-5: one group
        say("developer", 20),                   # 6 kept
        say("user", 100), say("assistant", 100),  # 7, 8
        say("user", 10),                        # 9: the last user message, kept
        call("c2"), answer("c2", 30),           # 10, 11: after it, kept
    ]


def test_trimming_drops_the_oldest_messages_until_the_prompt_fits() -> None:
    messages = conversation()
    body = {"model": "m", "messages": messages, "max_tokens": 100}
    original = copy.deepcopy(body)
    total = ESTIMATOR.prompt_tokens(CHAT, body)
    # Room for everything but the first two droppable messages (user 1 and assistant 2).
    limit = total - message_cost(messages[1]) - message_cost(messages[2])
    fitted = trim_messages(body, ESTIMATOR, window=ContextWindow(limit + 100), output_tokens=100)
    assert fitted.trimmed == 2
    assert fitted.body["messages"] == [messages[0], *messages[3:]]
    assert fitted.prompt_tokens == ESTIMATOR.prompt_tokens(CHAT, fitted.body) <= limit
    assert body == original  # pure: the caller's body is untouched


def test_a_tool_call_goes_with_its_results_and_system_developer_and_the_last_turn_stay() -> None:
    messages = conversation()
    body = {"model": "m", "messages": messages}
    fitted = trim_messages(body, ESTIMATOR, window=ContextWindow(200), output_tokens=0)
    kept = fitted.body["messages"]
    assert kept == [messages[0], messages[6], messages[9], messages[10], messages[11]]
    assert fitted.trimmed == 7
    # One token under the room the first groups free: the whole tool group goes, not a part of it.
    tight = ESTIMATOR.prompt_tokens(CHAT, body) - sum(message_cost(messages[i]) for i in (1, 2, 3)) - 1
    partly = trim_messages(body, ESTIMATOR, window=ContextWindow(tight), output_tokens=0)
    assert partly.body["messages"] == [messages[0], messages[6], *messages[7:]]


def test_keep_last_protects_the_most_recent_messages() -> None:
    messages = [say("user", 100), say("assistant", 100), say("user", 100), say("assistant", 100)]
    body = {"model": "m", "messages": messages}
    with pytest.raises(RequestTooLarge):
        trim_messages(body, ESTIMATOR, window=ContextWindow(250), output_tokens=0, policy=TrimPolicy(keep_last=3))
    fitted = trim_messages(body, ESTIMATOR, window=ContextWindow(250), output_tokens=0, policy=TrimPolicy(keep_last=0))
    # The last user message (index 2) and what follows it stay whatever keep_last says.
    assert fitted.body["messages"] == messages[2:]


def test_a_call_whose_results_must_stay_is_not_dropped() -> None:
    # keep_last=3 keeps the second answer: the call it answers, and the first answer, stay with it.
    messages = [say("user", 5), say("assistant", 100), call("c"), answer("c", 100), answer("c", 100), say("user", 5)]
    body = {"model": "m", "messages": messages}
    fitted = trim_messages(body, ESTIMATOR, window=ContextWindow(300), output_tokens=0, policy=TrimPolicy(keep_last=3))
    assert fitted.body["messages"] == messages[2:]
    with pytest.raises(RequestTooLarge):  # rather than send tool results whose call is gone
        trim_messages(body, ESTIMATOR, window=ContextWindow(150), output_tokens=0, policy=TrimPolicy(keep_last=3))


def test_trimming_that_cannot_fit_fails_naming_the_sizes() -> None:
    messages = [say("system", 500), say("user", 100), say("assistant", 100), say("user", 600)]
    body = {"model": "gpt-4", "messages": messages, "max_tokens": 7_500}
    with pytest.raises(RequestTooLarge) as caught:
        fit_request(CHAT, body, ESTIMATOR, ContextWindows(), trim=TrimPolicy())
    kept = ESTIMATOR.prompt_tokens(CHAT, {"model": "gpt-4", "messages": [messages[0], messages[3]]})
    assert str(caught.value) == (
        f"even after dropping the 2 messages that may go, the prompt needs {kept:,} tokens beside an output "
        "cap of 7,500: more than gpt-4's context window of 8,192 tokens (system and developer messages, the last "
        "user message and what follows it are kept)"
    )


def test_an_explicit_input_limit_trims_models_without_a_known_window() -> None:
    messages = [say("user", 100), say("assistant", 100), say("user", 10)]
    body = {"model": "my-local-model", "messages": messages}
    fitted = fit_request(CHAT, body, ESTIMATOR, ContextWindows(), trim=TrimPolicy(max_input_tokens=50))
    assert fitted.trimmed == 2 and fitted.body["messages"] == messages[2:]
    assert fit_request(CHAT, body, ESTIMATOR, ContextWindows(), trim=TrimPolicy()).trimmed == 0  # no window known


def test_fit_request_gives_the_prompt_the_estimate_is_made_of() -> None:
    body = {"model": "gpt-4o", "messages": [say("system", 3), say("user", 7)], "max_tokens": 20, "n": 2}
    fitted = fit_request(CHAT, body, ESTIMATOR, ContextWindows(), trim=TrimPolicy())
    assert fitted.body is body and fitted.trimmed == 0
    assert fitted.prompt_tokens + ESTIMATOR.output_tokens(CHAT, fitted.body) == ESTIMATOR.estimate(CHAT, body)
    unknown = {"model": "unknown", "messages": [say("user", 7)]}
    assert fit_request(CHAT, unknown, ESTIMATOR, None).prompt_tokens == ESTIMATOR.prompt_tokens(CHAT, unknown)


def test_other_endpoints_are_checked_not_trimmed() -> None:
    body = {"model": "gpt-4", "input": [say("user", 5_000), say("user", 5_000)], "max_output_tokens": 10}
    with pytest.raises(RequestTooLarge, match=r"gpt-4's context window of 8,192 tokens$"):
        fit_request("/v1/responses", body, ESTIMATOR, ContextWindows(), trim=TrimPolicy())


SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 50) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
CHAT_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
                          optional={"content": st.text(" w", max_size=60) | SMALL_JSON,
                                    "tool_calls": st.lists(SMALL_JSON, max_size=2)}) | SMALL_JSON,
    max_size=8,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=CHAT_MESSAGES, window=st.integers(1, 300), output=st.integers(0, 50), keep_last=st.integers(0, 3))
def test_trimming_any_chat_keeps_order_and_the_kept_roles_or_fails_with_request_too_large(
    messages: list[Any], window: int, output: int, keep_last: int
) -> None:
    body = {"model": "m", "messages": messages, "max_tokens": output}
    try:
        fitted = trim_messages(body, ESTIMATOR, window=ContextWindow(window), output_tokens=output,
                               policy=TrimPolicy(keep_last=keep_last))
    except RequestTooLarge:
        return
    kept = fitted.body["messages"]
    assert fitted.trimmed == len(messages) - len(kept)
    assert fitted.prompt_tokens == ESTIMATOR.prompt_tokens(CHAT, fitted.body)
    remaining = iter(messages)
    assert all(any(message is candidate for candidate in remaining) for message in kept)  # a subsequence
    for message in messages:
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            assert any(message is candidate for candidate in kept)
    users = [i for i, message in enumerate(messages) if isinstance(message, dict) and message.get("role") == "user"]
    if users:
        assert all(any(message is candidate for candidate in kept) for message in messages[users[-1]:])
