"""Jamba's features on a chat request: template inputs (tools, documents, knobs) and the output plan
(constraints for vLLM's structured outputs, tokens to ban, how to parse the answer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jamba_server.core.constraints import ANY_OBJECT, OutputConstraint, check_schema, output_constraint
from jamba_server.core.input_limits import MAX_TOOL_PARAMETERS_NESTING, check_nesting
from jamba_server.core.parsing import TOOL_OPEN, ParserConfig, document_titles
from jamba_server.core.prompt import template_message
from jamba_server.errors import InvalidRequestError
from jamba_server.protocol import ChatFeatures, NamedToolChoice

# What an assistant turn that calls tools starts with (see the golden cases); forced tool calls
# append it to the prompt so the model continues inside the block.
TOOL_BLOCK_PREFIX = " " + TOOL_OPEN


@dataclass(frozen=True)
class ChatPlan:
    template_inputs: dict[str, Any]
    prompt_suffix: str
    constraint: OutputConstraint | None
    banned_tokens: tuple[str, ...]
    parser: ParserConfig
    feature_labels: tuple[str, ...]
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the prompt ends inside the final (assistant) message

    @property
    def json_mode(self) -> bool:
        """The reply's content is constrained to JSON (not a forced tool call's)."""
        return self.constraint is not None and self.constraint.is_json and not self.parser.starts_in_tool_block


def _tool_choice(request: ChatFeatures) -> str | NamedToolChoice:
    tools = request.tools or []
    choice = request.tool_choice
    if choice is None:
        return "auto" if tools else "none"
    if choice != "none" and choice != "auto" and not tools:
        raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        names = {t.function.name for t in tools}
        if choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names `{choice.function.name}`, which is not in tools",
                param="tool_choice",
            )
    return choice


def _call_schema(tool_name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool_name},
            "arguments": parameters if parameters is not None else ANY_OBJECT,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_calls_schema(request: ChatFeatures, only: str | None) -> dict[str, Any]:
    """Schema of a Jamba tool-call list naming declared functions (or just `only`)."""
    calls = [
        _call_schema(t.function.name, t.function.parameters)
        for t in request.tools or []
        if only is None or t.function.name == only
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        "minItems": 1,
    }
    if only is not None or not request.parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def _knobs(request: ChatFeatures) -> dict[str, Any] | None:
    knobs: dict[str, Any] = {}
    if request.citation_mode == "fast":
        knobs["citation_mode"] = "fast"
    fmt = request.response_format
    if fmt is not None and fmt.type in ("json_object", "json_schema"):
        knobs["response_format"] = "json_object"
    if not knobs:
        return None
    knobs["is_set"] = True
    return knobs


def _validate(request: ChatFeatures) -> None:
    names = [t.function.name for t in request.tools or []]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidRequestError(f"duplicate tool names: {duplicates}", param="tools")
    for i, tool in enumerate(request.tools or []):
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters", MAX_TOOL_PARAMETERS_NESTING)
    for i, message in enumerate(request.messages or []):
        for j, call in enumerate(message.tool_calls or []):
            check_nesting(
                call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments", what="the arguments object"
            )
    if request.citation_mode == "fast" and not request.documents:
        raise InvalidRequestError("citation_mode needs documents", param="citation_mode")


def _output_constraint(request: ChatFeatures, choice: Any, forced_tool: bool) -> OutputConstraint | None:
    """A forced tool call's schema, or the reply's own constraint (response_format or structured_outputs).

    With `structured_outputs` the constraint holds the whole reply, so it cannot meet a forced tool call
    (both would constrain the same output) nor Jamba's citation block (the grammar leaves no room to
    write one). With tool_choice `auto` it is accepted as response_format JSON is: the model cannot
    call a tool in that turn, as on vLLM."""
    structured = getattr(request, "structured_outputs", None)  # generation requests only, not /tokenize
    content = output_constraint(request.response_format, structured)
    if structured is not None:
        if forced_tool:
            raise InvalidRequestError(
                "structured_outputs cannot be combined with a required or named tool_choice: both constrain the reply",
                param="structured_outputs",
            )
        if request.citation_mode == "fast":
            raise InvalidRequestError(
                "structured_outputs cannot be combined with citation_mode fast: the constraint leaves no room "
                "for Jamba's citation block",
                param="structured_outputs",
            )
    if forced_tool:
        only = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return OutputConstraint("json", tool_calls_schema(request, only), "tools")
    return content


def _feature_labels(request: ChatFeatures) -> tuple[str, ...]:
    """Metric labels: which of Jamba's features the request uses."""
    fmt_type = request.response_format.type if request.response_format is not None else None
    labels = []
    if request.tools:
        labels.append("tools")
    if request.documents:
        labels.append("documents")
    if fmt_type == "json_object":
        labels.append("json_mode")
    if fmt_type == "json_schema":
        labels.append("json_schema")
    if getattr(request, "structured_outputs", None) is not None:
        labels.append("structured_outputs")
    return tuple(labels)


def _json_output_param(request: ChatFeatures, json_mode: bool) -> str | None:
    """The field that asks for a whole JSON reply, if one does."""
    if json_mode:
        return "response_format"
    structured = getattr(request, "structured_outputs", None)  # generation requests only, not /tokenize
    if structured is not None and (structured.json_ is not None or structured.json_object):
        return "structured_outputs"
    return None


def _check_prompt_end(request: ChatFeatures, json_output: str | None, forced_tool: bool) -> None:
    """`add_generation_prompt` / `continue_final_message` (vLLM's fields, vLLM's errors), and what
    cannot follow them: a forced tool call opens the assistant turn the generation prompt starts;
    with a prefill, the output constraint (JSON mode, a forced call) would hold the continuation
    alone, which cannot be both the rest of the prefill and a whole JSON value or call block."""
    if not request.continue_final_message:
        if forced_tool and not request.add_generation_prompt:
            raise InvalidRequestError(
                "a required or named tool_choice needs add_generation_prompt (the call opens the assistant turn)",
                param="add_generation_prompt",
            )
        return
    if request.add_generation_prompt:
        raise InvalidRequestError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    last = len(request.messages) - 1
    final = request.messages[last]
    if final.role != "assistant":
        raise InvalidRequestError(
            "Cannot set `continue_final_message` to True when the last message is not from the assistant.",
            param="continue_final_message",
        )
    if final.tool_calls:
        raise InvalidRequestError(
            "the message to continue has tool_calls: only an assistant message's text can be continued",
            param=f"messages[{last}].tool_calls",
        )
    if final.citations is not None:
        raise InvalidRequestError(
            "the message to continue has citations: they belong to a finished answer", param=f"messages[{last}].citations"
        )
    if json_output is not None:
        raise InvalidRequestError(
            "a JSON output format cannot be combined with an assistant prefill (continue_final_message): the "
            "format would hold the continuation alone, not the prefilled message",
            param=json_output,
        )
    if forced_tool:
        raise InvalidRequestError(
            "a forced tool call (tool_choice required or named) cannot be combined with an assistant prefill "
            "(continue_final_message): the call block would follow the prefilled text",
            param="tool_choice",
        )
    if request.documents and not any(m.role == "user" for m in request.messages):
        # Jamba's template puts documents before the last user turn, or after the conversation.
        raise InvalidRequestError(
            "documents with an assistant prefill (continue_final_message) need a user message before it",
            param="documents",
        )


def plan_chat(request: ChatFeatures) -> ChatPlan:
    """Validate the request's features and decide prompt inputs, constraints and parsing."""
    _validate(request)
    choice = _tool_choice(request)
    fmt = request.response_format
    json_mode = fmt is not None and fmt.type != "text"
    forced_tool = isinstance(choice, NamedToolChoice) or choice == "required"
    if forced_tool and json_mode:
        raise InvalidRequestError(
            "response_format JSON cannot be combined with a required or named tool_choice",
            param="response_format",
        )
    _check_prompt_end(request, _json_output_param(request, json_mode), forced_tool)

    inputs: dict[str, Any] = {"conversation": [_with_citations(m) for m in request.messages]}
    if request.tools and choice != "none":
        inputs["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
    documents = None
    if request.documents:
        documents = [
            {"text": d.text, **({"title": d.title} if d.title is not None else {}), **(d.model_extra or {})}
            for d in request.documents
        ]
        inputs["documents"] = documents
    knobs = _knobs(request)
    if knobs:
        inputs["knobs"] = knobs

    constraint = _output_constraint(request, choice, forced_tool)

    tool_names = None
    if request.tools and choice != "none":
        tool_names = frozenset(t.function.name for t in request.tools)
    parser = ParserConfig(
        tool_names=tool_names,
        parallel_tool_calls=request.parallel_tool_calls and not isinstance(choice, NamedToolChoice),
        document_titles=document_titles(documents),
        citation_mode=request.citation_mode == "fast",
        starts_in_tool_block=forced_tool,
        # A constrained reply is the grammar's text, whatever it spells: never tool calls or citations.
        verbatim=constraint is not None and not forced_tool,
    )
    return ChatPlan(
        template_inputs=inputs,
        prompt_suffix=TOOL_BLOCK_PREFIX if forced_tool else "",
        constraint=constraint,
        # With tool_choice "none" the model must not open a tool-call block at all.
        banned_tokens=(TOOL_OPEN,) if request.tools and choice == "none" else (),
        parser=parser,
        feature_labels=_feature_labels(request),
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
    )


def _with_citations(message: Any) -> dict[str, Any]:
    rendered = template_message(message)
    ids = message.citation_ids()
    if ids is not None:
        rendered["citations"] = ids
    return rendered
