"""The admission policy alone: calibration, what each dialect's headers allow, reservations, learning limits."""

from __future__ import annotations

import pytest

from scheduler.admission import ScopeModel
from scheduler.admission.calibration import Calibration
from scheduler.dialects import LimitReport, Window
from scheduler.limits import Limits


def simulate(calibration: Calibration, server_ratio: float, our_rate: float, seconds: float, limit: float = 60_000,
             token_bound: bool = True) -> None:
    """A server bucket refilled continuously at ``limit`` per minute, fed 20 requests a second whose tokens it
    counts ``server_ratio`` times our estimate; we send ``our_rate`` of our tokens a second (scaled by nothing:
    this is what calibration sees)."""
    level, t, raw = limit, 0.0, 0.0
    per_request = our_rate / 20
    while t < seconds:
        t += 0.05
        level = min(limit, level + 0.05 * limit / 60)
        raw += per_request
        level -= per_request * server_ratio
        if token_bound:
            calibration.token_bound()
        calibration.observe(limit, max(0.0, level), t, raw)


def test_calibration_learns_how_much_more_the_server_counts() -> None:
    calibration = Calibration()
    simulate(calibration, server_ratio=1.5, our_rate=1000 / 1.5 * 1.02, seconds=30)  # a hair over the limit
    assert calibration.ratio == pytest.approx(1.5, rel=0.02) and calibration.samples > 10


def test_calibration_comes_down_fast_when_the_server_keeps_showing_room() -> None:
    """The self-hiding over-estimate: we think the server counts 2x, so we send too little, its bucket stays
    full, and no window is a valid sample. Waiting on our token bucket while it shows room brings it down."""
    calibration = Calibration(ratio=2.0)
    simulate(calibration, server_ratio=1.0, our_rate=1000 / 2.0, seconds=5)  # what a ratio of 2 lets through
    assert calibration.ratio < 1.3


def test_calibration_does_not_move_without_evidence() -> None:
    calibration = Calibration()
    # Idle: the server's bucket is full and we wait on nothing.
    simulate(calibration, server_ratio=1.0, our_rate=200, seconds=10, token_bound=False)
    assert calibration.ratio == 1.0


@pytest.mark.parametrize("others", [0.0, 3.0])
def test_a_limit_set_below_the_servers_is_not_calibrated_on_the_servers_bucket(others: float) -> None:
    """Told a quarter of the organisation's limit (the manual split, or "stay under a quarter"), the pool is not
    alone on the server's bucket by its own account. Alone (``others`` = 0), it keeps that bucket nearly full on
    purpose: read as an overestimate, the ratio fell to its floor and four such processes sent twice the limit
    together (44% 429s). With three others as busy (``others`` = 3), the bucket's consumption is four times ours:
    read as ours, the ratio climbed to 1.76 and the four ran at half speed."""
    model = ScopeModel(Limits(rpm=6000, tpm=150_000))
    calibration = model.calibration
    raw, remaining = 0.0, 600_000.0
    for i in range(1, 200):
        raw += 125.0  # 2,500 of our tokens a second, as a 150,000 TPM bucket lets through
        # The server counts 1.2x our estimate, for us and for the others; it refills 10,000 a second.
        remaining = min(600_000.0, remaining - 125.0 * 1.2 * (1 + others) + 0.05 * 10_000)
        calibration.token_bound()
        model.plan_sync(LimitReport("openai", tokens=Window(600_000, remaining)), 0.05, i * 0.05, {"raw": raw})
    assert model.ratio == 1.0
    calibration.refused()  # a 429 on tokens still says we sent too much
    assert model.ratio > 1.0


def test_a_fixed_window_that_counts_usage_is_never_calibrated_but_refunded() -> None:
    """LiteLLM counts real usage per calendar minute: its remaining tokens barely move while we reserve the
    output cap; read as a continuous bucket, the refill would look like consumption and the ratio would climb
    to its cap (the 4x of the issue this fixes)."""
    model = ScopeModel(Limits(rpm=600, tpm=100_000))
    for i in range(200):
        window = Window(limit=100_000, remaining=100_000 - 30 * i, refill="fixed_window", charges="usage")
        model.plan_sync(LimitReport("litellm", tokens=window), 0.1, i * 0.1, {"raw": 100.0 * i})
    assert model.ratio == 1.0
    costs = model.costs(100, 60)
    assert model.usage_refund(costs, prompt_tokens=10, completion_tokens=20) == {"tokens": 70}


def test_header_bounds_by_window_kind() -> None:
    model = ScopeModel(Limits(rpm=120, tpm=60_000, safety=0.0))
    continuous = model.plan_sync(LimitReport("openai", tokens=Window(60_000, 1000)), 0.5, 0.0, {})
    assert continuous.bounds == {"tokens": pytest.approx(1000 + 0.5 * 1000)}  # remaining plus refill since
    # Azure's request headers count a 10 s window (already per minute in the report): no refill within it.
    azure = Window(limit=120, remaining=3, window_s=10, reset_s=4.0, refill="fixed_window")
    assert model.plan_sync(LimitReport("azure", requests=azure), 0.5, 0.0, {}).bounds == {"requests": 3}
    # Once the window has turned, what it said is stale.
    assert model.plan_sync(LimitReport("azure", requests=azure), 5.0, 0.0, {}).bounds == {}
    # The limit stays 120 RPM: an Azure deployment is not lowered to 20.
    assert model.plan_sync(LimitReport("azure", requests=azure), 0.5, 0.0, {}).learned == {}


def test_a_gateways_copy_of_its_providers_limits_is_not_adopted() -> None:
    model = ScopeModel(Limits(rpm=600))
    upstream = Window(limit=10, remaining=1, upstream=True)
    plan = model.plan_sync(LimitReport("litellm", requests=upstream), 0.1, 0.0, {})
    assert plan.bounds == {} and plan.learned == {}


def test_limits_are_learned_from_the_first_answer_that_states_them() -> None:
    model = ScopeModel(None)
    assert model.params() is None
    assert not model.learn(None) and not model.learn(LimitReport("openai"))
    assert model.learn(LimitReport("openai", requests=Window(500, 499), tokens=Window(30_000, 29_000)))
    assert model.limits == Limits(rpm=500, tpm=30_000)
    params = model.params()
    assert params is not None and params.rates == {"requests": pytest.approx(500 / 60), "tokens": 500}
    # Anthropic's combined figure is the sum of its input and output limits: admit against each.
    anthropic = ScopeModel(None)
    anthropic.learn(LimitReport("anthropic", tokens=Window(96_000, 96_000), input_tokens=Window(80_000, 80_000),
                                output_tokens=Window(16_000, 16_000)))
    assert anthropic.limits == Limits(itpm=80_000, otpm=16_000)


def test_reserve_floors_by_priority() -> None:
    model = ScopeModel(Limits(rpm=60, reserve={0: 0.2, 5: 0.1}))
    assert [model.floor(p) for p in (-1, 0, 1, 5, 6)] == [0.0, 0.0, pytest.approx(0.2), pytest.approx(0.2),
                                                          pytest.approx(0.3)]
    with pytest.raises(ValueError, match="reserve"):
        Limits(rpm=60, reserve={0: 0.7, 1: 0.4})


def test_a_429_empties_the_bucket_it_names_or_every_bucket() -> None:
    model = ScopeModel(Limits(rpm=60, tpm=6000))
    assert model.refusal("tokens") == (("tokens",), 0.5, 0.25)
    assert model.refusal(None) == (("requests", "tokens"), 0.5, 0.25)
    assert model.refusal("in_flight") == (("requests", "tokens"), 0.5, 0.25)


@pytest.mark.parametrize("bad", [{"rpm": 0}, {"tpm": -5}, {"otpm": 1.5}, {"burst_s": 0}, {"safety": 1.0}])
def test_limits_reject_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)  # type: ignore[arg-type]
