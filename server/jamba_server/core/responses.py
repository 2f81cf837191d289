"""Engine steps → OpenAI response objects and stream chunks (chat and legacy completions); the
Anthropic renderers (core/anthropic.py) build on `ChatAccumulatorBase`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

from jamba_server.core.outputs import ChoiceDelta, EngineStep, PromptLogprobs, TokenLogprob
from jamba_server.core.parsing import (
    Citation,
    OutputParser,
    ParseDelta,
    ParsedToolCall,
    ParserConfig,
    new_tool_call_id,
)
from jamba_server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    CitationRef,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    PromptTruncation,
    PromptLogprob,
    PromptLogprobList,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    TokenLogprob as ApiTokenLogprob,
    TopLogprob,
    Usage,
)


_SLOT = "__text_slot__"


class _TextChunks:
    """JSON of the common stream chunk — one choice carrying only new text — without building
    models per token: the model's own serialization with the text spliced in (same bytes)."""

    def __init__(self, render: Callable[[int, str], str], cache: bool = True):
        self._render = render
        self._cache = cache  # off when chunks differ in more than their text (continuous usage)
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        if not self._cache:
            return self._render(index, text)
        parts = self._parts.get(index)
        if parts is None:
            template = self._render(index, _SLOT)
            if template.count(json.dumps(_SLOT)) != 1:  # e.g. a model named like the slot
                return self._render(index, text)
            head, _, tail = template.partition(json.dumps(_SLOT))
            parts = self._parts[index] = (head, tail)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            ApiTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=_token_bytes(e.token),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=_token_bytes(t)) for t, lp in e.top
                ],
            )
            for e in entries
        ]
    )


def prompt_logprob_list(positions: PromptLogprobs | None) -> PromptLogprobList | None:
    """vLLM's response shape: None for the first token, then token id → logprob, rank, decoded token."""
    if positions is None:
        return None
    return [
        None
        if position is None
        else {c.token_id: PromptLogprob(logprob=c.logprob, rank=c.rank, decoded_token=c.decoded_token) for c in position}
        for position in positions
    ]


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_sequence = delta.stop_sequence


class _Accumulator:
    prompt_truncation: PromptTruncation | None = None  # set by the job when the request truncates

    def __init__(self, request_id: str, model: str, n: int, want_logprobs: bool, prompt_tokens: int = 0):
        self.request_id = request_id
        self.model = model
        self.want_logprobs = want_logprobs
        self.choices = [_ChoiceState() for _ in range(n)]
        self.prompt_tokens = prompt_tokens
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}  # by prompt (a completions request may have several)

    def add(self, step: EngineStep) -> None:
        self.prompt_tokens = step.prompt_tokens
        if step.prompt_logprobs is not None:
            self.prompt_logprobs[step.prompt_index] = step.prompt_logprobs
        for delta in step.choices:
            self.choices[delta.index].add(delta)

    def outcomes(self) -> list[tuple[str | None, str]]:
        """(finish reason as the API reports it, raw output text) per choice."""
        return [(c.finish_reason, "".join(c.text)) for c in self.choices]

    def usage(self) -> Usage:
        completion = sum(len(c.token_ids) for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


def _finish_reason(engine_reason: str | None, tool_calls: int) -> str | None:
    if engine_reason == "stop" and tool_calls:
        return "tool_calls"
    return engine_reason


def _citation_refs(citations: list[Citation] | None) -> list[CitationRef] | None:
    if citations is None:
        return None
    return [CitationRef(document_id=c.document_id, title=c.title) for c in citations]


def _tool_calls(calls: list[ParsedToolCall]) -> list[ResponseToolCall] | None:
    if not calls:
        return None
    return [
        ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
        for c in calls
    ]


class ChatAccumulatorBase(_Accumulator):
    """Steps, and an output parser per choice (what every chat-shaped protocol renders from)."""

    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        want_logprobs: bool,
        parser: ParserConfig = ParserConfig(),
        id_factory: Callable[[], str] = new_tool_call_id,
    ):
        super().__init__(request_id, model, n, want_logprobs)
        self.parsers = [OutputParser(parser, id_factory) for _ in range(n)]

    def parse(self, delta: ChoiceDelta) -> ParseDelta:
        """The choice's new output, parsed (its parser finished once the choice is)."""
        parser = self.parsers[delta.index]
        parsed = parser.feed(delta.text)
        if delta.finish_reason is not None:
            parsed.extend(parser.finish())
        return parsed

    def outcomes(self) -> list[tuple[str | None, str]]:
        return [
            (_finish_reason(c.finish_reason, p.tool_calls_returned), "".join(c.text))
            for c, p in zip(self.choices, self.parsers)
        ]


class ChatAccumulator(ChatAccumulatorBase):
    """Collects a whole request's steps into one `ChatCompletion`; `echo_text` (chat `echo`) starts
    every choice's content."""

    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        want_logprobs: bool,
        parser: ParserConfig = ParserConfig(),
        echo_text: str = "",
    ):
        super().__init__(request_id, model, n, want_logprobs, parser)
        self.echo_text = echo_text

    def build(self, prompt_token_ids: list[int] | None = None) -> ChatCompletion:
        """`prompt_token_ids` given: token ids go into the response (`return_token_ids`)."""
        with_ids = prompt_token_ids is not None
        choices = []
        for i, (state, parser) in enumerate(zip(self.choices, self.parsers)):
            parsed = parser.feed("".join(state.text))
            parsed.extend(parser.finish())
            content = parsed.content if parsed.content or not parsed.tool_calls else None
            if self.echo_text:
                content = self.echo_text + (content or "")
            choices.append(
                ChatChoice(
                    index=i,
                    message=ResponseMessage(
                        content=content,
                        tool_calls=_tool_calls(parsed.tool_calls),
                        citations=_citation_refs(parsed.citations),
                    ),
                    logprobs=chat_logprobs(state.logprobs) if self.want_logprobs else None,
                    finish_reason=_finish_reason(state.finish_reason, len(parsed.tool_calls)),
                    token_ids=state.token_ids if with_ids else None,
                )
            )
        return ChatCompletion(
            id=self.request_id,
            model=self.model,
            choices=choices,
            usage=self.usage(),
            prompt_token_ids=prompt_token_ids,
            prompt_truncation=self.prompt_truncation,
            prompt_logprobs=prompt_logprob_list(self.prompt_logprobs.get(0)),
        )


class ChatStreamer(ChatAccumulatorBase):
    """Turns steps into `chat.completion.chunk` objects, as OpenAI streams them."""

    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        want_logprobs: bool,
        created: int,
        parser: ParserConfig = ParserConfig(),
        continuous_usage: bool = False,
        prompt_tokens: int = 0,
    ):
        """`continuous_usage`: every chunk carries the usage so far (vLLM's `continuous_usage_stats`)."""
        super().__init__(request_id, model, n, want_logprobs, parser)
        self.created = created
        self.continuous_usage = continuous_usage
        self.prompt_tokens = prompt_tokens
        self._pending_citations: list[list[Citation] | None] = [None] * n
        self._content_chunk = _TextChunks(
            lambda i, text: self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=text))]),
            cache=not continuous_usage,
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None, opening: bool = False) -> str:
        if usage is None and self.continuous_usage:
            usage = self.usage()
        return ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            prompt_truncation=self.prompt_truncation if opening else None,
        ).model_dump_json()

    def opening(self) -> str:
        """The first chunk: each choice's role, and what truncation cut (`prompt_truncation`)."""
        roles = [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(len(self.choices))]
        return self._chunk(roles, opening=True)

    def echo(self, text: str) -> list[str]:
        """Chat `echo`: the echoed text as each choice's first content chunk (after the role's), as
        vLLM streams it."""
        return [self._content_chunk(i, text) for i in range(len(self.choices))]

    def step(self, step: EngineStep) -> list[str]:
        """The step's chunks, serialized."""
        self.add(step)
        chunks = []
        for d in step.choices:
            parser = self.parsers[d.index]
            parsed = parser.feed(d.text)
            if (
                d.finish_reason is None
                and not (self.want_logprobs and d.logprobs)
                and not parsed.tool_calls
                and parsed.citations is None
            ):
                if parsed.content:
                    chunks.append(self._content_chunk(d.index, parsed.content))
                continue
            # Citations go out with the choice's final chunk only.
            if parsed.citations is not None:
                self._pending_citations[d.index] = (self._pending_citations[d.index] or []) + parsed.citations
                parsed.citations = None
            if d.finish_reason is not None:
                parsed.extend(parser.finish())
                if self._pending_citations[d.index] is not None:
                    parsed.citations = self._pending_citations[d.index] + (parsed.citations or [])
            deltas = self._deltas(parsed, parser.tool_calls_returned - len(parsed.tool_calls))
            logprobs = chat_logprobs(d.logprobs) if self.want_logprobs and d.logprobs else None
            if d.finish_reason is not None or logprobs is not None:
                deltas = deltas or [DeltaMessage()]
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                chunks.append(
                    self._chunk(
                        [
                            ChatChunkChoice(
                                index=d.index,
                                delta=delta,
                                logprobs=logprobs if k == 0 else None,
                                finish_reason=_finish_reason(d.finish_reason, parser.tool_calls_returned)
                                if last
                                else None,
                            )
                        ]
                    )
                )
        return chunks

    @staticmethod
    def _deltas(parsed: ParseDelta, first_index: int) -> list[DeltaMessage]:
        """Content, then per tool call a header delta (id, name) and an arguments delta."""
        deltas = []
        if parsed.content:
            deltas.append(DeltaMessage(content=parsed.content))
        for offset, call in enumerate(parsed.tool_calls):
            index = first_index + offset
            deltas.append(
                DeltaMessage(
                    tool_calls=[
                        DeltaToolCall(
                            index=index,
                            id=call.id,
                            type="function",
                            function=DeltaFunctionCall(name=call.name, arguments=""),
                        )
                    ]
                )
            )
            deltas.append(
                DeltaMessage(
                    tool_calls=[DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=call.arguments))]
                )
            )
        if parsed.citations is not None:
            refs = _citation_refs(parsed.citations)
            if deltas:
                deltas[-1] = deltas[-1].model_copy(update={"citations": refs})
            else:
                deltas.append(DeltaMessage(citations=refs))
        return deltas

    def usage_chunk(self) -> str:
        return self._chunk([], usage=self.usage())


def _completion_logprobs(entries: list[TokenLogprob], start_offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    offset = start_offset
    for e in entries:
        result.tokens.append(e.token)
        result.token_logprobs.append(e.logprob)
        result.top_logprobs.append(dict(e.top))
        result.text_offset.append(offset)
        offset += len(e.token)
    return result


def per_choice(texts: str | Sequence[str], choices: int) -> list[str]:
    """One echo text for every choice, or each choice's own (a multi-prompt request's)."""
    return [texts] * choices if isinstance(texts, str) else list(texts)


class CompletionAccumulator(_Accumulator):
    """Collects steps into one legacy `text_completion` response. A multi-prompt request's choices
    are `n` per prompt, in prompt order; `prompts` holds each prompt's token ids."""

    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        want_logprobs: bool,
        echo_text: str | Sequence[str] = "",
        prompts: Sequence[list[int]] = (),
    ):
        super().__init__(request_id, model, n, want_logprobs)
        self.echo_texts = per_choice(echo_text, n)
        self.prompts = list(prompts)
        self.n_per_prompt = n // max(1, len(self.prompts))

    def build(self, prompt_token_ids: list[int] | None = None) -> Completion:
        """`prompt_token_ids` given (`return_token_ids`): token ids go into the response, each
        choice's prompt's on the choice (vLLM's shape) and, for one prompt, on the response too."""
        with_ids = prompt_token_ids is not None
        choices = []
        for i, c in enumerate(self.choices):
            prompt_index = i // self.n_per_prompt
            echo = self.echo_texts[i]
            choices.append(
                CompletionChoice(
                    index=i,
                    text=echo + "".join(c.text),
                    logprobs=_completion_logprobs(c.logprobs, len(echo)) if self.want_logprobs else None,
                    finish_reason=c.finish_reason,
                    token_ids=c.token_ids if with_ids else None,
                    prompt_logprobs=prompt_logprob_list(self.prompt_logprobs.get(prompt_index)),
                    prompt_token_ids=self.prompts[prompt_index] if with_ids and self.prompts else None,
                )
            )
        single = len(self.prompts) <= 1
        return Completion(
            id=self.request_id,
            model=self.model,
            choices=choices,
            usage=self.usage(),
            prompt_token_ids=prompt_token_ids if single else None,
            prompt_truncation=self.prompt_truncation,
        )


class CompletionStreamer(_Accumulator):
    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        want_logprobs: bool,
        created: int,
        continuous_usage: bool = False,
        prompt_tokens: int = 0,
    ):
        super().__init__(request_id, model, n, want_logprobs, prompt_tokens)
        self.created = created
        self.continuous_usage = continuous_usage
        self._offsets = [0] * n
        self._first = True  # the first chunk carries `prompt_truncation`
        self._text_chunk = _TextChunks(
            lambda i, text: self._chunk([CompletionChoice(index=i, text=text)], first=False), cache=not continuous_usage
        )

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None, first: bool | None = None) -> str:
        first, self._first = (self._first if first is None else first), False
        if usage is None and self.continuous_usage:
            usage = self.usage()
        return Completion(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            prompt_truncation=self.prompt_truncation if first else None,
        ).model_dump_json()

    def echo(self, text: str | Sequence[str]) -> str:
        """The prompt(s) echoed: one text for every choice, or each choice's own."""
        texts = per_choice(text, len(self.choices))
        self._offsets = [len(t) for t in texts]
        return self._chunk([CompletionChoice(index=i, text=t) for i, t in enumerate(texts)])

    def step(self, step: EngineStep) -> list[str]:
        """The step's chunk (all its choices in one), serialized."""
        self.add(step)
        if len(step.choices) == 1 and not self.want_logprobs and not (self._first and self.prompt_truncation):
            d = step.choices[0]
            if d.finish_reason is None:
                self._offsets[d.index] += len(d.text)
                return [self._text_chunk(d.index, d.text)] if d.text else []
        choices = []
        for d in step.choices:
            if not (d.text or d.finish_reason is not None or d.logprobs):
                continue
            logprobs = None
            if self.want_logprobs:
                logprobs = _completion_logprobs(list(d.logprobs or ()), self._offsets[d.index])
            self._offsets[d.index] += len(d.text)
            choices.append(
                CompletionChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)
            )
        return [self._chunk(choices)] if choices else []

    def usage_chunk(self) -> str:
        return self._chunk([], usage=self.usage())
