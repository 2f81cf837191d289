"""Anthropic's Messages API over the chat pipeline: `prepare_messages` and its renderers.

A Messages request becomes the chat request it means (`to_chat_request`): the same template, trust
boundary, limits, feature plan and grammar path as `/v1/chat/completions`. Engine steps become
Anthropic's message object or its stream events through one block builder (`_Blocks`), fed step by
step in both cases, so a stream assembled by the client equals the non-streamed message.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from jamba_server.anthropic_protocol import (
    CountTokensRequest,
    DocumentCitation,
    MessageParam,
    MessagesFeatures,
    MessagesRequest,
    MessagesResponse,
    MessagesUsage,
    TextBlock,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
)
from jamba_server.core.chat_translation import chat_request, in_terms_of
from jamba_server.core.features import plan_chat
from jamba_server.core.limits import check_chat_input_limits
from jamba_server.core.outputs import EngineStep
from jamba_server.core.parsing import Citation, ParseDelta, ParserConfig
from jamba_server.core.prepare import EngineFacts, GenerationJob, Renderers, chat_job, chat_parts, render_plan
from jamba_server.core.prompt import Prompt
from jamba_server.core.responses import ChatAccumulatorBase
from jamba_server.errors import APIError, InvalidRequestError
from jamba_server.protocol import ChatCompletionRequest
from jamba_server.settings import Settings

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_use_id() -> str:
    return "toolu_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# ------------------------------------------------------------------ request


def _user_messages(index: int, message: MessageParam) -> list[tuple[dict[str, Any], str]]:
    """A user turn: each tool_result a `tool` message, runs of text a `user` message, in order."""
    if isinstance(message.content, str):
        return [({"role": "user", "content": message.content}, f"messages[{index}]")]
    out: list[tuple[dict[str, Any], str]] = []
    texts: list[str] = []
    for j, block in enumerate(message.content):
        where = f"messages[{index}].content[{j}]"
        if isinstance(block, ToolUseBlockParam):
            raise InvalidRequestError("tool_use blocks belong in assistant messages", param=where)
        if isinstance(block, ToolResultBlockParam):
            if texts:
                out.append(({"role": "user", "content": "\n".join(texts)}, f"messages[{index}]"))
                texts = []
            out.append(({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}, where))
        else:
            texts.append(block.text)
    if texts:
        out.append(({"role": "user", "content": "\n".join(texts)}, f"messages[{index}]"))
    return out


def _assistant_message(index: int, message: MessageParam) -> tuple[dict[str, Any], str]:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}, f"messages[{index}]"
    texts, calls, cited = [], [], []
    for j, block in enumerate(message.content):
        if isinstance(block, ToolResultBlockParam):
            raise InvalidRequestError("tool_result blocks belong in user messages", param=f"messages[{index}].content[{j}]")
        if isinstance(block, ToolUseBlockParam):
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}})
        else:
            texts.append(block.text)
            cited += [c["document_index"] for c in block.citations or () if isinstance(c.get("document_index"), int)]
    chat: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
    if calls:
        chat["tool_calls"] = calls
    if cited:
        chat["citations"] = list(dict.fromkeys(cited))
    return chat, f"messages[{index}]"


def _conversation(body: MessagesFeatures) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Chat messages, for each the Anthropic param it came from, and whether the reply continues the
    final message (Anthropic's prefill: a final assistant message with text)."""
    messages: list[tuple[dict[str, Any], str]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "\n".join(b.text for b in body.system)
        messages.append(({"role": "system", "content": system}, "system"))
    for i, message in enumerate(body.messages):
        if message.role == "user":
            messages.extend(_user_messages(i, message))
        else:
            messages.append(_assistant_message(i, message))
    prefill = body.messages[-1].role == "assistant"
    if prefill:
        final = messages[-1][0]
        text = final.get("content") or ""
        if not text and "tool_calls" not in final:
            messages.pop()  # an empty final assistant message prefills nothing: a new turn, as usual
            prefill = False
        elif text != text.rstrip():
            raise InvalidRequestError("final assistant content cannot end with trailing whitespace", param="messages")
    return [m for m, _ in messages], [origin for _, origin in messages], prefill


def _tool_choice(body: MessagesFeatures) -> dict[str, Any]:
    choice = body.tool_choice
    if choice is None:
        return {}
    fields: dict[str, Any] = {
        "tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)
        or {"type": "function", "function": {"name": choice.name}}
    }
    if choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    return fields


def _chat_fields(body: MessagesFeatures) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": body.model, **_tool_choice(body)}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": {"name": t.name, "parameters": t.input_schema}
             | ({"description": t.description} if t.description is not None else {})
             | ({"strict": t.strict} if t.strict is not None else {})}
            for t in body.tools
        ]  # fmt: skip
    forced_call = body.tool_choice is not None and body.tool_choice.type in ("any", "tool")
    # The format shapes text output; a turn that must call a tool has none (chat would refuse the pair).
    if body.output_config is not None and body.output_config.format is not None and not forced_call:
        schema = body.output_config.format.schema_
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    if body.documents is not None:
        fields["documents"] = [d.model_dump(exclude_none=True) for d in body.documents]
    if body.citation_mode is not None:
        fields["citation_mode"] = body.citation_mode
    if isinstance(body, MessagesRequest):
        sampling = {"max_tokens": body.max_tokens, "stop": body.stop_sequences or None, "temperature": body.temperature,
                    "top_p": body.top_p, "top_k": body.top_k}  # fmt: skip
        fields.update((k, v) for k, v in sampling.items() if v is not None)
    return fields


def to_chat_request(body: MessagesFeatures) -> tuple[ChatCompletionRequest, list[str]]:
    """The chat request a Messages request means, and for each chat message the Anthropic param it
    came from (to name it in errors)."""
    messages, origins, prefill = _conversation(body)
    fields = {**_chat_fields(body), "messages": messages}
    if prefill:
        fields |= {"continue_final_message": True, "add_generation_prompt": False}
    return chat_request(fields, origins, RENAMES), origins


RENAMES = (
    (re.compile(r"^tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
    (re.compile(r"^tools\[(\d+)\]\.function\.(\w+)"), r"tools[\1].\2"),
    (re.compile(r"^response_format(\.json_schema\.schema)?"), "output_config.format.schema"),
    (re.compile(r"^stop$"), "stop_sequences"),
    (re.compile(r"^max_completion_tokens$"), "max_tokens"),
    (re.compile(r"^tool_choice.*"), "tool_choice"),
)


def in_anthropic_terms(error: APIError, origins: list[str]) -> APIError:
    """`error`, raised about the chat request, renamed to the Messages request's params."""
    return in_terms_of(error, origins, RENAMES)


# ------------------------------------------------------------------ response


# Jamba cites whole documents: the location is all of it, the quote its beginning (a citation must not
# copy a long document into every response that cites it).
CITED_TEXT_CHARS = 1000


def _event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}"


class _Blocks:
    """Content blocks as parsed output arrives: a text block stays open while text continues; each
    tool call is a block of its own; citations join the open text block (or a new, empty one).
    With `emit`, also the stream events that build the same blocks on the client."""

    def __init__(self, documents: list[dict[str, Any]] | None, emit: bool):
        self.blocks: list[dict[str, Any]] = []
        self._documents = documents or []
        self._emit = emit
        self._text_open = False

    def add(self, parsed: ParseDelta) -> list[str]:
        events: list[str] = []
        if parsed.content:
            events += self._open_text()
            self.blocks[-1]["parts"].append(parsed.content)
            if self._emit:
                events.append(_text_delta(len(self.blocks) - 1, parsed.content))
        for call in parsed.tool_calls:
            events += self.close()
            self.blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)})
            if self._emit:
                index = len(self.blocks) - 1
                start = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
                events.append(_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
                delta = {"type": "input_json_delta", "partial_json": call.arguments}
                events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
                events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        for citation in parsed.citations or ():
            events += self._open_text()
            cited = self._citation(citation)
            if cited in self.blocks[-1].setdefault("citations", []):
                continue  # a document is cited once per text block
            self.blocks[-1]["citations"].append(cited)
            if self._emit:
                delta = {"type": "citations_delta", "citation": cited.model_dump()}
                events.append(_event("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}))
        return events

    def _open_text(self) -> list[str]:
        if self._text_open:
            return []
        self._text_open = True
        self.blocks.append({"type": "text", "parts": []})
        if not self._emit:
            return []
        start = {"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": {"type": "text", "text": ""}}
        return [_event("content_block_start", start)]

    def close(self) -> list[str]:
        """End the open text block, if any."""
        if not self._text_open:
            return []
        self._text_open = False
        return [_event("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})] if self._emit else []

    def _citation(self, citation: Citation) -> DocumentCitation:
        text = self._documents[citation.document_id]["text"]
        quoted = text if len(text) <= CITED_TEXT_CHARS else text[:CITED_TEXT_CHARS] + "…"
        return DocumentCitation(
            cited_text=quoted, document_index=citation.document_id, document_title=citation.title, end_char_index=len(text)
        )

    def content(self) -> list[TextBlock | ToolUseBlock]:
        return [
            TextBlock(text="".join(b["parts"]), citations=b.get("citations"))
            if b["type"] == "text"
            else ToolUseBlock(id=b["id"], name=b["name"], input=b["input"])
            for b in self.blocks
        ]


def _text_delta(index: int, text: str) -> str:
    """The common event, built without a dict per token (the same bytes `_event` makes)."""
    return (
        'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":%s}}'
        % (index, json.dumps(text, ensure_ascii=False))
    )


class MessagesAccumulator(ChatAccumulatorBase):
    """Collects a request's steps into one Anthropic `message`."""

    _emit = False

    def __init__(self, request_id: str, model: str, parser: ParserConfig, documents: list[dict[str, Any]] | None):
        super().__init__(request_id, model, 1, False, parser, id_factory=new_tool_use_id)
        self.content_blocks = _Blocks(documents, emit=self._emit)

    def add(self, step: EngineStep) -> list[str]:  # type: ignore[override]
        super().add(step)
        events: list[str] = []
        for delta in step.choices:
            events += self.content_blocks.add(self.parse(delta))
            if delta.finish_reason is not None:
                events += self.content_blocks.close()
        return events

    def stop(self) -> tuple[str | None, str | None]:
        """Anthropic's stop_reason and stop_sequence."""
        state = self.choices[0]
        if state.finish_reason == "length":
            return "max_tokens", None
        if state.finish_reason != "stop":
            return None, None
        if self.parsers[0].tool_calls_returned:
            return "tool_use", None
        if state.stop_sequence is not None:
            return "stop_sequence", state.stop_sequence
        return "end_turn", None

    def build(self, prompt_token_ids: list[int] | None = None) -> MessagesResponse:
        reason, sequence = self.stop()
        usage = self.usage()
        return MessagesResponse(
            id=self.request_id,
            content=self.content_blocks.content(),
            model=self.model,
            stop_reason=reason,  # type: ignore[arg-type]
            stop_sequence=sequence,
            usage=MessagesUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        )


class MessagesStreamer(MessagesAccumulator):
    """Turns steps into Anthropic's stream events, as named server-sent events."""

    _emit = True

    def __init__(self, request_id: str, model: str, parser: ParserConfig, documents: list[dict[str, Any]] | None, prompt_tokens: int):
        super().__init__(request_id, model, parser, documents)
        self.prompt_tokens = prompt_tokens

    def opening(self) -> list[str]:
        message = MessagesResponse(
            id=self.request_id, content=[], model=self.model, usage=MessagesUsage(input_tokens=self.prompt_tokens, output_tokens=0)
        )
        return [
            _event("message_start", {"type": "message_start", "message": message.model_dump()}),
            _event("ping", {"type": "ping"}),
        ]

    def step(self, step: EngineStep) -> list[str]:
        return self.add(step)

    def closing(self) -> list[str]:
        reason, sequence = self.stop()
        usage = self.usage()
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                 "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}}  # fmt: skip
        return [_event("message_delta", delta), _event("message_stop", {"type": "message_stop"})]


# ------------------------------------------------------------------ prepare


def prepare_messages(body: MessagesRequest, engine: EngineFacts, settings: Settings, chat_template: str) -> GenerationJob:
    """The chat request the Messages request means, through every chat check; errors name the
    Messages request's own params."""
    chat, origins = to_chat_request(body)
    try:
        parts = chat_parts(chat, engine, settings, chat_template)
    except APIError as exc:
        raise in_anthropic_terms(exc, origins) from None
    plan, prompt_tokens = parts.plan, len(parts.prompt.token_ids)
    documents = plan.template_inputs.get("documents")
    renderers = Renderers(
        streamer=lambda rid, model: MessagesStreamer(rid, model, plan.parser, documents, prompt_tokens),
        accumulator=lambda rid, model: MessagesAccumulator(rid, model, plan.parser, documents),
        opening=lambda streamer: streamer.opening(),
        closing=lambda streamer: streamer.closing(),
        protocol="anthropic",
    )
    return chat_job(parts, renderers, stream=body.stream, endpoint="messages", id_prefix="msg", id_separator="_")


def prepare_count_tokens(body: CountTokensRequest, engine: EngineFacts, settings: Settings, chat_template: str) -> Prompt:
    """The prompt a Messages request would get (Anthropic's `count_tokens`)."""
    chat, origins = to_chat_request(body)
    try:
        check_chat_input_limits(chat, settings)
        return render_plan(engine, chat_template, plan_chat(chat))
    except APIError as exc:
        raise in_anthropic_terms(exc, origins) from None
