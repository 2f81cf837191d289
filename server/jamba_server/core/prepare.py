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
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from jamba_server.core import prompt as prompts
from jamba_server.core.constraints import OutputConstraint, output_constraint
from jamba_server.core.features import ChatPlan, plan_chat
from jamba_server.core.limits import check_chat_input_limits, check_chat_limits, check_completion_limits
from jamba_server.core.responses import ChatAccumulator, ChatStreamer, CompletionAccumulator, CompletionStreamer
from jamba_server.core.sampling import SamplingSpec, sampling_spec
from jamba_server.core.truncation import DEFAULT_SIDE, Truncation, prompt_budget, truncate_chat, truncate_ids
from jamba_server.errors import ContextLengthExceededError, InvalidRequestError
from jamba_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    PromptTruncation,
    SamplingFields,
    TokenizeRequest,
)
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
class PromptRun:
    """One prompt's engine request: the prompt, its sampling spec and the engine's parameters."""

    prompt: prompts.Prompt
    spec: SamplingSpec
    engine_params: Any
    truncation: Truncation | None = None  # when the request set truncate_prompt_tokens


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
    priority: int = 0  # lower first, in our queue and the engine's (a priority-scheduling server)
    cache_salt: str | None = None  # the engine's prefix cache is shared only between equal salts
    # A multi-prompt completions request's other prompts, each its own engine request, run with the first.
    more_prompts: tuple[PromptRun, ...] = ()

    @property
    def runs(self) -> tuple[PromptRun, ...]:
        return (PromptRun(self.prompt, self.spec, self.engine_params), *self.more_prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(run.prompt.token_ids) for run in self.runs)


@dataclass(frozen=True)
class ChatParts:
    plan: ChatPlan
    prompt: prompts.Prompt
    spec: SamplingSpec
    engine_params: Any
    truncation: Truncation | None = None  # when the request set truncate_prompt_tokens


def _budget(body: SamplingFields, engine: EngineFacts, settings: Settings, max_tokens_param: str) -> int | None:
    return prompt_budget(
        body.truncate_prompt_tokens, body.requested_max_tokens(), engine.max_model_len, settings.max_tokens_limit, max_tokens_param
    )


def truncation_report(truncation: Truncation | None, chat: bool) -> PromptTruncation | None:
    """The response's `prompt_truncation` (the message and document lists on chat only)."""
    if truncation is None:
        return None
    lists = {}
    if chat:
        lists = {
            "messages_truncated": list(truncation.messages_truncated),
            "messages_dropped": list(truncation.messages_dropped),
            "documents_truncated": list(truncation.documents_truncated),
        }
    return PromptTruncation(
        side=truncation.side,
        limit=truncation.limit,
        prompt_tokens_before=truncation.prompt_tokens_before,
        tokens_removed=truncation.tokens_removed,
        **lists,
    )


def _reporting(result: Any, truncation: PromptTruncation | None) -> Any:
    result.prompt_truncation = truncation
    return result


def render_plan(engine: EngineFacts, chat_template: str, plan: ChatPlan) -> prompts.Prompt:
    """The planned prompt: the conversation rendered, ended as the plan says (the generation prompt
    and any forced opening, nothing, or the final message left open)."""
    return prompts.render_chat(
        engine.tokenizer,
        chat_template,
        plan.template_inputs,
        plan.add_generation_prompt,
        plan.prompt_suffix,
        continue_final_message=plan.continue_final_message,
    )


def chat_parts(body: ChatCompletionRequest, engine: EngineFacts, settings: Settings, chat_template: str) -> ChatParts:
    """Limits → feature plan → prompt (rendered, tokenized by provenance; cut to the budget when the
    request truncates) → sampling spec → the engine's parameters (the output constraint compiled):
    every chat-shaped protocol's checks."""
    check_chat_limits(body, settings)
    plan = plan_chat(body)

    def render(inputs: dict[str, Any]) -> prompts.Prompt:
        return render_plan(engine, chat_template, replace(plan, template_inputs=inputs))

    prompt = render(plan.template_inputs)
    truncation = None
    limit = _budget(body, engine, settings, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    if limit is not None:
        if plan.continue_final_message:
            raise InvalidRequestError(
                "truncate_prompt_tokens cannot be combined with continue_final_message (the cut could "
                "shorten the message being continued)",
                param="truncate_prompt_tokens",
            )
        side = body.truncation_side or DEFAULT_SIDE
        token_starts = prompts.control_spellings(engine.tokenizer).token_starts
        cut = truncate_chat(plan.template_inputs, prompt, limit, side, render, token_starts)
        prompt, truncation = cut.prompt, cut.truncation
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
    return ChatParts(plan, prompt, spec, engine.engine_params(spec), truncation)


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


def engine_request_options(body: SamplingFields, settings: Settings) -> dict[str, Any]:
    """The engine request's own options (GenerationJob fields): `priority`, which only a server
    scheduling by priority honours (elsewhere a non-zero one is a 400, as in vLLM), and `cache_salt`."""
    if body.priority and settings.scheduling_policy != "priority":
        raise InvalidRequestError(
            "priority is only supported when the server runs with --scheduling-policy priority "
            f"(this one schedules {settings.scheduling_policy})",
            param="priority",
        )
    return {"priority": body.priority, "cache_salt": body.cache_salt}


def _usage_flags(body: ChatCompletionRequest | CompletionRequest) -> tuple[bool, bool]:
    """(a closing usage chunk, usage on every chunk)."""
    return body.stream_options.usage_flags() if body.stream_options else (False, False)


def prepare_chat(body: ChatCompletionRequest, engine: EngineFacts, settings: Settings, chat_template: str) -> GenerationJob:
    parts = chat_parts(body, engine, settings, chat_template)
    plan, n = parts.plan, parts.spec.n
    created = int(time.time())
    include_usage, continuous_usage = _usage_flags(body)
    prompt_tokens = len(parts.prompt.token_ids)
    echo = echo_text(body)
    truncated = truncation_report(parts.truncation, chat=True)
    renderers = Renderers(
        streamer=lambda rid, model: _reporting(
            ChatStreamer(
                rid, model, n, body.logprobs, created=created, parser=plan.parser,
                continuous_usage=continuous_usage, prompt_tokens=prompt_tokens,
            ),
            truncated,
        ),  # fmt: skip
        accumulator=lambda rid, model: _reporting(
            ChatAccumulator(rid, model, n, body.logprobs, plan.parser, echo_text=echo), truncated
        ),
        opening=lambda streamer: [streamer.opening(), *(streamer.echo(echo) if echo else [])],
        closing=lambda streamer: [streamer.usage_chunk()] if include_usage else [],
    )
    return chat_job(
        parts, renderers, stream=body.stream, endpoint="chat", include_usage=include_usage,
        return_token_ids=body.return_token_ids, **engine_request_options(body, settings),
    )  # fmt: skip


def echo_text(body: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's content starts the reply's when it is of the reply's
    role (here always `assistant`), so a prefill comes back whole with its continuation."""
    last = body.messages[-1]
    return last.text() if body.echo and last.role == "assistant" else ""


def prepare_completion(body: CompletionRequest, engine: EngineFacts, settings: Settings) -> GenerationJob:
    """Limits → each prompt's run (below) → renderers over all of them: a list of prompts is one
    request whose prompt i's choice j has index i*n + j."""
    check_completion_limits(body, settings)
    items = body.prompt_list()
    if len(items) * body.n > settings.max_n:
        raise InvalidRequestError(
            f"too many choices: {len(items)} prompts x n={body.n} (limit {settings.max_n})", param="prompt"
        )
    constraint = output_constraint(body.response_format, body.structured_outputs)
    runs = [_completion_run(body, engine, settings, param, item, constraint) for param, item in items]
    choices = body.n * len(runs)
    want_logprobs = body.logprobs is not None
    echo_texts = [run.prompt.text if body.echo else "" for run in runs for _ in range(body.n)]
    prompt_ids = [run.prompt.token_ids for run in runs]
    include_usage, continuous_usage = _usage_flags(body)
    created = int(time.time())
    truncated = truncation_report(_summed([run.truncation for run in runs]), chat=False)
    renderers = Renderers(
        streamer=lambda rid, model: _reporting(
            CompletionStreamer(
                rid, model, choices, want_logprobs, created=created,
                continuous_usage=continuous_usage, prompt_tokens=sum(map(len, prompt_ids)),
            ),
            truncated,
        ),  # fmt: skip
        accumulator=lambda rid, model: _reporting(
            CompletionAccumulator(rid, model, choices, want_logprobs, echo_text=echo_texts, prompts=prompt_ids), truncated
        ),
        opening=lambda streamer: [streamer.echo(echo_texts)] if any(echo_texts) else [],
        closing=lambda streamer: [streamer.usage_chunk()] if include_usage else [],
    )
    first = runs[0]
    return GenerationJob(
        id_prefix="cmpl",
        prompt=first.prompt,
        spec=first.spec,
        engine_params=first.engine_params,
        features=_completion_features(body),
        json_mode=constraint is not None and constraint.is_json,
        stream=body.stream,
        include_usage=include_usage,
        return_token_ids=body.return_token_ids,
        renderers=renderers,
        endpoint="completions",
        more_prompts=tuple(runs[1:]),
        **engine_request_options(body, settings),
    )


def _completion_run(
    body: CompletionRequest,
    engine: EngineFacts,
    settings: Settings,
    param: str,
    item: str | list[int],
    constraint: OutputConstraint | None,
) -> PromptRun:
    """One prompt (raw text, or token ids checked against the vocabulary) → its sampling spec (its
    own room for max_tokens, the output constraint) → echo text (decoded only once the length is known to fit) → the
    engine's parameters. Errors name the prompt (`prompt[i]` in a list)."""
    if len(item) == 0:
        raise InvalidRequestError("a prompt must not be empty", param=param)
    if isinstance(item, str):
        prompt = prompts.encode_prompt(engine.tokenizer, item)
    else:
        bad = [t for t in item if not 0 <= t < engine.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary", param=param)
        prompt = prompts.Prompt(text="", token_ids=list(item))
    prompt, truncation = _truncated_completion(body, engine, settings, item, prompt)
    try:
        spec = sampling_spec(
            body,
            prompt_tokens=len(prompt.token_ids),
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            constraint=constraint,
            max_tokens_cap=settings.max_tokens_limit,
        )
    except ContextLengthExceededError as exc:
        if param != "prompt" and exc.param == "messages":  # the prompt itself is too long: say which
            exc.param = param
        raise
    if body.echo and not isinstance(item, str):
        prompt = prompts.Prompt(text=engine.tokenizer.decode(prompt.token_ids), token_ids=prompt.token_ids)
    return PromptRun(prompt, spec, engine.engine_params(spec), truncation)


def _truncated_completion(
    body: CompletionRequest, engine: EngineFacts, settings: Settings, item: str | list[int], prompt: prompts.Prompt
) -> tuple[prompts.Prompt, Truncation | None]:
    """The prompt cut to the request's budget (when it truncates): a text prompt keeps the BOS the
    tokenizer put first; a list of ids is the client's to the last."""
    limit = _budget(body, engine, settings, "max_tokens")
    if limit is None:
        return prompt, None
    side = body.truncation_side or DEFAULT_SIDE
    ids = prompt.token_ids
    bos = getattr(engine.tokenizer, "bos_token_id", None)
    keep_first = 1 if isinstance(item, str) and ids and bos is not None and ids[0] == bos else 0
    kept = truncate_ids(ids, limit, side, keep_first)
    if len(kept) < len(ids):
        text = engine.tokenizer.decode(kept[keep_first:]) if isinstance(item, str) else ""
        prompt = prompts.Prompt(text=text, token_ids=kept)
    return prompt, Truncation(side, limit, len(ids), len(kept))


def _summed(cuts: list[Truncation | None]) -> Truncation | None:
    """One report for a request's prompts: the budget, and the tokens before and kept over all."""
    if not cuts or cuts[0] is None:
        return None
    first = cuts[0]
    return replace(first, prompt_tokens_before=sum(c.prompt_tokens_before for c in cuts), prompt_tokens=sum(c.prompt_tokens for c in cuts))


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
    return render_plan(engine, chat_template, plan_chat(body))


def prepare_detokenize(body: DetokenizeRequest, engine: EngineFacts) -> str:
    """The text of token ids (special tokens included), each id checked against the vocabulary."""
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {engine.vocab_size})", param="tokens")
    return engine.tokenizer.decode(body.tokens)
