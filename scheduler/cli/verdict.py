"""What ``scheduler run`` says: why a run will not start, and at its end, its exit code and what to do next."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from ..errors import AuthenticationFailed, BudgetExhausted
from ..jsonl import EXPECTED_LINES, InputScan, OutputScan, describe_input
from .options import NO_KEY, batch_state
from .runtime import RunState

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["SIGNAL_EXIT", "refusal", "verdict"]

#: exit codes of a run stopped by a signal
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def refusal(plan: Plan, scan: InputScan) -> str | None:
    """Why the run must not start (exit 2, nothing sent), or None."""
    if scan.duplicates:
        lines = [f"{len(scan.duplicates)} custom_id(s) appear more than once in {plan.input}; nothing was sent. "
                 "Give every line its own custom_id:"]
        for custom_id, numbers in scan.duplicates[:20]:
            more = " ..." if len(numbers) > 10 else ""
            lines.append(f"  {custom_id!r} on lines {', '.join(map(str, numbers[:10]))}{more}")
        if len(scan.duplicates) > 20:
            lines.append(f"  ... and {len(scan.duplicates) - 20} more")
        return "\n".join(lines)
    if scan.not_objects * 2 > scan.lines:
        return (f"{plan.input} is not JSON Lines: {scan.not_objects:,} of its {scan.lines:,} line(s) are not JSON "
                f"objects (first: {scan.first_problem}); {describe_input(plan.input)}. Nothing was sent. "
                f"Expected one JSON object a line, like:\n{_indent(EXPECTED_LINES)}")
    if scan.mismatched and (scan.now_invalid or not plan.rerun_changed):
        lines = [f"{scan.mismatched:,} line(s) of {plan.input} have a result in {plan.output} that answers another "
                 "request; nothing was sent:"]
        lines += [f"  line {number} ({custom_id!r}) {what}" for number, custom_id, what in scan.mismatches]
        if scan.mismatched > len(scan.mismatches):
            lines.append(f"  ... and {scan.mismatched - len(scan.mismatches):,} more")
        if scan.now_invalid:
            lines.append("Fix the lines that are now invalid.")
        if scan.mismatched > scan.now_invalid:
            lines.append("If the input changed on purpose, add --rerun-changed to run the changed requests again "
                         "(their new lines supersede the old: the last line of a custom_id is its result); "
                         "else run the input the output was made from, or write to another output.")
        return "\n".join(lines)
    return None


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def verdict(plan: Plan, state: RunState, scan: InputScan, prior: OutputScan) -> tuple[int, str]:
    """The exit code and what to do next."""
    counts = state.counts
    left = counts.to_do - counts.done
    again = f"run the same command again to finish the {left:,} request(s) not done yet"
    if state.output_error is not None:
        if not state.output_error.resumable:
            return 3, f"Stopped: {state.output_error}; its results went with it. Run the same command to start over."
        return 3, (f"Stopped: {state.output_error}. Every line written is whole and kept: make room (or lift the "
                   f"limit), then {again}.")
    if state.signal is not None:
        code = SIGNAL_EXIT.get(signal.Signals(state.signal), 130)
        if state.batches_running:
            return code, (f"Interrupted: {state.batches_running:,} batch(es) keep running on the API, which keeps "
                          f"their results. Run the same command again to collect them and finish the rest "
                          f"({left:,} request(s) not done yet), or cancel them: scheduler batches cancel "
                          f"{plan.output} (their state is in {batch_state(plan.output)}).")
        return code, f"Interrupted: {again}."
    if state.fatal is not None:
        if state.fatal_code == BudgetExhausted.code:
            spent = prior.spent_usd + counts.cost_usd
            return 3, (f"Stopped: the budget of ${plan.budget_usd:g} is spent: {plan.output} records "
                       f"${spent:.4f} spent, and the next request could cost more than is left. Raise --budget to "
                       f"go on ({left:,} request(s) not done yet): a rerun counts what {plan.output} records.")
        fatal = state.fatal
        if state.fatal_code == AuthenticationFailed.code and plan.key == NO_KEY:
            fatal = (f"the server at {plan.base_url} wants an API key and OPENAI_API_KEY is not set: set it to "
                     "the server's key")
        return 3, f"Stopped: {fatal.rstrip('.')}. Then {again}."
    if left > 0:
        return 1, f"Not finished: {again}."
    failed = counts.failed + scan.done_failed
    notes = _notes(plan, state, scan)
    if counts.to_do == 0:
        some = f" ({failed:,} of them failed)" if failed else ""
        return (1 if failed else 0), (f"Nothing to do: every one of the {counts.lines:,} request(s) of {plan.input} "
                                      f"already has its result in {plan.output}{some}.{notes}")
    if failed:
        return 1, f"Done: {failed:,} request(s) failed; their error records are in {plan.output}.{notes}"
    return 0, f"Done: every request succeeded; results in {plan.output}.{notes}"


def _notes(plan: Plan, state: RunState, scan: InputScan) -> str:
    """What the user will want to know about a finished run."""
    counts, notes = state.counts, []
    if counts.truncated:
        notes.append(f"{counts.truncated:,} of {counts.succeeded:,} answers hit max_tokens (finish_reason "
                     "\"length\"): they are cut short.")
    if counts.invalid and counts.invalid * 2 > counts.to_do:
        notes.append(f"Most lines are not requests ({counts.invalid:,} of {counts.to_do:,}; first: "
                     f"{state.first_invalid}). A line looks like: {EXPECTED_LINES.splitlines()[-1]}")
    if plan.rerun_changed and scan.mismatched:
        notes.append(f"{scan.mismatched:,} changed request(s) ran again: their new lines supersede the old ones "
                     "(the last line of a custom_id is its result).")
    if scan.unchecked:
        notes.append(f"{scan.unchecked:,} earlier result(s) carry no request hash (an older version wrote them): "
                     "their requests were not compared.")
    return "".join(f" {note}" for note in notes)
