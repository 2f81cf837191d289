"""Engine steps → OpenAI response objects and stream chunks (chat and legacy completions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jamba_server.core.outputs import ChoiceDelta, EngineStep, TokenLogprob
from jamba_server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    DeltaMessage,
    ResponseMessage,
    TokenLogprob as ApiTokenLogprob,
    TopLogprob,
    Usage,
)


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


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class _Accumulator:
    def __init__(self, request_id: str, model: str, n: int, want_logprobs: bool):
        self.request_id = request_id
        self.model = model
        self.want_logprobs = want_logprobs
        self.choices = [_ChoiceState() for _ in range(n)]
        self.prompt_tokens = 0

    def add(self, step: EngineStep) -> None:
        self.prompt_tokens = step.prompt_tokens
        for delta in step.choices:
            self.choices[delta.index].add(delta)

    def usage(self) -> Usage:
        completion = sum(len(c.token_ids) for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


class ChatAccumulator(_Accumulator):
    """Collects a whole request's steps into one `ChatCompletion`."""

    def build(self, prompt_token_ids: list[int] | None = None) -> ChatCompletion:
        """`prompt_token_ids` given: token ids go into the response (`return_token_ids`)."""
        with_ids = prompt_token_ids is not None
        return ChatCompletion(
            id=self.request_id,
            model=self.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=ResponseMessage(content="".join(c.text)),
                    logprobs=chat_logprobs(c.logprobs) if self.want_logprobs else None,
                    finish_reason=c.finish_reason,
                    token_ids=c.token_ids if with_ids else None,
                )
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(),
            prompt_token_ids=prompt_token_ids,
        )


class ChatStreamer(_Accumulator):
    """Turns steps into `chat.completion.chunk` objects, as OpenAI streams them."""

    def __init__(self, request_id: str, model: str, n: int, want_logprobs: bool, created: int):
        super().__init__(request_id, model, n, want_logprobs)
        self.created = created

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self) -> ChatCompletionChunk:
        return self._chunk(
            [
                ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(len(self.choices))
            ]
        )

    def step(self, step: EngineStep) -> ChatCompletionChunk | None:
        self.add(step)
        choices = [
            ChatChunkChoice(
                index=d.index,
                delta=DeltaMessage(content=d.text) if d.text else DeltaMessage(),
                logprobs=chat_logprobs(d.logprobs) if self.want_logprobs and d.logprobs else None,
                finish_reason=d.finish_reason,
            )
            for d in step.choices
            if d.text or d.finish_reason is not None or (self.want_logprobs and d.logprobs)
        ]
        return self._chunk(choices) if choices else None

    def usage_chunk(self) -> ChatCompletionChunk:
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


class CompletionAccumulator(_Accumulator):
    """Collects steps into one legacy `text_completion` response."""

    def __init__(self, request_id: str, model: str, n: int, want_logprobs: bool, echo_text: str = ""):
        super().__init__(request_id, model, n, want_logprobs)
        self.echo_text = echo_text

    def build(self, prompt_token_ids: list[int] | None = None) -> Completion:
        with_ids = prompt_token_ids is not None
        return Completion(
            id=self.request_id,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=self.echo_text + "".join(c.text),
                    logprobs=_completion_logprobs(c.logprobs, len(self.echo_text))
                    if self.want_logprobs
                    else None,
                    finish_reason=c.finish_reason,
                    token_ids=c.token_ids if with_ids else None,
                )
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(),
            prompt_token_ids=prompt_token_ids,
        )


class CompletionStreamer(_Accumulator):
    def __init__(self, request_id: str, model: str, n: int, want_logprobs: bool, created: int):
        super().__init__(request_id, model, n, want_logprobs)
        self.created = created
        self._offsets = [0] * n

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def echo(self, text: str) -> Completion:
        self._offsets = [len(text)] * len(self._offsets)
        return self._chunk([CompletionChoice(index=i, text=text) for i in range(len(self.choices))])

    def step(self, step: EngineStep) -> Completion | None:
        self.add(step)
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
        return self._chunk(choices) if choices else None

    def usage_chunk(self) -> Completion:
        return self._chunk([], usage=self.usage())
