"""``scheduler estimate``: what a run of a JSONL file would cost on each tier and how long the limits let it take,
known before anything is sent. ``scheduler run --dry-run`` prints the same for the lines a run would send.

The input is read as a stream (one line at a time, a small tally per model). For each request the prompt is
counted with the model's tokenizer and the output reserved is its cap (``max_tokens`` and the like, times ``n``;
1,024 tokens for a request without one). Costs come from the price table (:mod:`scheduler.cost`):

- **worst case**: the whole prompt at the uncached input price and the whole output reservation spent;
- **expected**: the whole prompt and a share of the reservation (``--output-share``, half by default: no answer
  is known before the run, and answers seldom fill their cap);
- **time**: what the rate limits allow online (the slower of requests/RPM and tokens/TPM per model, models in
  parallel, as OpenAI limits each model on its own); a batch may take up to its 24-hour completion window.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..batch_api import BatchLimits, Splitter, online_seconds
from ..cost import PriceTable, Tier
from ..jsonl import line_custom_id, parse_line, read_lines
from ..limits import Limits
from ..logs import configure_logging
from ..tokens import TokenEstimator, output_cap, output_reservation

if TYPE_CHECKING:
    from ..jsonl import InputScan, OutputScan
    from .plan import Plan

from .options import DEFAULT_MODEL, TIER_CHOICES, deadline, fail, model_limit, positive_int, share

__all__ = [
    "Estimate", "ModelTally", "TierFigures", "add_parser", "dry_run", "estimate", "print_estimate", "tally_input",
]

#: safety and margin of the ``auto`` tier's cut-over: as ``scheduler run --tier auto`` plans it
CUTOVER_SAFETY = 1.25
CUTOVER_MARGIN_S = 60.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``estimate`` to the ``scheduler`` command."""
    parser = commands.add_parser(
        "estimate",
        help="what a run would cost on each tier and how long it may take; sends nothing",
        description="Read INPUT as a stream and print its requests, prompt tokens and output reserved, and for "
        "each tier the worst-case and expected cost and the time the rate limits allow. Nothing is sent.",
    )
    add = parser.add_argument
    add("input", type=Path, help="requests, one JSON object a line (as for scheduler run)")
    add("--tier", choices=[*TIER_CHOICES, "all"], default="all",
        help="the tier to estimate (default all; auto needs --deadline)")
    add("--model", default=DEFAULT_MODEL, help=f"model of requests that name none (default {DEFAULT_MODEL})")
    add("--rpm", type=positive_int, help="requests per minute of the online tiers")
    add("--tpm", type=positive_int, help="tokens per minute of the online tiers")
    add("--limit", type=model_limit, action="append", default=[], metavar="MODEL=RPM,TPM",
        help="a model's own limits (repeatable)")
    add("--deadline", type=deadline, metavar="WHEN",
        help="for --tier auto: a duration from now (6h, 90m) or an ISO time (2025-06-01T18:00)")
    add("--prices", type=Path, metavar="FILE", help="JSON prices per model, adding to the built-in list prices")
    add("--output-share", type=share, default=0.5, metavar="SHARE",
        help="share of the output reservation the expected cost assumes spent (default 0.5)")
    add("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=_estimate)


def _estimate(args: argparse.Namespace) -> int:
    # Warnings (an offline tokenizer's, say) go to stderr: stdout is the estimate, JSON with --json.
    configure_logging(level=logging.WARNING)
    source: Path = args.input
    if not source.is_file():
        return fail("estimate", f"no such input file (or not a regular file): {source}")
    if args.tier == "auto" and args.deadline is None:
        return fail("estimate", "--tier auto plans for a deadline: give --deadline (6h, 90m, or an ISO time)")
    try:
        prices = PriceTable.load(args.prices)
    except Exception as exc:  # a bad prices file is the user's to fix, whatever it raised
        return fail("estimate", str(exc))
    limits = Limits(rpm=args.rpm, tpm=args.tpm) if args.rpm or args.tpm else None
    tally = tally_input(source, model=args.model)
    tiers: tuple[str, ...] = TIER_CHOICES if args.tier == "all" else (args.tier,)
    if args.tier == "all" and args.deadline is None:
        tiers = tuple(t for t in tiers if t != "auto")
    result = estimate(tally, tiers=tiers, prices=prices, limits=limits, model_limits=dict(args.limit),
                      output_share=args.output_share, deadline_unix=args.deadline)
    print_estimate(result, title=f"scheduler estimate  {source}", as_json=args.json)
    return 0


# ---------------------------------------------------------------------------------------------- the tally


@dataclass(slots=True)
class ModelTally:
    """The requests of one model: how many, and their tokens."""

    model: str
    requests: int = 0
    prompt_tokens: int = 0
    #: output tokens reserved: each request's cap (times n), the default for requests without one
    output_tokens: int = 0
    #: requests without an output cap (each reserved the default)
    uncapped: int = 0
    #: Batch API input files the requests fill (one endpoint and model a file, at most 50,000 requests and 200 MB)
    batch_files: int = 0


@dataclass(slots=True)
class InputTally:
    """What a pass over the input found."""

    #: requests counted (valid lines not skipped)
    requests: int = 0
    #: lines that are not requests (they would become error records)
    invalid: int = 0
    #: lines skipped (already done in the output)
    skipped: int = 0
    #: output reserved for a request without a cap
    default_output: int = 1024
    models: dict[str, ModelTally] = field(default_factory=dict)


def tally_input(
    path: Path, *, model: str, skip: Callable[[str], bool] | None = None,
    estimator: TokenEstimator | None = None, limits: BatchLimits = BatchLimits(),  # noqa: B008 - frozen
) -> InputTally:
    """Count the requests of ``path`` per model, a line at a time.

    Args:
        path: the input file.
        model: the model of bodies that name none.
        skip: says which ids to leave out (those already done).
        estimator: counts the prompts (default: tiktoken, the model's encoding).
        limits: what one Batch API input file may hold, to count the files.
    """
    estimator = estimator or TokenEstimator()
    tally = InputTally(default_output=estimator.default_output_tokens)
    splitter = Splitter(limits)
    files: set[int] = set()
    with path.open("rb") as file:
        for number, raw in read_lines(file):
            if skip is not None and skip(line_custom_id(number, raw)):
                tally.skipped += 1
                continue
            line = parse_line(number, raw, model=model)
            request = line.request
            if request is None:
                tally.invalid += 1
                continue
            endpoint, body = request.endpoint, request.body
            name = str(body["model"])
            entry = tally.models.get(name)
            if entry is None:
                entry = tally.models[name] = ModelTally(name)
            tally.requests += 1
            entry.requests += 1
            entry.prompt_tokens += estimator.prompt_tokens(endpoint, body)
            entry.output_tokens += output_reservation(endpoint, body, estimator.default_output_tokens)
            entry.uncapped += output_cap(body) is None and output_reservation(endpoint, body, 1) > 0
            size = len(orjson.dumps({"custom_id": line.custom_id, "method": "POST", "url": endpoint,
                                     "body": body})) + 1
            part, _ = splitter.place((endpoint, name), size)
            if part not in files:
                files.add(part)
                entry.batch_files += 1
    return tally


# ---------------------------------------------------------------------------------------------- per tier


@dataclass(frozen=True, slots=True)
class TierFigures:
    """One tier's figures."""

    tier: str
    #: the most it can cost (None: a model has no price on this tier)
    worst_usd: float | None
    expected_usd: float | None
    #: seconds the online limits allow (None: no limits given, or not an online tier)
    seconds: float | None
    #: what else to know (the batch window, models not offered, the cut-over)
    note: str = ""


@dataclass(frozen=True, slots=True)
class Estimate:
    """The whole estimate: the tally and each tier's figures."""

    tally: InputTally
    tiers: tuple[TierFigures, ...]
    output_share: float
    #: the online limits of each model (None: not given)
    limits: Mapping[str, Limits | None]

    def to_json(self) -> dict[str, Any]:
        """The estimate as one JSON object."""
        t = self.tally
        return {
            "requests": t.requests, "invalid_lines": t.invalid, "already_done": t.skipped,
            "prompt_tokens": sum(m.prompt_tokens for m in t.models.values()),
            "output_reserved": sum(m.output_tokens for m in t.models.values()),
            "output_share": self.output_share,
            "models": {m.model: {"requests": m.requests, "prompt_tokens": m.prompt_tokens,
                                 "output_reserved": m.output_tokens, "uncapped": m.uncapped,
                                 "batch_files": m.batch_files} for m in t.models.values()},
            "tiers": [{"tier": f.tier, "worst_case_usd": _round(f.worst_usd), "expected_usd": _round(f.expected_usd),
                       "seconds": None if f.seconds is None else round(f.seconds, 1), "note": f.note}
                      for f in self.tiers],
        }


def estimate(
    tally: InputTally, *, tiers: tuple[str, ...], prices: PriceTable, limits: Limits | None,
    model_limits: Mapping[str, Limits] | None = None, output_share: float = 0.5, deadline_unix: float | None = None,
    now_unix: float | None = None,
) -> Estimate:
    """Each tier's figures for ``tally``.

    Args:
        tally: what :func:`tally_input` counted.
        tiers: the tiers to estimate (``standard``, ``flex``, ``batch``, ``auto``).
        prices: the price table.
        limits: the online limits of every model not in ``model_limits`` (None: not known).
        model_limits: limits of particular models.
        output_share: share of the output reservation the expected cost assumes spent.
        deadline_unix: the ``auto`` tier's deadline.
        now_unix: the time now (for the ``auto`` tier).
    """
    model_limits = model_limits or {}
    per_model = {name: model_limits.get(name, limits) for name in tally.models}
    online = _online_seconds(tally, per_model)
    figures: list[TierFigures] = []
    for tier in tiers:
        if tier == "auto":
            figures.append(_auto(tally, prices, online, output_share, deadline_unix, now_unix or time.time()))
            continue
        worst, expected = _costs(tally, prices, tier, output_share)  # type: ignore[arg-type]
        if tier == "standard":
            figures.append(TierFigures(tier, worst, expected, online, "" if online is not None else
                                       "give --rpm/--tpm for the time"))
        elif tier == "flex":
            missing = [m for m in tally.models if prices.price(m, "flex") is None]
            note = (f"not offered for {', '.join(missing)}" if missing else
                    "at least the standard time: slower answers, waits when capacity is short")
            figures.append(TierFigures(tier, worst, expected, online, note))
        else:
            files = sum(m.batch_files for m in tally.models.values())
            figures.append(TierFigures(tier, worst, expected, None,
                                       f"up to 24 h ({files:,} batch file(s)); its own, larger limits"))
    return Estimate(tally, tuple(figures), output_share, per_model)


def _costs(tally: InputTally, prices: PriceTable, tier: Tier, share: float) -> tuple[float | None, float | None]:
    worst = expected = 0.0
    for m in tally.models.values():
        price = prices.price(m.model, tier)
        if price is None:
            return None, None
        worst += price.worst_case(m.prompt_tokens, m.output_tokens)
        expected += price.worst_case(m.prompt_tokens, round(m.output_tokens * share))
    return worst, expected


def _online_seconds(tally: InputTally, limits: Mapping[str, Limits | None]) -> float | None:
    """Seconds the online limits allow for everything (models in parallel); None when a model's are unknown."""
    seconds = 0.0
    for m in tally.models.values():
        lim = limits.get(m.model)
        if lim is None or (lim.rpm is None and lim.tpm is None):
            return None
        seconds = max(seconds, online_seconds(m.requests, m.prompt_tokens + m.output_tokens, rpm=lim.rpm,
                                              tpm=lim.tpm))
    return seconds


def _auto(
    tally: InputTally, prices: PriceTable, online: float | None, share: float, deadline_unix: float | None,
    now_unix: float,
) -> TierFigures:
    """The ``auto`` plan: the Batch API until the cut-over, then what is left online (flex where the model offers
    it, standard otherwise). Expected: the batches finish in time; worst case: everything runs online."""
    if deadline_unix is None:
        return TierFigures("auto", None, None, None, "give --deadline to plan it")
    batch_worst, batch_expected = _costs(tally, prices, "batch", share)
    online_worst = _online_worst(tally, prices)
    if online is None:
        return TierFigures("auto", online_worst, batch_expected, None, "give --rpm/--tpm: the cut-over needs them")
    left = deadline_unix - now_unix
    needed = online * CUTOVER_SAFETY
    if needed > left:
        return TierFigures("auto", online_worst, online_worst, online,
                           f"the deadline is too near: online alone needs ~{_duration(needed)}")
    # What cutover_at says, with the online time of several models (each limited on its own) taken whole.
    cut = deadline_unix - needed - margin_s(left)
    if cut <= now_unix:
        return TierFigures("auto", online_worst, online_worst, online, "everything online: no time for batches")
    clock = time.strftime("%H:%M", time.localtime(cut))
    return TierFigures("auto", online_worst if online_worst is not None else batch_worst, batch_expected, None,
                       f"Batch API until {clock} ({_duration(cut - now_unix)} from now), then the rest online")


def margin_s(left_s: float) -> float:
    """Seconds kept for the cut-over itself: a minute, or a tenth of the time left when that is shorter."""
    return min(CUTOVER_MARGIN_S, max(0.0, left_s) / 10.0)


def _online_worst(tally: InputTally, prices: PriceTable) -> float | None:
    """Worst case of running everything online: flex where the model offers it (it may fall back to standard:
    counted at standard, the dearer)."""
    worst = 0.0
    for m in tally.models.values():
        price = prices.price(m.model)
        if price is None:
            return None
        worst += price.worst_case(m.prompt_tokens, m.output_tokens)
    return worst


# ---------------------------------------------------------------------------------------------- printing


def print_estimate(result: Estimate, *, title: str, as_json: bool, plan: str | None = None) -> None:
    """Print ``result`` on stdout: a table, or one JSON object."""
    if as_json:
        body = result.to_json()
        if plan is not None:
            body["plan"] = plan
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
        return
    t = result.tally
    models = sorted(t.models.values(), key=lambda m: -m.requests)
    prompt = sum(m.prompt_tokens for m in models)
    output = sum(m.output_tokens for m in models)
    uncapped = sum(m.uncapped for m in models)
    lines = [title]
    if plan is not None:
        lines.append(f"  plan              {plan}")
    extra = [f"{t.skipped:,} already done" if t.skipped else "", f"{t.invalid:,} invalid line(s)" if t.invalid else ""]
    lines.append(f"  requests          {t.requests:,}" + "".join(f"  ({e})" for e in extra if e))
    if len(models) > 1:
        lines.extend(f"    {m.model:<24} {m.requests:,}" for m in models)
    lines.append(f"  prompt tokens     {prompt:,}")
    cap = f"  ({uncapped:,} without an output cap: {t.default_output:,} reserved each)" if uncapped else ""
    lines.append(f"  output reserved   {output:,}{cap}")
    known = {name: lim for name, lim in result.limits.items() if lim is not None}
    if len(set(known.values())) == 1 and len(known) == len(result.limits):
        lines.append(f"  online limits     {_limits(next(iter(known.values())))} (each model)")
    elif known:
        lines.append("  online limits     " + "; ".join(f"{name}: {_limits(lim)}" for name, lim in known.items()))
    lines.append("")
    standard = next((f for f in result.tiers if f.tier == "standard"), None)
    lines.append(f"  {'tier':<9}  {'worst case':>10}  {'expected':>10}  {'vs standard':>11}  time the limits allow")
    for f in result.tiers:
        saving = ""
        if standard is not None and f is not standard and f.expected_usd is not None and standard.expected_usd:
            saving = f"{f.expected_usd / standard.expected_usd - 1:+.0%}"
        time_text = _duration(f.seconds) if f.seconds is not None else ""
        note = f"{time_text}  {f.note}".strip() if time_text and f.note else time_text or f.note
        lines.append(f"  {f.tier:<9}  {_usd(f.worst_usd):>10}  {_usd(f.expected_usd):>10}  {saving:>11}  {note}")
    lines.append("")
    lines.append(f"  expected: the prompts in full and {result.output_share:.0%} of the output reserved; worst case: "
                 "all of it, no cached input.")
    sys.stdout.write("\n".join(lines) + "\n")


def _usd(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"${value:,.4f}" if value < 10 else f"${value:,.2f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _limits(lim: Limits) -> str:
    parts = [f"{lim.rpm:,} RPM" if lim.rpm else "", f"{lim.tpm:,} TPM" if lim.tpm else ""]
    return ", ".join(p for p in parts if p)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def dry_run(plan: Plan, prior: OutputScan, scan: InputScan) -> None:
    """Print what the run would send (the lines not done yet) and what it would cost on each tier."""
    tally = tally_input(plan.input, model=plan.model,
                        skip=lambda custom_id: prior.is_done(custom_id) and custom_id not in scan.changed)
    limits = Limits(rpm=plan.rpm, tpm=plan.tpm) if plan.rpm or plan.tpm else None
    if limits is None and plan.mock:
        limits = plan.online_limits()
    tiers = ("standard", "flex", "batch", "auto") if plan.tier == "auto" else ("standard", "flex", "batch")
    result = estimate(tally, tiers=tiers, prices=PriceTable.load(plan.prices), limits=limits,
                      model_limits=dict(plan.model_limits), deadline_unix=plan.deadline_unix)
    where = f" before {time.strftime('%Y-%m-%d %H:%M', time.localtime(plan.deadline_unix))}" if (
        plan.deadline_unix is not None) else ""
    print_estimate(result, title=f"scheduler run --dry-run  {plan.input} -> {plan.output}", as_json=False,
                   plan=f"--tier {plan.tier}{where}; nothing sent")
