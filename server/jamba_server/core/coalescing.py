"""How many tokens a streamed chunk may carry: the adaptive stream interval.

Every streamed chunk costs the API process a fixed amount (vLLM's `RequestOutput`, a task wake-up,
our render, a socket write) whatever it carries, so under load the front end's CPU per token falls
about as 1/k when each chunk carries k tokens (vLLM's per-request `stream_interval`). It also
delays tokens: a chunk waits for k engine steps. So the interval is chosen per streaming request
when it starts, from what the engine's steps take now:

- a server running fewer than `min_streams` streams is idle: its streams are never delayed;
- otherwise k is the most tokens whose steps, at the engine's recent median pace, fit in `max_gap`
  seconds (so the median gap between chunks, the inter-token latency a client sees, stays within
  it), at least the operator's fixed `stream_interval` and at most `MAX_INTERVAL`.

vLLM sends a request's first token at once and its last with the finish, whatever the interval, so
time to first token is never delayed; every chunk carries all its tokens' text and logprobs.
Pure: the engine adapter measures and applies.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_INTERVAL = 16  # a cap however fast the steps: beyond it the saving per token is small


@dataclass(frozen=True, slots=True)
class CoalescePolicy:
    fixed_interval: int = 1  # the operator's `stream_interval`: every stream's floor (vLLM's engine-wide one)
    max_gap: float = 0.0  # seconds of engine steps a chunk may wait for; 0 turns the adaptive interval off
    min_streams: int = 4  # streams running (this one included) before any is delayed

    def interval(self, streams: int, seconds_per_token: float | None) -> int:
        """Tokens per chunk for a stream starting now, with `streams` running (itself included)
        and the engine's recent `seconds_per_token` (None before any was measured)."""
        if self.max_gap <= 0 or streams < self.min_streams or not seconds_per_token:
            return self.fixed_interval
        fits = int(self.max_gap / seconds_per_token)
        return max(self.fixed_interval, min(MAX_INTERVAL, fits))


class TokenPace:
    """The engine's recent median seconds per output token, as a request's consumer sees them: the
    gap between a request's outputs over the tokens in the later one. A median, not a mean: the
    bound is on the median gap, and a mean would follow the rare long steps (a batch of prefills
    stalls every decode) that the median ignores. A request's first output (its prefill) is not a
    gap and is not observed.

    A frugal streaming median: each sample moves the estimate a fixed fraction (`step`) towards it,
    so it settles where half the samples lie above it; constant time and memory per sample, and it
    follows a change of load within a few hundred samples (a few engine steps at a busy server)."""

    __slots__ = ("seconds_per_token", "_up", "_down")

    def __init__(self, step: float = 0.02):
        self.seconds_per_token: float | None = None
        self._up, self._down = 1.0 + step, 1.0 / (1.0 + step)

    def observe(self, gap: float, tokens: int) -> None:
        if tokens <= 0 or gap <= 0:
            return
        sample, median = gap / tokens, self.seconds_per_token
        if median is None:
            self.seconds_per_token = sample
        elif sample > median:
            self.seconds_per_token = median * self._up
        elif sample < median:
            self.seconds_per_token = median * self._down
