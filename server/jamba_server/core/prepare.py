"""Request → `GenerationJob`: every check a generation request passes, in one fixed order, and what
the one generation pipeline (http/pipeline.py, `run_job`) needs to run it and to render its output.

A wire protocol is a `prepare_*` function here plus its renderers (core/responses.py) and a route
module (http/routes/): the prompt,
the sampling spec and the feature labels come out of `prepare`, and the job's `renderers` build the
protocol's stream events or response object from engine steps. Synchronous and free of the event
loop, so the pipeline can run a large one in a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from jamba_server.core import prompt as prompts
from jamba_server.core.constraints import output_constraint
from jamba_server.core.features import ChatPlan, plan_chat
from jamba_server.core.limits import check_chat_input_limits, check_chat_limits, check_completion_limits
from jamba_server.core.responses import ChatAccumulator, ChatStreamer, CompletionAccumulator, CompletionStreamer
from jamba_server.core.sampling import SamplingSpec, sampling_spec
from jamba_server.errors import InvalidRequestError
from jamba_server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from jamba_server.settings import Settings


class EngineFacts(Protocol):
    """What preparing a job needs of the engine adapter."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int

    def engine_params(self, spec: SamplingSpec) -> Any: ...


@dataclass(frozen=True)
class Renderers:
    """How one protocol turns engine steps into its output: a streamer (stream events) or an
    accumulator (one response object), each made for a request id and the served model's name."""

    streamer: Callable[[str, str], Any]
    accumulator: Callable[[str, str], Any]
    opening: Callable[[Any], list[str]]  # the stream's first events, given the streamer
    closing: Callable[[Any], list[str]]  # its events after the last step's
    protocol: str = "openai"  # the stream's framing and the errors' envelope (http/sse.py, errors.py)
    failed: Callable[[Any, Any], list[str]] | None = None  # (streamer, error) → its closing events; else the framing's


@dataclass(frozen=True)
class GenerationJob:
    id_prefix: str  # of the response id: `chatcmpl`, `cmpl`, `msg`
    prompt: prompts.Prompt
    spec: SamplingSpec
    engine_params: Any  # `spec` as the engine's own, checked parameters
    features: tuple[str, ...]  # metric labels
    json_mode: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool
    renderers: Renderers
    endpoint: str  # metric label: `chat`, `completions`, `messages`
    id_separator: str = "-"  # between prefix and random part (Anthropic's ids: `msg_...`)


@dataclass(frozen=True)
class ChatParts:
    plan: ChatPlan
    prompt: prompts.Prompt
    spec: SamplingSpec
    engine_params: Any


def chat_parts(body: ChatCompletionRequest, engine: EngineFacts, settings: Settings, chat_template: str) -> ChatParts:
    """Limits → feature plan → prompt (rendered, tokenized by provenance) → sampling spec → the
    engine's parameters (the output constraint compiled): every chat-shaped protocol's checks."""
    check_chat_limits(body, settings)
    plan = plan_chat(body)
    prompt = prompts.render_chat(engine.tokenizer, chat_template, plan.template_inputs, True, plan.prompt_suffix)
    spec = sampling_spec(
        body,
        prompt_tokens=len(prompt.token_ids),
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        constraint=plan.constraint,
        banned_tokens=plan.banned_tokens,
        max_tokens_cap=settings.max_tokens_limit,
        verbatim=plan.parser.verbatim,
    )
    return ChatParts(plan, prompt, spec, engine.engine_params(spec))


def chat_job(parts: ChatParts, renderers: Renderers, *, stream: bool, endpoint: str, **fields: Any) -> GenerationJob:
    """The job for any chat-shaped protocol; `fields` sets the rest of GenerationJob's."""
    job_fields = {"id_prefix": "chatcmpl", "include_usage": False, "return_token_ids": False, **fields}
    return GenerationJob(
        prompt=parts.prompt,
        spec=parts.spec,
        engine_params=parts.engine_params,
        features=parts.plan.feature_labels,
        json_mode=parts.plan.json_mode,
        stream=stream,
        renderers=renderers,
        endpoint=endpoint,
        **job_fields,
    )


def prepare_chat(body: ChatCompletionRequest, engine: EngineFacts, settings: Settings, chat_template: str) -> GenerationJob:
    parts = chat_parts(body, engine, settings, chat_template)
    plan, n = parts.plan, parts.spec.n
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    renderers = Renderers(
        streamer=lambda rid, model: ChatStreamer(rid, model, n, body.logprobs, created=created, parser=plan.parser),
        accumulator=lambda rid, model: ChatAccumulator(rid, model, n, body.logprobs, plan.parser),
        opening=lambda streamer: [streamer.opening()],
        closing=lambda streamer: [streamer.usage_chunk()] if include_usage else [],
    )
    return chat_job(
        parts, renderers, stream=body.stream, endpoint="chat", include_usage=include_usage, return_token_ids=body.return_token_ids
    )


def prepare_completion(body: CompletionRequest, engine: EngineFacts, settings: Settings) -> GenerationJob:
    """Limits → prompt (raw text, or token ids checked against the vocabulary) → output constraint →
    sampling spec → echo text (decoded only once the length is known to fit) → the engine's
    parameters (the constraint compiled)."""
    check_completion_limits(body, settings)
    if isinstance(body.prompt, str):
        prompt = prompts.encode_prompt(engine.tokenizer, body.prompt)
    else:
        bad = [t for t in body.prompt if not 0 <= t < engine.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
        prompt = prompts.Prompt(text="", token_ids=list(body.prompt))
    constraint = output_constraint(body.response_format, body.structured_outputs)
    spec = sampling_spec(
        body,
        prompt_tokens=len(prompt.token_ids),
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        constraint=constraint,
        max_tokens_cap=settings.max_tokens_limit,
    )
    if body.echo and not isinstance(body.prompt, str):
        prompt = prompts.Prompt(text=engine.tokenizer.decode(body.prompt), token_ids=prompt.token_ids)
    want_logprobs = body.logprobs is not None
    echo_text = prompt.text if body.echo else ""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    created = int(time.time())
    renderers = Renderers(
        streamer=lambda rid, model: CompletionStreamer(rid, model, spec.n, want_logprobs, created=created),
        accumulator=lambda rid, model: CompletionAccumulator(rid, model, spec.n, want_logprobs, echo_text=echo_text),
        opening=lambda streamer: [streamer.echo(echo_text)] if echo_text else [],
        closing=lambda streamer: [streamer.usage_chunk()] if include_usage else [],
    )
    return GenerationJob(
        id_prefix="cmpl",
        prompt=prompt,
        spec=spec,
        engine_params=engine.engine_params(spec),
        features=_completion_features(body),
        json_mode=constraint is not None and constraint.is_json,
        stream=body.stream,
        include_usage=include_usage,
        return_token_ids=body.return_token_ids,
        renderers=renderers,
        endpoint="completions",
    )


def _completion_features(body: CompletionRequest) -> tuple[str, ...]:
    """Metric labels, as chat's: the output constraint a completion asks for."""
    fmt = body.response_format.type if body.response_format is not None else None
    labels = {"json_object": ("json_mode",), "json_schema": ("json_schema",)}.get(fmt or "", ())
    return labels + (("structured_outputs",) if body.structured_outputs is not None else ())


def prepare_tokenize(body: TokenizeRequest, engine: EngineFacts, settings: Settings, chat_template: str) -> prompts.Prompt:
    """The prompt a chat or completions request would get, through the same checks and rendering."""
    if body.messages is None:
        return prompts.encode_prompt(engine.tokenizer, body.prompt or "", body.add_special_tokens)
    check_chat_input_limits(body, settings)
    plan = plan_chat(body)
    suffix = plan.prompt_suffix if body.add_generation_prompt else ""
    return prompts.render_chat(engine.tokenizer, chat_template, plan.template_inputs, body.add_generation_prompt, suffix)


def prepare_detokenize(body: DetokenizeRequest, engine: EngineFacts) -> str:
    """The text of token ids (special tokens included), each id checked against the vocabulary."""
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {engine.vocab_size})", param="tokens")
    return engine.tokenizer.decode(body.tokens)
