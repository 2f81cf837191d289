"""Engine output as plain data: what the adapter hands the core, free of vllm types."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """New output of one choice since the previous step."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the choice, if one did


@dataclass(frozen=True, slots=True)
class EngineStep:
    choices: tuple[ChoiceDelta, ...]
    prompt_tokens: int
    finished: bool
