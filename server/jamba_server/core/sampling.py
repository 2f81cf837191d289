"""API request → engine-independent sampling spec, with context-length checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from jamba_server.core.constraints import OutputConstraint
from jamba_server.errors import ContextLengthExceededError, InvalidRequestError
from jamba_server.protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class SamplingSpec:
    """Everything the engine needs to sample one request; the adapter maps it onto vLLM."""

    max_tokens: int
    n: int = 1
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    constraint: OutputConstraint | None = None  # structured output (JSON schema, regex, choice, grammar, tag)
    banned_tokens: tuple[str, ...] = ()  # special tokens that must not be sampled
    keep_special_tokens: bool = False  # detokenize tags too (the chat output parser strips them)
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-turn tokens
    include_stop_str_in_output: bool = False
    bad_words: tuple[str, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: int | None = None  # top candidates per prompt token (non-streaming)


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, max_model_len: int, default_cap: int | None = None
) -> int:
    """The request's max_tokens, or when absent all remaining context (at most `default_cap`)."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {prompt_tokens} tokens. Please shorten the prompt.",
            param="messages",
        )
    if requested is None:
        return room if default_cap is None else min(room, default_cap)
    if requested > room:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return requested


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
        bias[token_id] = value
    return bias


def _token_ids(ids: list[int] | None, vocab_size: int, param: str) -> tuple[int, ...]:
    for token_id in ids or ():
        if token_id >= vocab_size:
            raise InvalidRequestError(f"{param}: token id {token_id} is outside the vocabulary (0..{vocab_size - 1})", param=param)
    return tuple(ids or ())


def _keep_special_tokens(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """Chat always detokenizes special tokens, for its output parser (which strips them from
    content); completions keep them only when asked (`skip_special_tokens: false`)."""
    if isinstance(request, ChatCompletionRequest):
        if not request.skip_special_tokens:
            raise InvalidRequestError(
                "chat content never holds special tokens (the output parser turns them into tool calls "
                "and citations); use /v1/completions for raw output",
                param="skip_special_tokens",
            )
        return True
    return not request.skip_special_tokens


def sampling_spec(
    request: ChatCompletionRequest | CompletionRequest,
    *,
    prompt_tokens: int,
    max_model_len: int,
    vocab_size: int,
    constraint: OutputConstraint | None = None,
    banned_tokens: tuple[str, ...] = (),
    max_tokens_cap: int | None = None,
    verbatim: bool = False,
) -> SamplingSpec:
    """`verbatim`: a chat reply returned as generated (a constrained one), so detokenized without
    special tokens (a stop token kept by include_stop_str_in_output would otherwise be its text)."""
    if isinstance(request, ChatCompletionRequest):
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = request.logprobs
    if request.prompt_logprobs and request.stream:  # as vLLM: 0 is allowed, and streams nothing
        raise InvalidRequestError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    if request.min_tokens and request.requested_max_tokens() is not None:
        if request.min_tokens > request.requested_max_tokens():
            raise InvalidRequestError("min_tokens must not exceed max_tokens", param="min_tokens")
    return SamplingSpec(
        max_tokens=resolve_max_tokens(
            request.requested_max_tokens(), prompt_tokens, max_model_len, max_tokens_cap
        ),
        n=request.n,
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=0 if request.top_k in (None, -1) else request.top_k,
        min_p=request.min_p or 0.0,
        seed=request.seed,
        stop=tuple(request.stop_list()),
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        logit_bias=_logit_bias(request.logit_bias, vocab_size),
        logprobs=logprobs,
        min_tokens=request.min_tokens or 0,
        ignore_eos=request.ignore_eos,
        constraint=constraint,
        banned_tokens=banned_tokens,
        keep_special_tokens=_keep_special_tokens(request) and not verbatim,
        stop_token_ids=_token_ids(request.stop_token_ids, vocab_size, "stop_token_ids"),
        include_stop_str_in_output=request.include_stop_str_in_output,
        bad_words=tuple(request.bad_words or ()),
        allowed_token_ids=_token_ids(request.allowed_token_ids, vocab_size, "allowed_token_ids") or None,
        prompt_logprobs=request.prompt_logprobs,
    )
