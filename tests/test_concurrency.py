"""The adaptive concurrency controller, driven with exact times against a simulated server."""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.concurrency import AdaptiveConcurrency
from scheduler.errors import ConfigurationError


@dataclass
class Trace:
    """What a simulated run saw: (time, limit) after each answer, and each answer's latency."""

    limits: list[tuple[float, int]] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)

    def after(self, t: float) -> list[int]:
        return [limit for when, limit in self.limits if when > t]

    def first_reaching(self, level: int) -> float:
        return next(when for when, limit in self.limits if limit >= level)

    def answered_between(self, start: float, end: float) -> int:
        return sum(1 for when, _ in self.latencies if start < when <= end)

    def mean_latency_after(self, t: float) -> float:
        late = [latency for when, latency in self.latencies if when > t]
        return sum(late) / len(late)


def simulate(
    ctl: AdaptiveConcurrency, capacity: int | list[tuple[float, int]], duration: float, *,
    service_s: float = 1.0, jitter: float = 0.2, seed: int = 0,
) -> Trace:
    """A server with ``capacity`` slots and a FIFO queue (an LLM server's batch slots), fed by a pool that keeps
    ``ctl.limit`` requests in flight. Latency is the service time while a slot is free, plus the queue's wait past
    the knee. ``capacity`` may change over time: [(from_time, slots), ...]."""
    schedule = [(0.0, capacity)] if isinstance(capacity, int) else list(capacity)
    rng = random.Random(seed)
    slots = [0.0] * schedule[0][1]
    in_flight: list[tuple[float, float]] = []  # (answers_at, sent_at)
    now = 0.0
    trace = Trace()
    while now < duration:
        while schedule[1:] and schedule[1][0] <= now:
            schedule.pop(0)
            slots = sorted(slots)[-schedule[0][1]:] if schedule[0][1] <= len(slots) else (
                slots + [now] * (schedule[0][1] - len(slots)))
            heapq.heapify(slots)
        while len(in_flight) < ctl.limit:
            free_at = heapq.heappop(slots)
            done = max(now, free_at) + service_s * (1 + jitter * rng.uniform(-1, 1))
            heapq.heappush(slots, done)
            heapq.heappush(in_flight, (done, now))
        done, sent = heapq.heappop(in_flight)
        now = done
        ctl.on_success(done - sent, now, in_flight=len(in_flight) + 1)
        trace.limits.append((now, ctl.limit))
        trace.latencies.append((now, done - sent))
    return trace


@pytest.mark.parametrize("capacity", [8, 48])
def test_finds_the_knee_of_a_server_and_stays_near_it(capacity: int) -> None:
    ctl = AdaptiveConcurrency()
    trace = simulate(ctl, capacity, duration=300.0)
    # 8 answers at one in flight measure the unloaded latency; slow start then doubles per round trip.
    assert trace.first_reaching(capacity) < 8 + 2 * math.log2(capacity) + 2
    late = trace.after(100.0)
    assert 0.6 * capacity <= min(late) and max(late) <= 1.6 * capacity
    # What the limit is for: the server works at full capacity without a queue growing without bound.
    assert trace.answered_between(100.0, 300.0) >= 0.95 * capacity * 200.0
    assert trace.mean_latency_after(100.0) < 1.4


def test_follows_the_server_when_its_capacity_drops_and_returns() -> None:
    ctl = AdaptiveConcurrency()
    trace = simulate(ctl, [(0.0, 32), (150.0, 8), (300.0, 32)], duration=450.0, seed=1)

    def between(start: float, end: float) -> list[int]:
        return [limit for when, limit in trace.limits if start < when <= end]

    assert min(between(100.0, 150.0)) >= 24 and max(between(100.0, 150.0)) <= 48
    assert max(between(200.0, 300.0)) <= 12  # 32 slots became 8: the limit came down with them
    assert min(between(400.0, 450.0)) >= 24  # and went back up


def test_no_growth_before_the_baseline_is_measured() -> None:
    ctl = AdaptiveConcurrency(initial=1, min_samples=8)
    for i in range(7):
        ctl.on_success(1.0, now=float(i + 1))
        assert ctl.limit == 1
    ctl.on_success(1.0, now=8.0)
    assert ctl.stats().baseline_s == 1.0
    ctl.on_success(1.0, now=9.0)  # slow start: +1 per success
    assert ctl.limit == 2


def _grown(limit: int, **kwargs: object) -> AdaptiveConcurrency:
    """A controller slow-started to ``limit`` on flat latencies, one second each."""
    ctl = AdaptiveConcurrency(**kwargs)  # type: ignore[arg-type]
    now = 0.0
    while ctl.limit < limit:
        now += 1.0
        ctl.on_success(1.0, now)
    return ctl


def test_a_burst_of_503s_halves_the_limit_once_per_latency_window() -> None:
    ctl = _grown(40)
    start = ctl.limit
    for i in range(20):  # one overload, answered by every request that was in flight
        ctl.on_failure("overloaded", now=100.0 + i * 0.01)
    assert ctl.limit == start // 2
    ctl.on_failure("rate_limited", now=100.5)  # still within one latency (1 s) of the decrease
    assert ctl.limit == start // 2
    ctl.on_failure("timeout", now=101.5)  # a later overload counts again
    assert ctl.limit == start // 4
    assert not ctl.stats().slow_start


def test_failures_that_are_not_overload_leave_the_limit_alone() -> None:
    ctl = _grown(20)
    ctl.on_failure("error", now=100.0)
    assert ctl.limit == 20


def test_latency_growth_cuts_the_limit_to_what_the_server_serves_without_a_queue() -> None:
    ctl = _grown(40, min_samples=4)
    now = 1000.0
    while True:  # the server starts queueing: every answer now takes twice the unloaded latency
        before = ctl.stats()
        now += 0.1
        ctl.on_success(2.0, now)
        after = ctl.stats()
        if after.estimate < before.estimate:
            break
    assert not after.slow_start
    assert after.baseline_s == 1.0 and after.recent_s is not None and after.recent_s > 1.5
    # Little's law: the in-flight count served without a queue is the limit times unloaded over loaded latency.
    assert after.estimate == pytest.approx(before.estimate * after.baseline_s / after.recent_s)
    assert after.limit < 30


def test_never_below_min_nor_above_max() -> None:
    ctl = AdaptiveConcurrency(initial=4, min_limit=3, max_limit=10)
    for i in range(50):
        ctl.on_failure("connection", now=i * 10.0)
    assert ctl.limit == 3
    now = 1000.0
    for _ in range(500):
        now += 0.5
        ctl.on_success(0.5, now)
    assert ctl.limit == 10


def test_a_pool_that_does_not_use_the_limit_does_not_grow_it() -> None:
    ctl = _grown(8)
    for i in range(200):
        ctl.on_success(1.0, now=100.0 + i, in_flight=1)
    assert ctl.limit == 8


@pytest.mark.parametrize("normalised", [True, False])
def test_latency_is_compared_per_unit_of_work(normalised: bool) -> None:
    # Short answers set the baseline; then long answers arrive: 100 output tokens at 10 ms each is not a queue.
    ctl = AdaptiveConcurrency(min_samples=4)
    now = 0.0
    while ctl.limit < 16:
        now += 0.1
        ctl.on_success(0.1, now, work=10.0 if normalised else 1.0)
    for _ in range(100):
        now += 0.1
        ctl.on_success(1.0, now, work=100.0 if normalised else 1.0)
    if normalised:
        assert ctl.limit >= 16
    else:  # the same answers, read as raw latency, look like a tenfold queue
        assert ctl.limit < 16


def test_unmeasurable_samples_change_nothing() -> None:
    ctl = _grown(8)
    before = ctl.stats()
    for latency, now, work in [
        (math.nan, 100.0, 1.0), (-1.0, 100.0, 1.0), (math.inf, 100.0, 1.0), (1.0, math.nan, 1.0),
        (1.0, 100.0, 0.0), (1.0, 100.0, -3.0), (1.0, 100.0, math.nan),
    ]:
        ctl.on_success(latency, now, work=work)
    ctl.on_failure("overloaded", now=math.nan)
    assert ctl.stats() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": 5, "max_limit": 4, "initial": 5}, "max_limit"),
        ({"initial": 0}, "initial"),
        ({"initial": 300}, "initial"),
        ({"tolerance": 1.0}, "tolerance"),
        ({"backoff": 1.0}, "backoff"),
        ({"backoff": 0.0}, "backoff"),
        ({"min_samples": 0}, "min_samples"),
        ({"baseline_rounds": 0}, "baseline_rounds"),
        ({"default_window_s": 0.0}, "default_window_s"),
    ],
)
def test_bad_settings_name_the_setting(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        AdaptiveConcurrency(**kwargs)  # type: ignore[arg-type]


_events = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1000),
                  st.one_of(st.none(), st.integers(0, 500)), st.floats(allow_nan=True, allow_infinity=True)),
        st.tuples(st.just("fail"), st.sampled_from(["rate_limited", "overloaded", "timeout", "connection", "error"]),
                  st.floats(0, 1000)),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(events=_events, bounds=st.tuples(st.integers(1, 8), st.integers(0, 40)))
def test_any_sequence_of_events_keeps_the_limit_within_its_bounds(
    events: list[tuple[object, ...]], bounds: tuple[int, int]
) -> None:
    low, extra = bounds
    ctl = AdaptiveConcurrency(initial=low, min_limit=low, max_limit=low + extra)
    now = 0.0
    for event in events:
        if event[0] == "ok":
            _, latency, step, in_flight, work = event
            now += float(step)  # type: ignore[arg-type]
            ctl.on_success(float(latency), now, in_flight=in_flight, work=float(work))  # type: ignore[arg-type]
        else:
            _, kind, step = event
            now += float(step)  # type: ignore[arg-type]
            ctl.on_failure(kind, now)  # type: ignore[arg-type]
        assert low <= ctl.limit <= low + extra
