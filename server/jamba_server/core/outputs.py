"""Engine output as plain data: what the adapter hands the core, free of vllm types."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class PromptTokenLogprob:
    """One candidate at a prompt position: the prompt's own token and the top ones (vLLM's `Logprob`)."""

    token_id: int
    logprob: float
    rank: int | None
    decoded_token: str | None


# Per prompt position: None for the first token (nothing precedes it), else its candidates.
PromptLogprobs = tuple[tuple[PromptTokenLogprob, ...] | None, ...]


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
    prompt_logprobs: PromptLogprobs | None = None  # once, with the first step, when asked for
