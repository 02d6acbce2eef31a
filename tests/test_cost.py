"""Prices by longest prefix, overrides, the cost of each result, and truncated results."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

import scheduler
from scheduler.cost import DEFAULT_PRICES, ModelPrice, PriceTable
from scheduler.sinks import batch_line
from scheduler.testing import FakeClock, FakeTransport, ok
from scheduler.tokens import output_reservation
from scheduler.transport import Response


def usage_answer(prompt: int, cached: int, completion: int) -> Response:
    body = {
        "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }
    return Response(200, {}, body, "req_fake")


def make_pool(transport: FakeTransport, clock: FakeClock, **kwargs: Any) -> scheduler.Pool:
    kwargs.setdefault("limits", scheduler.Limits(rpm=6000))
    kwargs.setdefault("model", "gpt-4o-mini")
    return scheduler.Pool(transport=transport, clock=clock, rng=random.Random(1), **kwargs)


def test_dated_snapshots_take_the_price_of_their_longest_prefix() -> None:
    table = PriceTable.load()
    assert table.price("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert table.price("gpt-4o-2024-08-06") == DEFAULT_PRICES["gpt-4o"]
    assert table.price("gpt-4o-2024-05-13") == ModelPrice(input=5.00, output=15.00)
    assert table.price("gpt-4.1-nano-2025-04-14") == DEFAULT_PRICES["gpt-4.1-nano"]
    assert table.price("o3-pro-2025-06-10") == DEFAULT_PRICES["o3-pro"]
    assert table.price("openai/GPT-5-mini") == DEFAULT_PRICES["gpt-5-mini"]  # router prefix, any case
    assert table.price("llama-3-70b") is None


def test_cost_counts_uncached_cached_and_output_tokens_at_their_prices() -> None:
    price = ModelPrice(input=2.50, cached_input=1.25, output=10.00)
    usage = scheduler.Usage(prompt_tokens=1_000_000, completion_tokens=100_000, cached_tokens=400_000)
    assert price.cost(usage) == pytest.approx(0.6 * 2.50 + 0.4 * 1.25 + 0.1 * 10.00)
    assert ModelPrice(input=0.02).cost(scheduler.Usage(1_000_000, 0)) == pytest.approx(0.02)


def test_prices_are_extended_and_overridden_by_a_mapping_or_a_json_file(tmp_path: Path) -> None:
    table = PriceTable.load({"my-model": {"input": 1.0, "output": 2.0}, "gpt-4o": ModelPrice(input=9.0)})
    assert table.price("my-model-v2") == ModelPrice(input=1.0, output=2.0)
    assert table.price("gpt-4o") == ModelPrice(input=9.0)
    assert table.price("gpt-4o-mini") == DEFAULT_PRICES["gpt-4o-mini"]  # the rest stays
    path = tmp_path / "prices.json"
    path.write_bytes(orjson.dumps({"gpt-4o-mini": {"input": 0.1, "cached_input": 0.05, "output": 0.2}}))
    assert PriceTable.load(path).price("gpt-4o-mini-2024-07-18") == ModelPrice(0.1, 0.2, 0.05)
    assert PriceTable.load(str(path)).price("gpt-4o-mini") == ModelPrice(0.1, 0.2, 0.05)


@pytest.mark.parametrize("entry", [{"output": 1.0}, {"input": -1}, {"input": 1, "outptu": 2}, 3, {"input": "1"}])
def test_a_bad_price_is_a_configuration_error(entry: Any) -> None:
    with pytest.raises(scheduler.ConfigurationError):
        PriceTable.load({"m": entry})


def test_an_unreadable_price_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(scheduler.ConfigurationError, match="price file"):
        PriceTable.load(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(scheduler.ConfigurationError, match="one object"):
        PriceTable.load(tmp_path / "list.json")


def test_output_reservation_follows_the_token_estimate() -> None:
    chat = "/v1/chat/completions"
    assert output_reservation(chat, {"max_tokens": 50, "n": 2}, 1024) == 100
    assert output_reservation(chat, {"max_completion_tokens": 70, "max_tokens": 50}, 1024) == 70
    assert output_reservation(chat, {}, 1024) == 1024
    assert output_reservation("/v1/embeddings", {"max_tokens": 50}, 1024) == 0


@pytest.mark.anyio
async def test_each_result_carries_its_cost_and_statistics_sum_them() -> None:
    clock = FakeClock()
    answers = iter([usage_answer(1000, 400, 200), usage_answer(500, 0, 100)])
    transport = FakeTransport(lambda e, b: next(answers), clock=clock)
    async with clock.autojump(), make_pool(transport, clock, prices={"gpt-4o-mini": {
            "input": 1.0, "cached_input": 0.5, "output": 4.0}}) as pool:
        first = await pool.submit("a", max_tokens=300)
        second = await pool.submit("b", max_tokens=300)
    assert first.cost_usd == pytest.approx((600 * 1.0 + 400 * 0.5 + 200 * 4.0) / 1e6)  # $0.0016
    assert second.cost_usd == pytest.approx((500 * 1.0 + 100 * 4.0) / 1e6)
    assert pool.statistics().cost_usd == pytest.approx(0.0016 + 0.0009)
    assert batch_line(first)["scheduler"]["cost_usd"] == pytest.approx(0.0016)


@pytest.mark.anyio
async def test_an_unknown_model_costs_none_with_one_warning() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock=clock)
    with capture_logs() as logs:
        async with clock.autojump(), make_pool(transport, clock, model="my-local-llama") as pool:
            results = await asyncio.gather(*(pool.submit(f"q{i}", max_tokens=5) for i in range(3)))
    assert [r.cost_usd for r in results] == [None, None, None]
    assert pool.statistics().cost_usd == 0.0
    assert [e["model"] for e in logs if e["event"] == "price_unknown"] == ["my-local-llama"]


@pytest.mark.anyio
async def test_truncated_results_are_flagged_counted_and_marked_in_the_batch_line() -> None:
    clock = FakeClock()
    transport = FakeTransport(script=[ok(finish_reason="length"), ok()], clock=clock)
    async with clock.autojump(), make_pool(transport, clock) as pool:
        cut = await pool.submit("long", max_tokens=5)
        whole = await pool.submit("short", max_tokens=5)
    assert cut.truncated and not whole.truncated
    assert pool.statistics().truncated == 1
    assert batch_line(cut)["scheduler"]["truncated"] is True
    assert "truncated" not in batch_line(whole)["scheduler"]


def test_batch_costs_half_and_flex_costs_batch_rates_where_offered() -> None:
    table = PriceTable.load()
    usage = scheduler.Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, cached_tokens=400_000)
    # gpt-4o-mini: 0.6M uncached at $0.15, 0.4M cached at $0.075, 1M output at $0.60 = $0.72 standard.
    assert table.cost("gpt-4o-mini", usage) == pytest.approx(0.72)
    assert table.cost("gpt-4o-mini-2024-07-18", usage, tier="batch") == pytest.approx(0.36)
    assert table.cost("o3", usage, tier="flex") == pytest.approx(table.cost("o3", usage, tier="batch") or -1)
    flex = table.price("gpt-5", "flex")
    assert flex is not None and (flex.input, flex.cached_input, flex.output) == (0.625, 0.0625, 5.0)
    with capture_logs() as logs:
        assert table.cost("gpt-4o-mini", usage, tier="flex") is None  # gpt-4o-mini has no flex tier
        assert table.cost("gpt-4o-mini", usage, tier="flex") is None
    assert [(e["event"], e["tier"]) for e in logs] == [("price_unknown", "flex")]
    with pytest.raises(scheduler.ConfigurationError, match="unknown tier"):
        table.price("gpt-4o", "priority")  # type: ignore[arg-type]


def test_price_files_may_give_tier_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(orjson.dumps({
        "my-model": {"input": 1.0, "output": 2.0, "batch": {"input": 0.8, "output": 1.0},
                     "flex": {"input": 0.7, "cached_input": 0.1, "output": 0.9}},
    }))
    table = PriceTable.load(path)
    assert table.price("my-model", "batch") == ModelPrice(input=0.8, output=1.0)
    assert table.price("my-model", "flex") == ModelPrice(input=0.7, cached_input=0.1, output=0.9)
    assert table.price("my-model") == ModelPrice(input=1.0, output=2.0, batch=ModelPrice(0.8, 1.0),
                                                 flex=ModelPrice(0.7, 0.9, 0.1))
    with pytest.raises(scheduler.ConfigurationError, match="batch"):
        PriceTable.load({"m": {"input": 1.0, "batch": {"input": 1.0, "flex": {"input": 1}}}})


def test_the_batch_line_names_the_tier_and_batch_of_a_result() -> None:
    result = scheduler.Result("a", "/v1/chat/completions", 200, {}, tier="batch", batch_id="batch_1")
    assert batch_line(result)["scheduler"]["tier"] == "batch"
    assert batch_line(result)["scheduler"]["batch_id"] == "batch_1"
    assert "tier" not in batch_line(scheduler.Result("a", "/v1/chat/completions", 200, {}))["scheduler"]
