"""How many tokens the server counts for each token of our estimate, learned from its rate-limit headers.

OpenAI counts a request against TPM by its own estimate (from the request's characters, plus the output cap),
not by tiktoken's count: the two differ by 10-30% on ordinary text. The headers tell the truth: between two
answers, what the server consumed is the change in its deficit (``limit - remaining``) plus its refill over the
span, and what we sent in between is counted raw (uncalibrated) in the shared sent counter. Their quotient is a
sample of the ratio; samples are smoothed.

A sample is valid only while the server's bucket cannot have been full in between (refill beyond full is no
consumption): the deficit at the start of the span must cover the span's refill. An over-estimate hides itself
that way (we send too little, the server's bucket fills up, no sample is valid), so a second rule corrects it:
when the headers show the server's bucket full while the pool waits on its token bucket, the ratio comes down,
fast. And a 429 on tokens says the other thing for sure (we sent more than the server allows): the ratio goes
up a step, so the pool settles just under the limit rather than on it. Servers whose buckets do not refill
continuously (fixed windows) or that count real usage are not calibrated here: the model gives them their own
treatment (see :mod:`scheduler.admission.model`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Calibration"]


@dataclass(slots=True)
class _Point:
    sent_at: float
    deficit: float
    raw: float


@dataclass(slots=True)
class Calibration:
    """The ratio between the server's token count and ours, from a continuously refilled bucket's headers."""

    #: server tokens per token of our estimate
    ratio: float = 1.0
    #: seconds between two points of a sample (shorter spans are noise)
    window_s: float = 0.25
    #: weight of a new sample in the smoothed ratio
    weight: float = 0.3
    #: the step down when the server shows room while we wait on tokens
    step_down: float = 0.9
    #: the step up on a 429 for tokens
    step_up: float = 1.03
    #: a server bucket within this share of its limit of full counts as full
    full: float = 0.002
    low: float = 0.5
    high: float = 2.5
    #: answers that gave a valid sample
    samples: int = 0
    _anchor: _Point | None = None
    _token_bound: bool = False

    def token_bound(self) -> None:
        """The pool waited on its token bucket (calibrated estimates bind)."""
        self._token_bound = True

    def refused(self) -> None:
        """A 429 on tokens: the server counted more than we charged."""
        self.ratio = min(self.high, self.ratio * self.step_up)

    def observe(self, limit: float, remaining: float, sent_at: float, raw: float) -> None:
        """One answer's token window: the server's ``limit`` per minute, ``remaining`` when the request (sent at
        ``sent_at``, with ``raw`` estimated tokens sent by then, its own included) arrived."""
        point = _Point(sent_at, max(0.0, limit - remaining), raw)
        anchor = self._anchor
        if anchor is None:
            self._anchor = point
            return
        span = sent_at - anchor.sent_at
        if span < self.window_s:
            return  # out of order (span < 0) or too short to tell from noise
        refill = span * limit / 60.0
        ours = raw - anchor.raw
        if anchor.deficit >= refill and ours > 0:
            theirs = point.deficit - anchor.deficit + refill
            sample = min(self.high, max(self.low, theirs / ours))
            self.ratio += self.weight * (sample - self.ratio)
            self.samples += 1
        elif self._token_bound and point.deficit <= limit * self.full:
            # The server's bucket is full while we wait on our token bucket: we count more than it does. Step
            # down; if that overshoots, valid samples (and 429s) bring the ratio back up.
            self.ratio = max(self.low, self.ratio * self.step_down)
        self._token_bound = False
        self._anchor = point
