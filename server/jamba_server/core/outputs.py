"""Engine output as plain data: what the adapter hands the core, free of vllm types."""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    prompt_index: int = 0  # which prompt of a multi-prompt request the step is of
    # A non-streaming request's one output (all its tokens at once): the engine's time from its first
    # token to its last, for the latency metrics the steps would otherwise have timed.
    generation_seconds: float | None = None


def batch_step(step: EngineStep, prompt_index: int, n: int, prompt_tokens: int, finished: bool) -> EngineStep:
    """A step of one prompt of a multi-prompt request, as the request's own: that prompt's choice j
    is the request's choice `prompt_index * n + j` (OpenAI's order), `prompt_tokens` all prompts'
    and `finished` whether every prompt's choices are done."""
    choices = tuple(replace(c, index=prompt_index * n + c.index) for c in step.choices)
    return replace(step, choices=choices, prompt_tokens=prompt_tokens, finished=finished, prompt_index=prompt_index)
