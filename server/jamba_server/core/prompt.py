"""Chat request → Jamba chat-template inputs → prompt text and token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from jamba_server.errors import InvalidRequestError
from jamba_server.protocol import ChatMessage

ROLE_ALIASES = {"developer": "system"}


class ChatTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the prompt builder uses."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]


def template_message(message: ChatMessage) -> dict[str, Any]:
    """One API message as the chat template expects it (content joined, roles mapped)."""
    rendered: dict[str, Any] = {
        "role": ROLE_ALIASES.get(message.role, message.role),
        "content": message.text(),
    }
    if message.name:
        rendered["name"] = message.name
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type,
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def render_chat(
    tokenizer: ChatTokenizer,
    chat_template: str,
    inputs: dict[str, Any],
    add_generation_prompt: bool = True,
    suffix: str = "",
) -> Prompt:
    """Render through the tokenizer's template path, then tokenize without a second BOS.

    `suffix` is appended after the generation prompt (e.g. a forced `<tool_calls>` opening).
    """
    try:
        text = tokenizer.apply_chat_template(
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **inputs,
        )
    except Exception as exc:  # jinja2 TemplateError, raise_exception() in the template
        raise InvalidRequestError(f"cannot render messages: {exc}", param="messages") from exc
    text += suffix
    _check_unicode(text, "messages")
    # The template writes BOS itself; the tokenizer must not add another.
    return Prompt(text=text, token_ids=tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(tokenizer: ChatTokenizer, text: str, add_special_tokens: bool = True) -> Prompt:
    _check_unicode(text, "prompt")
    return Prompt(text=text, token_ids=tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _check_unicode(text: str, param: str) -> None:
    """JSON may carry lone surrogates (`"\\ud800"`); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"the text contains invalid Unicode (a lone surrogate at position {exc.start})", param=param
        ) from exc
