"""OpenAI's Responses API over the chat pipeline: `prepare_responses` and its renderers.

A Responses request becomes the chat request it means (`to_chat_request`): `instructions` a system
message, a stored conversation (`previous_response_id`) before this input, `function_call` items an
assistant turn's tool calls, `function_call_output` items tool messages; then the same template, trust
boundary, limits and grammar path as `/v1/chat/completions`. Engine steps become output items through
one builder (`_Items`), fed step by step for both the response object and its typed stream events,
so the client's stream helpers assemble the same response as the non-streaming call.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from jamba_server.core.chat_translation import chat_request, in_terms_of
from jamba_server.core.outputs import EngineStep
from jamba_server.core.parsing import Citation, ParseDelta, ParserConfig
from jamba_server.core.prepare import EngineFacts, GenerationJob, Renderers, chat_job, chat_parts
from jamba_server.core.responses import ChatAccumulatorBase
from jamba_server.errors import APIError, NotFoundError
from jamba_server.protocol import ChatCompletionRequest
from jamba_server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolChoice,
    IncompleteDetails,
    MessageItem,
    ResponseError,
    ResponseObject,
    ResponsesFeatures,
    ResponsesRequest,
    ResponsesUsage,
)
from jamba_server.settings import Settings

RENAMES = (
    (re.compile(r"^tools\[(\d+)\]\.function\.(\w+)"), r"tools[\1].\2"),
    (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"^response_format.*"), "text.format"),
    (re.compile(r"^(max_tokens|max_completion_tokens)$"), "max_output_tokens"),
    (re.compile(r"^truncate_prompt_tokens$"), "truncation"),
    (re.compile(r"^tool_choice.*"), "tool_choice"),
    (re.compile(r"^messages.*"), "input"),  # about the conversation as a whole (a message's own param is its origin)
)


CITED_FILE_PREFIX = "document-"  # a citation's file_id: `document-2` is the request's documents[2]


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------ request


@dataclass(frozen=True)
class Translation:
    chat: ChatCompletionRequest
    origins: list[str]  # per chat message, the param it came from
    conversation: list[dict[str, Any]]  # history + this input as chat messages (what a stored response keeps)


def _input_messages(body: ResponsesFeatures) -> list[tuple[dict[str, Any], str]]:
    if isinstance(body.input, str):
        return [({"role": "user", "content": body.input}, "input")]
    out: list[tuple[dict[str, Any], str]] = []
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if isinstance(item, MessageItem):
            message = {"role": item.role, "content": item.text()}
            if item.role == "assistant" and item.cited_documents():
                message["citations"] = item.cited_documents()
            out.append((message, where))
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            previous = out[-1][0] if out else None
            if previous is not None and previous["role"] == "assistant":
                previous.setdefault("tool_calls", []).append(call)
            else:
                out.append(({"role": "assistant", "content": None, "tool_calls": [call]}, where))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(({"role": "tool", "tool_call_id": item.call_id, "content": item.text()}, where))
    return out


def _chat_fields(body: ResponsesFeatures) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": body.model}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in body.tools
        ]
    if body.tool_choice is not None:
        choice = body.tool_choice
        fields["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}} if isinstance(choice, FunctionToolChoice) else choice
        )
    if body.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    fmt = body.text.format if body.text is not None else None
    forced_call = body.tool_choice == "required" or isinstance(body.tool_choice, FunctionToolChoice)
    # text.format shapes text output; a turn that must call a tool has none (chat would refuse the pair).
    if fmt is not None and fmt.type != "text" and not forced_call:
        fields["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            fields["response_format"]["json_schema"] = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
    if body.documents is not None:
        fields["documents"] = [d.model_dump(exclude_none=True) for d in body.documents]
    if body.citation_mode is not None:
        fields["citation_mode"] = body.citation_mode
    if isinstance(body, ResponsesRequest):
        sampling = {"max_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p, "user": body.user}
        fields.update((k, v) for k, v in sampling.items() if v is not None)
        if body.truncation == "auto":
            fields["truncate_prompt_tokens"] = -1  # the longest prompt that leaves max_output_tokens room
    return fields


def to_chat_request(body: ResponsesFeatures, history: Sequence[dict[str, Any]]) -> Translation:
    """The chat request a Responses request means, after the stored `history` (chat messages)."""
    turns = [(dict(m), "previous_response_id") for m in history] + _input_messages(body)
    conversation = [m for m, _ in turns]
    if body.instructions:
        turns.insert(0, ({"role": "system", "content": body.instructions}, "instructions"))
    messages, origins = [m for m, _ in turns], [o for _, o in turns]
    chat = chat_request({**_chat_fields(body), "messages": messages}, origins, RENAMES)
    return Translation(chat, origins, conversation)


def in_responses_terms(error: APIError, origins: list[str]) -> APIError:
    return in_terms_of(error, origins, RENAMES)


# ------------------------------------------------------------------ response


class _Items:
    """Output items as parsed output arrives: a message item stays open while text continues; each
    tool call is a `function_call` item; citations become file-citation annotations on the open
    message (or a new, empty one). With `event`, also the typed stream events building them."""

    def __init__(self, titles: tuple[str | None, ...], event: Callable[..., str] | None):
        self.items: list[dict[str, Any]] = []
        self._titles = titles
        self._event = event
        self._message: dict[str, Any] | None = None  # the open message item

    def add(self, parsed: ParseDelta) -> list[str]:
        events: list[str] = []
        if parsed.content:
            events += self._open_message()
            part = self._message["content"][0]
            part["parts"].append(parsed.content)
            if self._event:
                events.append(self._event("response.output_text.delta", **self._where(), delta=parsed.content, logprobs=[]))
        for call in parsed.tool_calls:
            events += self.close("completed")
            events += self._function_call(call.id, call.name, call.arguments)
        for citation in parsed.citations or ():
            events += self._open_message()
            events += self._annotate(citation)
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._message["id"], "output_index": len(self.items) - 1, "content_index": 0}

    def _open_message(self) -> list[str]:
        if self._message is not None:
            return []
        self._message = {"type": "message", "id": _item_id("msg"), "status": "in_progress", "role": "assistant",
                         "content": [{"type": "output_text", "parts": [], "annotations": [], "logprobs": []}]}  # fmt: skip
        self.items.append(self._message)
        if not self._event:
            return []
        added = {**self._message, "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.output_item.added", output_index=len(self.items) - 1, item=added),
            self._event("response.content_part.added", **self._where(), part=part),
        ]

    def _annotate(self, citation: Citation) -> list[str]:
        part = self._message["content"][0]
        title = citation.title or f"document {citation.document_id}"
        file_id = f"{CITED_FILE_PREFIX}{citation.document_id}"
        if any(a["file_id"] == file_id for a in part["annotations"]):
            return []  # a document is cited once per message
        annotation = {"type": "file_citation", "file_id": file_id, "filename": title, "index": sum(len(p) for p in part["parts"])}
        part["annotations"].append(annotation)
        if not self._event:
            return []
        index = len(part["annotations"]) - 1
        return [self._event("response.output_text.annotation.added", **self._where(), annotation_index=index, annotation=annotation)]

    def _function_call(self, call_id: str, name: str, arguments: str) -> list[str]:
        item = {"type": "function_call", "id": _item_id("fc"), "call_id": call_id, "name": name, "arguments": arguments, "status": "completed"}
        self.items.append(item)
        if not self._event:
            return []
        index = len(self.items) - 1
        return [
            self._event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}),
            self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=arguments),
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=arguments, name=name),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def close(self, status: str) -> list[str]:
        """End the open message item with `status` (`completed`, or `incomplete` when cut short)."""
        message, self._message = self._message, None
        if message is None:
            return []
        message["status"] = status
        if not self._event:
            return []
        index = self.items.index(message)
        part = _part(message["content"][0])
        where = {"item_id": message["id"], "output_index": index, "content_index": 0}
        return [
            self._event("response.output_text.done", **where, text=part["text"], logprobs=[]),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=index, item=_item(message)),
        ]

    def output(self) -> list[dict[str, Any]]:
        return [_item(item) for item in self.items]

    def assistant_turn(self) -> dict[str, Any]:
        """The output as the chat message a later turn's history holds."""
        messages = [i for i in self.items if i["type"] == "message"]
        text = "".join(_part(i["content"][0])["text"] for i in messages)
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]  # fmt: skip
        turn: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            turn["tool_calls"] = calls
        cited = [int(a["file_id"].removeprefix(CITED_FILE_PREFIX)) for i in messages for a in i["content"][0]["annotations"]]
        if cited:
            turn["citations"] = list(dict.fromkeys(cited))
        return turn


def _part(part: dict[str, Any]) -> dict[str, Any]:
    return {"type": "output_text", "text": "".join(part["parts"]), "annotations": list(part["annotations"]), "logprobs": []}


def _item(item: dict[str, Any]) -> dict[str, Any]:
    if item["type"] != "message":
        return dict(item)
    return {**item, "content": [_part(p) for p in item["content"]]}


@dataclass(frozen=True)
class ResponseShape:
    """What the response object echoes from the request, and where a finished one goes."""

    echo: dict[str, Any]  # instructions, tools, tool_choice, text, temperature, ... as the request gave them
    created_at: int
    on_done: Callable[[ResponseObject, dict[str, Any]], None]  # (response, assistant turn): the store


class ResponsesAccumulator(ChatAccumulatorBase):
    """Collects a request's steps into one `response` object."""

    def __init__(self, request_id: str, model: str, parser: ParserConfig, shape: ResponseShape, event: Callable[..., str] | None = None):
        super().__init__(request_id, model, 1, False, parser)
        self.shape = shape
        self.items = _Items(parser.document_titles or (), event)

    def add(self, step: EngineStep) -> list[str]:  # type: ignore[override]
        super().add(step)
        events: list[str] = []
        for delta in step.choices:
            events += self.items.add(self.parse(delta))
            if delta.finish_reason is not None:
                events += self.items.close("incomplete" if delta.finish_reason == "length" else "completed")
        return events

    def response(self, status: str, error: ResponseError | None = None) -> ResponseObject:
        usage = self.usage()
        incomplete = IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
        return ResponseObject(
            id=self.request_id, created_at=self.shape.created_at, status=status, error=error, incomplete_details=incomplete,
            model=self.model, output=self.items.output(),
            usage=ResponsesUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens),
            **self.shape.echo,
        )  # fmt: skip

    def _final_status(self) -> str:
        return "incomplete" if self.choices[0].finish_reason == "length" else "completed"

    def build(self, prompt_token_ids: list[int] | None = None) -> ResponseObject:
        response = self.response(self._final_status())
        self.shape.on_done(response, self.items.assistant_turn())
        return response


class ResponsesStreamer(ResponsesAccumulator):
    """Turns steps into the Responses API's typed stream events, each with its `sequence_number`."""

    def __init__(self, request_id: str, model: str, parser: ParserConfig, shape: ResponseShape):
        super().__init__(request_id, model, parser, shape, event=self._event)
        self._sequence = 0

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}"

    def _lifecycle(self, kind: str, response: ResponseObject) -> str:
        return self._event(kind, response=response.model_dump(mode="json"))

    def opening(self) -> list[str]:
        started = self.response("in_progress").model_copy(update={"usage": None})
        return [self._lifecycle("response.created", started), self._lifecycle("response.in_progress", started)]

    def step(self, step: EngineStep) -> list[str]:
        return self.add(step)

    def closing(self) -> list[str]:
        status = self._final_status()
        response = self.response(status)
        self.shape.on_done(response, self.items.assistant_turn())
        return [self._lifecycle("response.completed" if status == "completed" else "response.incomplete", response)]

    def failed(self, error: APIError) -> list[str]:
        """The stream's end when the engine fails after the first event."""
        events = self.items.close("incomplete")
        failed = self.response("failed", ResponseError(code="server_error", message=error.message))
        return events + [self._lifecycle("response.failed", failed)]


# ------------------------------------------------------------------ prepare


@dataclass(frozen=True)
class StoredResponse:
    """Kept as encoded JSON: compact, and its size is what the store counts."""

    response: bytes  # the response object as returned
    conversation: bytes  # chat messages: the input history and the output turn

    @property
    def size(self) -> int:
        return len(self.response) + len(self.conversation)


class Store(Protocol):
    """The stored responses (runtime/response_store.py), as preparing a request uses them."""

    def get(self, response_id: str) -> StoredResponse | None: ...

    def put(self, response_id: str, value: StoredResponse) -> None: ...


def _history(body: ResponsesRequest, store: Store) -> tuple[dict[str, Any], ...]:
    if body.previous_response_id is None:
        return ()
    stored = store.get(body.previous_response_id)
    if stored is None:
        raise NotFoundError(
            f"Previous response `{body.previous_response_id}` was not found (never stored, expired or evicted).",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return tuple(json.loads(stored.conversation))


def _echo(body: ResponsesRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    choice = body.tool_choice
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": choice.model_dump() if isinstance(choice, FunctionToolChoice) else (choice or "auto"),
        "tools": [t.model_dump() for t in body.tools or ()],
        "user": body.user,
        "metadata": body.metadata or {},
        "truncation": body.truncation or "disabled",
    }


def _saver(body: ResponsesRequest, store: Store, conversation: list[dict[str, Any]]) -> Callable[[ResponseObject, dict[str, Any]], None]:
    def save(response: ResponseObject, turn: dict[str, Any]) -> None:
        if not body.store:
            return
        encoded = json.dumps([*conversation, turn], ensure_ascii=False, separators=(",", ":")).encode()
        store.put(response.id, StoredResponse(response.model_dump_json().encode(), encoded))

    return save


def prepare_responses(body: ResponsesRequest, engine: EngineFacts, settings: Settings, chat_template: str, store: Store) -> GenerationJob:
    """The chat request the Responses request means (after its stored conversation), through every
    chat check; errors name the Responses request's own params."""
    translation = to_chat_request(body, _history(body, store))
    try:
        parts = chat_parts(translation.chat, engine, settings, chat_template)
    except APIError as exc:
        raise in_responses_terms(exc, translation.origins) from None
    parser = parts.plan.parser
    shape = ResponseShape(_echo(body), int(time.time()), _saver(body, store, translation.conversation))
    renderers = Renderers(
        streamer=lambda rid, model: ResponsesStreamer(rid, model, parser, shape),
        accumulator=lambda rid, model: ResponsesAccumulator(rid, model, parser, shape),
        opening=lambda streamer: streamer.opening(),
        closing=lambda streamer: streamer.closing(),
        protocol="responses",
        failed=lambda streamer, error: streamer.failed(error),
    )
    return chat_job(parts, renderers, stream=body.stream, endpoint="responses", id_prefix="resp", id_separator="_")
