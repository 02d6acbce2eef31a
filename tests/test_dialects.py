"""Each provider's rate-limit headers and refusals, read as the provider means them.

Header sets and bodies are copied from the places named beside them (docs, recorded responses in public
repositories, issue threads); where a body is reconstructed from a documented shape, the comment says so.
"""

from __future__ import annotations

import email.utils
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.dialects import DIALECTS, DialectTracker, LimitReport, Window, detect_dialect, read_limits
from scheduler.mock.ratelimit import format_duration
from scheduler.refusals import Refusal, refusal_kind, retry_after_s

# Thu, 21 Aug 2025 12:41:00 GMT, the date of the recorded Anthropic response below.
NOW = 1755780060.0

# OpenAI's rate-limit guide, "Rate limits in headers" (sample values).
OPENAI_DOCS = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-limit-tokens": "150000",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-remaining-tokens": "149984",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-reset-tokens": "6m0s",
}
# A chat completion's headers as a user posted them (community.openai.com/t/1268905), with the usual neighbours.
OPENAI_RECORDED = {
    "date": "Mon, 26 May 2025 05:00:04 GMT",
    "content-type": "application/json",
    "openai-organization": "user-abc",
    "openai-processing-ms": "412",
    "openai-version": "2020-10-01",
    "x-ratelimit-limit-requests": "5000",
    "x-ratelimit-limit-tokens": "160000",
    "x-ratelimit-limit-tokens_usage_based": "160000",
    "x-ratelimit-remaining-requests": "4999",
    "x-ratelimit-remaining-tokens": "159976",
    "x-ratelimit-remaining-tokens_usage_based": "159976",
    "x-ratelimit-reset-requests": "12ms",
    "x-ratelimit-reset-tokens": "9ms",
    "x-request-id": "req_deaa3616cbd15d33b4db96b3ba74d2b4",
}
# An OpenAI 200 without any x-ratelimit-* (community.openai.com/t/935514).
OPENAI_WITHOUT_LIMITS = {
    "date": "Tue, 10 Sep 2024 23:58:08 GMT",
    "content-type": "application/json",
    "access-control-expose-headers": "X-Request-ID",
    "openai-organization": "studiosity",
    "openai-processing-ms": "1032",
    "openai-version": "2020-10-01",
    "x-request-id": "req_deaa3616cbd15d33b4db96b3ba74d2b4",
    "server": "cloudflare",
}
# An Azure OpenAI completion, api-version 2024-02-01, as recorded in a public walkthrough: remaining only.
AZURE_RECORDED = {
    "Cache-Control": "no-cache, must-revalidate",
    "Content-Type": "application/json",
    "access-control-allow-origin": "*",
    "apim-request-id": "97431f0d-859c-48db-bc01-9b5f6df8ea3d",
    "x-ms-region": "West Europe",
    "x-ratelimit-remaining-requests": "29",
    "x-ratelimit-remaining-tokens": "29960",
    "x-ms-rai-invoked": "true",
    "x-request-id": "7b0041e6-b032-4bbe-8cd0-31efb80be5c2",
    "x-ms-client-request-id": "97431f0d-859c-48db-bc01-9b5f6df8ea3d",
    "azureml-model-session": "turbo-0301-b90147a4",
    "Date": "Tue, 09 Apr 2024 15:42:01 GMT",
}
# A 20,000 TPM / 120 RPM Azure deployment answers x-ratelimit-limit-requests: 20 (learn.microsoft.com/answers/
# questions/2265464); the other values follow from it.
AZURE_WITH_LIMITS = {
    "apim-request-id": "1249216d-0e54-4d4c-9942-67b9c59e8f3c",
    "x-ms-region": "East US",
    "x-ratelimit-limit-requests": "20",
    "x-ratelimit-remaining-requests": "19",
    "x-ratelimit-limit-tokens": "20000",
    "x-ratelimit-remaining-tokens": "19952",
}
# The Responses API on Azure (openai/openai-dotnet#838): -1 and 0.
AZURE_RESPONSES_API = {
    "apim-request-id": "5a0f7c3e-0000-0000-0000-000000000000",
    "x-ratelimit-limit-tokens": "-1",
    "x-ratelimit-remaining-tokens": "-1",
    "x-ratelimit-reset-tokens": "0",
}
# An Azure 429 (openai/openai-python#937).
AZURE_429 = {
    "Content-Length": "329",
    "Content-Type": "application/json",
    "x-rate-limit-reset-tokens": "55",
    "apim-request-id": "3f9c2a5e-0000-0000-0000-000000000000",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains; preload",
    "x-content-type-options": "nosniff",
    "policy-id": "DeploymentRatelimit-Token",
    "x-ms-region": "West US",
    "x-ratelimit-remaining-requests": "239",
}
AZURE_TOKEN_429_BODY = {"error": {"code": "429", "message": (
    "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-15-preview have "
    "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 33 seconds. Please go "
    "here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
)}}  # openai/openai-node#1108
AZURE_CALL_429_BODY = {"error": {"code": "429", "message": (
    "Requests to the Creates a completion for the chat message Operation under Azure OpenAI API version "
    "2023-03-15-preview have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 3 "
    "seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default "
    "rate limit."
)}}  # microsoft/action-python#12
# A recorded Anthropic response (tidyllm's test fixture, 2025-08-21).
ANTHROPIC_RECORDED = {
    "date": "Thu, 21 Aug 2025 12:41:00 GMT",
    "content-type": "application/json",
    "anthropic-ratelimit-input-tokens-limit": "80000",
    "anthropic-ratelimit-input-tokens-remaining": "80000",
    "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:59Z",
    "anthropic-ratelimit-output-tokens-limit": "16000",
    "anthropic-ratelimit-output-tokens-remaining": "16000",
    "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:41:00Z",
    "anthropic-ratelimit-requests-limit": "1000",
    "anthropic-ratelimit-requests-remaining": "999",
    "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:59Z",
    "anthropic-ratelimit-tokens-limit": "96000",
    "anthropic-ratelimit-tokens-remaining": "96000",
    "anthropic-ratelimit-tokens-reset": "2025-08-21T12:40:59Z",
    "request-id": "req_011CSLsW7mFqvHHnzrKdKjAE",
    "anthropic-organization-id": "36562039-1ae4-48e6-ae28-1e517e3d2d12",
    "x-envoy-upstream-service-time": "690",
    "server": "cloudflare",
}
# OpenHands/OpenHands#9259.
ANTHROPIC_ITPM_429_BODY = {"type": "error", "error": {"type": "rate_limit_error", "message": (
    "This request would exceed the rate limit for your organization (0dccdde6-f924-4f1b-bb3b-92ef846e0a5b) of "
    "20,000 input tokens per minute. For details, refer to: https://docs.anthropic.com/en/api/rate-limits. You can "
    "see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, "
    "or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your "
    "options for a rate limit increase."
)}}


# -- detection ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "dialect"),
    [
        (OPENAI_RECORDED, "openai"),
        (OPENAI_WITHOUT_LIMITS, "openai"),
        (OPENAI_DOCS, "openai"),  # bare x-ratelimit-* (OpenAI-compatible servers, the built-in mock)
        (AZURE_RECORDED, "azure"),
        (AZURE_429, "azure"),
        (ANTHROPIC_RECORDED, "anthropic"),
        ({"x-litellm-call-id": "c0ffee", **OPENAI_DOCS}, "litellm"),
        ({"llm_provider-apim-request-id": "x", "x-ratelimit-remaining-requests": "3"}, "litellm"),
        ({"x-ratelimit-api_key-remaining-requests": "9"}, "litellm"),
        ({}, None),
        ({"content-type": "text/html", "server": "cloudflare"}, None),  # an error page says nothing
        ({"content-type": "application/json", "server": "uvicorn"}, None),  # vLLM: nothing either
    ],
)
def test_the_dialect_is_recognised_from_distinctive_headers(headers: dict[str, str], dialect: str | None) -> None:
    assert detect_dialect(headers) == dialect


def test_a_learned_dialect_survives_answers_without_signs() -> None:
    tracker = DialectTracker()
    assert tracker.observe(200, OPENAI_RECORDED) == "openai"
    assert tracker.observe(502, {"content-type": "text/html"}) == "openai"  # a proxy's error page
    for _ in range(10):
        assert tracker.observe(200, {}) == "openai"


def test_servers_without_limit_headers_settle_on_none_after_a_few_successes() -> None:
    tracker = DialectTracker(settle_after=3)
    assert tracker.observe(500, {}) is None  # failures do not count: they may be anyone's error page
    assert tracker.observe(200, {"server": "uvicorn"}) is None
    assert tracker.observe(200, {}) is None
    assert tracker.observe(200, {}) == "none"
    assert tracker.observe(200, OPENAI_DOCS) == "openai"  # a sign still wins


def test_a_forced_dialect_overrides_what_the_headers_show() -> None:
    tracker = DialectTracker(forced="azure")
    assert tracker.dialect == "azure"
    assert tracker.observe(200, OPENAI_RECORDED) == "azure"
    assert set(DIALECTS) == {"openai", "azure", "anthropic", "litellm", "none"}


# -- limits --------------------------------------------------------------------------------------------------------


def test_openai_limits_are_per_minute_buckets_with_go_duration_resets() -> None:
    report = read_limits(OPENAI_DOCS, "openai", now_unix=NOW)
    assert report == LimitReport(
        "openai",
        requests=Window(60.0, 59.0, 60.0, 1.0, "continuous", "reservation"),
        tokens=Window(150000.0, 149984.0, 60.0, 360.0, "continuous", "reservation"),
    )
    recorded = read_limits(OPENAI_RECORDED, "openai", now_unix=NOW)
    assert recorded is not None and recorded.tokens is not None and recorded.requests is not None
    assert recorded.requests.reset_s == pytest.approx(0.012)
    assert recorded.tokens.limit == 160000.0 and recorded.tokens.remaining == 159976.0


def test_an_answer_without_limit_headers_reports_nothing() -> None:
    assert read_limits(OPENAI_WITHOUT_LIMITS, "openai", now_unix=NOW) is None
    assert read_limits({}, None, now_unix=NOW) is None
    assert read_limits(OPENAI_DOCS, "none", now_unix=NOW) is None


def test_azure_request_limit_counts_a_ten_second_window_and_is_read_per_minute() -> None:
    report = read_limits(AZURE_WITH_LIMITS, "azure", now_unix=NOW)
    assert report is not None and report.requests is not None and report.tokens is not None
    # A 120 RPM deployment says 20: it stays 120 per minute, of which 20 fit in the 10 s window.
    assert report.requests.limit == 120.0
    assert report.requests.window_s == 10.0 and report.requests.capacity == 20.0
    assert report.requests.remaining == 19.0
    assert report.tokens == Window(20000.0, 19952.0, 60.0, None, "continuous", "reservation")


def test_azure_answers_with_remaining_only_or_minus_one() -> None:
    report = read_limits(AZURE_RECORDED, None, now_unix=NOW)
    assert report is not None and report.dialect == "azure"
    assert report.requests == Window(None, 29.0, 10.0, None, "fixed_window", "reservation")
    assert report.tokens == Window(None, 29960.0, 60.0, None, "continuous", "reservation")
    # -1 is "not stated", never a limit of -1 or 0; the reset of 0 alone is no usable limit.
    assert read_limits(AZURE_RESPONSES_API, "azure", now_unix=NOW) is None


def test_anthropic_limits_split_input_and_output_tokens_with_rfc3339_resets() -> None:
    report = read_limits(ANTHROPIC_RECORDED, None, now_unix=NOW)
    assert report is not None and report.dialect == "anthropic"
    assert report.requests == Window(1000.0, 999.0, 60.0, 0.0, "continuous", "reservation")
    assert report.input_tokens == Window(80000.0, 80000.0, 60.0, 0.0, "continuous", "usage")
    assert report.output_tokens == Window(16000.0, 16000.0, 60.0, 0.0, "continuous", "usage")
    # The combined header is the sum of the two.
    assert report.tokens is not None and report.tokens.limit == 80000.0 + 16000.0
    later = {**ANTHROPIC_RECORDED, "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:41:15Z"}
    report = read_limits(later, "anthropic", now_unix=NOW)
    assert report is not None and report.output_tokens is not None and report.output_tokens.reset_s == 15.0


LITELLM_OWN_LIMITS = {
    # common_request_processing.get_custom_headers and proxy/hooks/_rate_limit_headers.py (BerriAI/litellm)
    "x-litellm-call-id": "4f0c8f39-7d7e-4c59-9d3e-2b9f0f4f6d5c",
    "x-litellm-model-id": "abc123def",
    "x-litellm-version": "1.74.0",
    "x-litellm-key-rpm-limit": "100",
    "x-litellm-key-tpm-limit": "None",
    "x-litellm-response-cost": "0.000123",
    "x-ratelimit-api_key-remaining-requests": "97",
    "x-ratelimit-api_key-limit-requests": "100",
    "x-ratelimit-api_key-remaining-tokens": "7400",
    "x-ratelimit-api_key-limit-tokens": "10000",
    "x-ratelimit-team-remaining-requests": "400",
    "x-ratelimit-team-limit-requests": "500",
    "x-ratelimit-api_key-remaining-max_parallel_requests": "3",
    "x-litellm-key-remaining-tokens-gpt-4o": "5000",  # callback_utils: the key's per-model limit
    "x-ratelimit-api_key-limit-max_parallel_requests": "4",
    # get_headers.get_response_headers: the provider's limits, copied plain and forwarded as llm_provider-*
    "x-ratelimit-limit-requests": "5000",
    "x-ratelimit-remaining-requests": "4999",
    "llm_provider-x-ratelimit-limit-requests": "5000",
    "llm_provider-x-ratelimit-remaining-requests": "4999",
    "llm_provider-x-ratelimit-reset-requests": "12ms",
    "llm_provider-openai-organization": "org-abc",
}


def test_litellm_reports_the_proxys_own_fixed_window_limits_first() -> None:
    report = read_limits(LITELLM_OWN_LIMITS, None, now_unix=NOW)
    assert report is not None and report.dialect == "litellm"
    # The tightest scope governs: the key's 100 RPM, with 97 left (the team allows 500, with 400 left).
    assert report.requests == Window(100.0, 97.0, 60.0, None, "fixed_window", "reservation")
    assert report.tokens == Window(10000.0, 5000.0, 60.0, None, "fixed_window", "usage")
    assert report.max_in_flight == 4


def test_litellm_without_key_limits_reports_its_provider_as_upstream() -> None:
    headers = {
        "x-litellm-call-id": "c0ffee",
        "x-ratelimit-limit-requests": "20",
        "x-ratelimit-remaining-requests": "19",
        "llm_provider-x-ratelimit-limit-requests": "20",
        "llm_provider-x-ratelimit-remaining-requests": "19",
        "llm_provider-apim-request-id": "97431f0d",
        "llm_provider-x-ms-region": "West Europe",
    }
    report = read_limits(headers, "litellm", now_unix=NOW)
    assert report is not None
    # Azure behind the proxy: its 10 s request window still reads as 120 per minute, marked as the provider's.
    assert report.requests == Window(120.0, 19.0, 10.0, None, "fixed_window", "reservation", upstream=True)


@pytest.mark.parametrize(
    ("limit", "remaining", "expected"),
    [
        ("60", "59", Window(60.0, 59.0)),
        ("60", "0", Window(60.0, 0.0)),  # an empty bucket is an answer
        ("60", None, Window(60.0, None)),  # a missing half
        (None, "59", Window(None, 59.0)),
        ("0", "59", Window(None, 59.0)),  # a limit of 0 is not stated, not "limit 0"
        ("-1", "-1", None),
        ("abc", "59", Window(None, 59.0)),
        ("nan", "inf", None),
        ("1e400", "59", Window(None, 59.0)),  # overflows to inf
        ("1e13", "1e13", None),  # absurd
        (" 60 ", " 59 ", Window(60.0, 59.0)),
        ("60", "75", Window(60.0, 60.0)),  # never more left than the bucket holds
        ("", "", None),
    ],
)
def test_garbage_values_are_ignored_never_raised(
    limit: str | None, remaining: str | None, expected: Window | None
) -> None:
    headers = {"x-request-id": "req_1"}
    if limit is not None:
        headers["x-ratelimit-limit-requests"] = limit
    if remaining is not None:
        headers["x-ratelimit-remaining-requests"] = remaining
    report = read_limits(headers, "openai", now_unix=NOW)
    assert (report.requests if report is not None else None) == expected


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [
        ("6m0s", 360.0), ("1.2s", 1.2), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2m59.56s", 179.56), ("0s", 0.0),
        ("55", 55.0),  # Azure: integer seconds
        ("2025-08-21T12:41:30Z", 30.0),  # RFC 3339
        ("2025-08-21T12:41:30+00:00", 30.0),
        ("Thu, 21 Aug 2025 12:42:00 GMT", 60.0),  # HTTP date
        (str(NOW + 45), 45.0),  # a Unix time
        ("2025-08-21T12:40:00Z", 0.0),  # already past
        ("-5s", None), ("soon", None), ("9999h", None), ("", None),
    ],
)
def test_reset_times_in_every_form(reset: str, seconds: float | None) -> None:
    report = read_limits({"x-ratelimit-limit-tokens": "1000", "x-ratelimit-reset-tokens": reset}, "openai",
                         now_unix=NOW)
    assert report is not None and report.tokens is not None
    assert report.tokens.reset_s == (pytest.approx(seconds) if seconds is not None else None)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.0, max_value=86_400.0))
def test_go_durations_round_trip_with_the_mock_servers_format(seconds: float) -> None:
    text = format_duration(seconds)
    report = read_limits({"x-ratelimit-limit-tokens": "1000", "x-ratelimit-reset-tokens": text}, "openai",
                         now_unix=NOW)
    assert report is not None and report.tokens is not None and report.tokens.reset_s is not None
    assert report.tokens.reset_s == pytest.approx(seconds, abs=2e-3)  # the format rounds up to the millisecond


def test_header_names_are_read_in_any_case() -> None:
    upper = {name.upper(): value for name, value in OPENAI_DOCS.items()}
    assert read_limits(upper, None, now_unix=NOW) == read_limits(OPENAI_DOCS, "openai", now_unix=NOW)


# -- waits ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "dialect", "seconds"),
    [
        ({"retry-after-ms": "1500", "retry-after": "2"}, None, "openai", 1.5),  # the precise one first
        ({"x-ms-retry-after-ms": "250"}, None, "azure", 0.25),
        ({"retry-after": "7"}, None, "anthropic", 7.0),
        ({"Retry-After": "Thu, 21 Aug 2025 12:41:20 GMT"}, None, "openai", 20.0),
        ({"retry-after": "Thu, 21 Aug 2025 12:40:00 GMT"}, None, "openai", 0.0),  # already past
        ({"retry-after": "soon", "retry-after-ms": "nan"}, None, "openai", None),
        ({"retry-after": "-3"}, None, "openai", None),
        ({"retry-after": "1e12"}, None, "openai", None),  # absurd
        ({"llm_provider-retry-after": "7"}, None, "litellm", 7.0),  # LiteLLM relays the provider's
        ({"llm_provider-retry-after-ms": "900"}, None, "litellm", 0.9),
        (AZURE_429, None, "azure", 55.0),  # the only hint some Azure 429s carry
        ({}, AZURE_TOKEN_429_BODY, "azure", 33.0),
        ({}, {"error": {"code": "429", "message": "Rate limit is exceeded. Try again in 50 seconds."}}, "azure",
         50.0),  # Azure-Samples/graphrag-accelerator#129
        ({}, {"error": {"message": (
            "Rate limit reached for gpt-4o-mini in project proj_JPS3HXJkytdZwGTknrGfIQcx organization "
            "org-lZsETHYfpKzyBmbr8e4GbSFc on tokens per min (TPM): Limit 50000, Used 47949, Requested 3006. "
            "Please try again in 1.146s. Visit https://platform.openai.com/account/rate-limits to learn more."),
            "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}, "openai", 1.146),
        ({}, {"error": {"message": "... Please try again in 84ms. Visit ...", "code": "rate_limit_exceeded"}},
         "openai", 0.084),
        ({}, {"error": {"message": "... on tokens per day (TPD): ... Please try again in 6m0s. Visit ..."}},
         "openai", 360.0),
        ({}, {"error": {"message": (
            "No deployments available for selected model, Try again in 27.5 seconds. Passed model=claude-fable-5. "
            "pre-call-checks=False, cooldown_list=['abc123def']"), "type": "None", "param": "None", "code": "429"}},
         "litellm", 27.5),
        ({}, None, "openai", None),
        ({}, "<html>502 Bad Gateway</html>", "openai", None),
    ],
)
def test_retry_after_in_every_form(headers: dict[str, str], body: Any, dialect: Any, seconds: float | None) -> None:
    wait = retry_after_s(headers, body, dialect, now_unix=NOW)
    assert wait == (pytest.approx(seconds) if seconds is not None else None)


LITELLM_RPM_429 = {"error": {"message": "litellm.RateLimitError: Deployment over defined rpm limit=2. current usage=2",
                             "type": None, "param": None, "code": 429}}  # a LiteLLM deployment's README


def test_a_litellm_window_spent_waits_for_the_next_calendar_minute() -> None:
    # LiteLLM's `date` lags by seconds and its llm_provider-retry-after always says 60: the minute's turn by our
    # own clock (12:41:17 here), half a second more, is the wait.
    headers = {"date": "Thu, 21 Aug 2025 12:41:14 GMT", "x-litellm-call-id": "c0ffee", "llm_provider-retry-after": "60"}
    at = 1755780077.0
    assert retry_after_s(headers, LITELLM_RPM_429, "litellm", now_unix=at) == 43.5
    # Its own limiter's messages say the same even before the dialect is known.
    assert retry_after_s(headers, LITELLM_RPM_429, None, now_unix=at) == 43.5
    assert retry_after_s(headers, LITELLM_ROUTER_429, None, now_unix=at) == 43.5
    assert refusal_kind(429, headers, LITELLM_ROUTER_429, "litellm") == Refusal("window_spent", "requests")


# -- refusals ------------------------------------------------------------------------------------------------------

LITELLM_ROUTER_429 = {"error": {"message": (
    "litellm.RateLimitError: No deployments available for selected model. Passed model=gpt-4o-mini. "
    "Deployments={'5b0a': {'current_tpm': 17970, 'tpm_limit': 100000, 'current_rpm': 599, 'rpm_limit': 600}}\n\n"
    "LiteLLM: model group 'gpt-4o-mini' failed with the error above. No fallback was attempted."),
    "type": "throttling_error", "param": None, "code": "429"}}  # LiteLLM 1.108.7, benchmarks/litellm/observed.md

OPENAI_TPM_429 = {"error": {"message": (
    "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Used 29000, "
    "Requested 2000. Please try again in 2.5s. Too many tokens."), "type": "tokens", "code": "rate_limit_exceeded"}}


@pytest.mark.parametrize(
    ("status", "headers", "body", "dialect", "refusal"),
    [
        # OpenAI
        (429, {}, OPENAI_TPM_429, "openai", Refusal("rate_limit", "tokens")),
        (429, {}, {"error": {"message": "Rate limit reached for gpt-4o in organization org-x on requests per min "
                             "(RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms.",
                             "type": "requests", "code": "rate_limit_exceeded"}}, "openai",
         Refusal("rate_limit", "requests")),
        (429, {}, {"error": {"message": "Rate limit reached for gpt-4o-mini in organization org-x on tokens per day "
                             "(TPD): Limit 200000, Used 199990, Requested 500. Please try again in 3m36s.",
                             "type": "tokens", "code": "rate_limit_exceeded"}}, "openai",
         Refusal("rate_limit", "tokens", per_day=True)),  # reconstructed from the TPM message's format
        (429, {}, {"error": {"message": (  # LibreChat's fixture: the request alone exceeds the whole limit
            "Request too large for gpt-5-nano in organization org-test on tokens per min (TPM): Limit 200000, "
            "Requested 480002. The input or output tokens must be reduced in order to run successfully."),
            "type": "tokens", "code": "rate_limit_exceeded"}}, "openai", Refusal("too_large", "tokens")),
        (429, {}, {"error": {"message": "You exceeded your current quota, please check your plan and billing details. "
                             "For more information on this error, read the docs: https://platform.openai.com/docs/"
                             "guides/error-codes/api-errors.", "type": "insufficient_quota", "param": None,
                             "code": "insufficient_quota"}}, "openai", Refusal("quota")),
        (429, {}, {"error": {"message": "Your credit balance is exhausted.", "code": "credit_balance_exhausted"}},
         "openai", Refusal("quota")),
        (429, {}, {"error": {"type": "rate_limit_error", "code": "slow_down", "message": "Slow down"}}, "openai",
         Refusal("rate_limit")),  # ramped too fast: a sign to slow down
        (503, {}, {"error": {"type": "service_unavailable_error", "code": "server_is_overloaded",
                             "message": "The server is overloaded."}}, "openai", Refusal("capacity")),
        # Flex: the guide names "429 Resource Unavailable"; its JSON code is not documented, both forms are matched.
        (429, {}, {"error": {"message": "Resource Unavailable", "code": "resource_unavailable"}}, "openai",
         Refusal("capacity")),
        (429, {}, {"error": {"message": "429 Resource Unavailable"}}, "openai", Refusal("capacity")),
        # The remaining header names the empty bucket when the body does not.
        (429, {"x-ratelimit-remaining-requests": "12", "x-ratelimit-remaining-tokens": "0"}, None, "openai",
         Refusal("rate_limit", "tokens")),
        (429, {}, "<html>Too Many Requests</html>", "openai", Refusal("rate_limit")),
        # Azure
        (429, {}, AZURE_TOKEN_429_BODY, "azure", Refusal("rate_limit", "tokens")),
        (429, {}, AZURE_CALL_429_BODY, "azure", Refusal("rate_limit", "requests")),
        (429, AZURE_429, {"error": {"code": "429", "message": "Rate limit is exceeded. Try again in 55 seconds."}},
         "azure", Refusal("rate_limit", "tokens")),  # policy-id: DeploymentRatelimit-Token
        # Anthropic
        (429, {"retry-after": "7"}, ANTHROPIC_ITPM_429_BODY, "anthropic", Refusal("rate_limit", "input_tokens")),
        (429, {"anthropic-ratelimit-output-tokens-remaining": "0",
               "anthropic-ratelimit-input-tokens-remaining": "40000"},
         {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded "
                                     "your per-minute rate limit"}}, "anthropic",
         Refusal("rate_limit", "output_tokens")),
        # The monthly spend cap: same type as a rate limit, error.details.error_code tells (shape per Microsoft's
        # dev-proxy page on Anthropic errors).
        (429, {}, {"type": "error", "error": {"type": "rate_limit_error", "message": "Spend limit reached.",
                                              "details": {"error_code": "enforced_spend_limit_reached"}}},
         "anthropic", Refusal("quota")),
        (529, {}, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "anthropic",
         Refusal("capacity")),
        # LiteLLM
        (429, {}, LITELLM_RPM_429, "litellm", Refusal("window_spent", "requests")),
        (429, {}, {"error": {"message": "Deployment over user-defined ratelimit. tpm limit=8000. current usage=8241. "
                             "id=abc123def, model_group=claude-fable-5"}}, "litellm",
         Refusal("window_spent", "tokens")),
        (429, {"retry-after": "60"}, {"error": {"message": (
            "Rate limit exceeded for api_key: hashed-key-1a2b3c. Limit type: tokens. Current limit: 8000, "
            "Remaining: 0. Limit resets at: 2026-07-12 08:05:00 UTC"), "type": "None", "code": "429"}}, "litellm",
         Refusal("window_spent", "tokens")),
        (429, {}, {"error": {"message": (
            "Rate limit exceeded for api_key: hashed-key-1a2b3c. Limit type: max_parallel_requests. Current limit: "
            "4, Remaining: 0. Limit resets at: 2026-07-12 08:05:00 UTC")}}, "litellm",
         Refusal("rate_limit", "in_flight")),
        (429, {}, {"error": {"message": (
            "LiteLLM Rate Limit Handler for rate limit type = key. Max parallel request limit reached. current rpm: "
            "61, rpm limit: 60, current tpm: 100, tpm limit: 8000, current max_parallel_requests: 1, "
            "max_parallel_requests: 10")}}, "litellm", Refusal("window_spent", "requests")),
        (429, {}, {"error": {"message": (
            "No deployments available for selected model, Try again in 60 seconds. Passed model="
            "fake-openai-endpoint-rate-limits. pre-call-checks=False, allowed_model_region=n/a"),
            "type": "None", "param": "None", "code": 429}}, "litellm", Refusal("capacity")),
        (429, {}, {"error": {"message": "rate limited"}}, "litellm", Refusal("window_spent")),
        # The provider's own 429, relayed with its headers renamed (a LiteLLM gateway's test suite): its rate limit.
        (429, {"llm_provider-retry-after": "7"}, {"error": {"message": "scripted 429"}}, "litellm",
         Refusal("rate_limit")),
        (429, {}, {"error": {"message": (
            "litellm.RateLimitError: RateLimitError: OpenAIException - Rate limit reached for gpt-4o in organization "
            "org-x on requests per min (RPM): Limit 3, Used 3, Requested 1.")}}, "litellm",
         Refusal("rate_limit", "requests")),  # the provider's rate limit, relayed
        # Servers without limits
        (503, {}, {"error": "server busy, please try again.  maximum pending requests exceeded"}, "none",
         Refusal("capacity")),  # Ollama past OLLAMA_MAX_QUEUE
        (503, {}, None, None, Refusal("capacity")),
        # Not refusals
        (200, {}, {}, "openai", Refusal("other")),
        (500, {}, {"error": {"message": "The server had an error"}}, "openai", Refusal("other")),
        (400, {}, {"error": {"code": "insufficient_quota"}}, "openai", Refusal("other")),
    ],
)
def test_what_a_refusal_means(
    status: int, headers: dict[str, str], body: Any, dialect: Any, refusal: Refusal
) -> None:
    assert refusal_kind(status, headers, body, dialect) == refusal


def test_raw_text_and_bytes_bodies_are_read_like_parsed_ones() -> None:
    import orjson

    raw = orjson.dumps(ANTHROPIC_ITPM_429_BODY)
    expected = Refusal("rate_limit", "input_tokens")
    assert refusal_kind(429, {}, raw, "anthropic") == expected
    assert refusal_kind(429, {}, raw.decode(), "anthropic") == expected
    assert refusal_kind(429, {}, [ANTHROPIC_ITPM_429_BODY], "anthropic") == expected


# -- never raise ---------------------------------------------------------------------------------------------------

_KNOWN_NAMES = sorted({
    *OPENAI_RECORDED, *AZURE_429, *ANTHROPIC_RECORDED, *LITELLM_OWN_LIMITS, "retry-after", "retry-after-ms",
    "x-ms-retry-after-ms", "llm_provider-retry-after", "llm_provider-retry-after-ms", "date", "policy-id",
    "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
})
_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from([
        "0", "-1", "nan", "NaN", "inf", "-inf", "1e400", "1e308", "1e-400", "6m0s", "1.2s", "20ms", "1h", "0.5.5s",
        "2025-08-21T12:40:59Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00", "Thu, 21 Aug 2025 12:41:00 GMT",
        "Mon, 01 Jan 99999 00:00:00 GMT", "DeploymentRatelimit-Call", "DeploymentRatelimit-Token", "١٢٣", "None", "",
    ]),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
_HEADERS = st.dictionaries(st.one_of(st.sampled_from(_KNOWN_NAMES), st.text(max_size=30)), _VALUES, max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=60) | _VALUES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.one_of(st.sampled_from(["error", "code", "type", "message", "details", "error_code", "detail"]),
                  st.text(max_size=10)), inner, max_size=5),
    max_leaves=20,
)
_BODIES = st.one_of(_JSON, st.text(max_size=200), st.binary(max_size=200), _JSON.map(lambda v: repr(v)))


@settings(max_examples=400, deadline=None)
@given(
    headers=_HEADERS, body=_BODIES, dialect=st.sampled_from([*DIALECTS, None]),
    status=st.sampled_from([200, 400, 429, 500, 503, 529]),
    now_unix=st.floats(min_value=0.0, max_value=4e9),
)
def test_nothing_a_server_sends_makes_the_readers_raise(
    headers: dict[str, str], body: Any, dialect: Any, status: int, now_unix: float
) -> None:
    report = read_limits(headers, dialect, now_unix=now_unix)
    if report is not None:
        for window in (report.requests, report.tokens, report.input_tokens, report.output_tokens):
            if window is not None:
                assert window.limit is None or (math.isfinite(window.limit) and window.limit > 0)
                assert window.remaining is None or (math.isfinite(window.remaining) and window.remaining >= 0)
                assert window.reset_s is None or 0 <= window.reset_s <= 7 * 86_400
    wait = retry_after_s(headers, body, dialect, now_unix=now_unix)
    assert wait is None or 0 <= wait <= 7 * 86_400
    assert isinstance(refusal_kind(status, headers, body, dialect), Refusal)
    assert detect_dialect(headers) in (*DIALECTS, None)
    DialectTracker().observe(status, headers)


def test_http_dates_are_wall_clock_times() -> None:
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert retry_after_s({"retry-after": date}, None, "openai", now_unix=NOW) == 30.0
