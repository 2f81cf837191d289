"""Chat request → Jamba chat-template inputs → prompt text and token ids.

The prompt is a trust boundary. The template's own text is tokenized with control tokens
(`<|bom|>`, `<|eom|>`, `<tool_calls>`, …); every string that came from the request — message content
and names, tool definitions, tool-call arguments, tool results, documents and their metadata — is
tokenized as plain text, so a client can never close its turn, forge a system or assistant turn, or
open a tool-call block by typing a control token's spelling (OpenAI's servers treat such text the same
way). Invariant, proved by tests/unit/test_prompt.py: no control token id comes from a client string,
and a prompt whose client strings contain no control spelling tokenizes exactly as the whole rendered
text always did (one `encode`, same ids).

How: before rendering, each control spelling inside a client string is swapped for a placeholder the
tokenizer cannot confuse with anything (private-use characters and a per-call random number); the
template renders; the text is split at the control spellings left (all the template's own), and each
piece between them is tokenized with the placeholders swapped back and control spellings split into
ordinary tokens. Tokenizers split text at added tokens before tokenizing the pieces, so the pieces
tokenize as they would have in the whole text (checked for each tokenizer when first used; a warning
says if not). The pieces go through a private copy of the tokenizer that reads every added token's
spelling as text: Hugging Face's `split_special_tokens` flips a flag on the one shared tokenizer for
the call, which races renders running in other threads.

Continuing the final message (assistant prefill, `continue_final_message`): the template renders
the conversation with a marker (private-use characters and a random number) appended to the final
message's content, and the prompt is the text up to the marker — the message's text exactly, without
what the template writes after it (Jamba's `<|eom|>`). Only template-owned text is removed: the
template must render the content unchanged, and what it writes after it must be what it writes
after that bare message with no tools, documents or output modes (else a 400: cutting would drop
client text). The cut happens on the shielded text, so the prefill is tokenized by provenance like
every other client string.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from tokenizers import Tokenizer

from jamba_server.errors import InvalidRequestError
from jamba_server.protocol import ChatMessage

logger = logging.getLogger(__name__)
ROLE_ALIASES = {"developer": "system"}
# Template inputs the server writes itself (never client text).
SERVER_INPUTS = frozenset({"knobs"})


class ChatTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the prompt builder uses."""

    added_tokens_decoder: dict[int, Any]
    backend_tokenizer: Tokenizer

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ..., **kwargs: Any) -> list[int]: ...


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]


def template_message(message: ChatMessage) -> dict[str, Any]:
    """One API message as the chat template expects it (content joined, roles mapped, tool-call
    arguments as the parsed object so the template writes them canonically)."""
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


class ControlSpellings:
    """A tokenizer's added tokens (the control tokens) as text, and how to keep them out of client text."""

    def __init__(self, tokenizer: ChatTokenizer):
        self._ids = {getattr(t, "content", str(t)): i for i, t in tokenizer.added_tokens_decoder.items()}
        # Longest first: the tokenizer matches added tokens leftmost-longest.
        spellings = sorted(self._ids, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(s) for s in spellings)) if spellings else None
        self._split = re.compile(f"({self._pattern.pattern})") if spellings else None
        self._text_only = _text_only_copy(tokenizer)
        self.piecewise_exact = self._check_piecewise(tokenizer, spellings)

    def _check_piecewise(self, tokenizer: ChatTokenizer, spellings: list[str]) -> bool:
        """Whether tokenizing between control tokens gives the whole text's ids for this tokenizer
        (true for byte-level BPE and per-segment normalizers; not for e.g. an `lstrip` added token)."""
        sample = " x\n".join(["Hello, world", *spellings, " y z"])
        exact = self.encode(tokenizer, sample, {"\ue000unused\ue001": ""}) == tokenizer.encode(sample, add_special_tokens=False)
        if not exact:
            logger.warning(
                "this tokenizer tokenizes text between control tokens differently from the whole text: "
                "a prompt whose client text spells a control token may tokenize slightly differently"
            )
        return exact

    def shield(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Template inputs with every control spelling in client strings swapped for a placeholder,
        and the placeholders (placeholder → spelling). No spelling found: the inputs unchanged."""
        if self._pattern is None:
            return inputs, {}
        nonce = f"{secrets.randbelow(10**12):012d}"
        found: dict[str, str] = {}

        def placeholder(match: re.Match[str]) -> str:
            spelling = match.group(0)
            token = f"\ue000{nonce}{self._ids[spelling]}\ue001"
            found[token] = spelling
            return token

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                return self._pattern.sub(placeholder, value) if self._pattern.search(value) else value
            if isinstance(value, dict):
                return {walk(k): walk(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [walk(v) for v in value]
            return value

        shielded = {key: value if key in SERVER_INPUTS else walk(value) for key, value in inputs.items()}
        return (shielded, found) if found else (inputs, {})

    @staticmethod
    def marker() -> str:
        """Text no client string and no placeholder holds (placeholders end in digits before `\ue001`)."""
        return f"\ue000{secrets.randbelow(10**12):012d}end\ue001"

    def encode(self, tokenizer: ChatTokenizer, text: str, placeholders: dict[str, str]) -> list[int]:
        """Token ids of rendered `text`: its control spellings as control tokens, the placeholders'
        spellings as plain text."""
        if not placeholders:
            return tokenizer.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._ids[piece])
            elif piece:
                ids.extend(self._text_only.encode(self.restore(piece, placeholders), add_special_tokens=False).ids)
        return ids

    def token_starts(self, text: str) -> list[int]:
        """Where each token of client string `text` starts (character offsets), tokenized as client
        text is: control spellings as plain text. Prompt truncation (core/truncation.py) cuts there."""
        return [start for start, _ in self._text_only.encode(text, add_special_tokens=False).offsets]

    @staticmethod
    def restore(text: str, placeholders: dict[str, str]) -> str:
        """`text` with the placeholders swapped back for the client's spellings."""
        for token, spelling in placeholders.items():
            text = text.replace(token, spelling)
        return text


def _text_only_copy(tokenizer: ChatTokenizer) -> Tokenizer:
    """A private copy of the fast tokenizer that reads every added token's spelling as ordinary text
    (all marked special, even ones the tokenizer marks not special, and `encode_special_tokens`)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in spec.get("added_tokens", []):
        token["special"] = True
    copy = Tokenizer.from_str(json.dumps(spec))
    copy.encode_special_tokens = True
    return copy


_SPELLINGS: dict[int, tuple[Any, ControlSpellings]] = {}


def control_spellings(tokenizer: ChatTokenizer) -> ControlSpellings:
    """One `ControlSpellings` per tokenizer object (kept with it, so its id is never reused). The
    engine adapter builds it when it loads the tokenizer, so no request pays for the copy and check."""
    entry = _SPELLINGS.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        entry = _SPELLINGS[id(tokenizer)] = (tokenizer, ControlSpellings(tokenizer))
    return entry[1]


def render_chat(
    tokenizer: ChatTokenizer,
    chat_template: str,
    inputs: dict[str, Any],
    add_generation_prompt: bool = True,
    suffix: str = "",
    continue_final_message: bool = False,
) -> Prompt:
    """Render through the tokenizer's template path, then tokenize by provenance without a second BOS.

    `suffix` is appended after the generation prompt (e.g. a forced `<tool_calls>` opening).
    `continue_final_message`: the prompt ends with the final message's content, open (see above).
    """
    spellings = control_spellings(tokenizer)
    try:
        shielded, placeholders = spellings.shield(inputs)
        if continue_final_message:
            text = _render_open_final(tokenizer, chat_template, shielded)
        else:
            text = _render(tokenizer, chat_template, shielded, add_generation_prompt)
    except InvalidRequestError:
        raise
    except Exception as exc:  # jinja2 TemplateError, raise_exception() in the template, RecursionError
        raise InvalidRequestError(f"cannot render messages: {exc}", param="messages") from exc
    text += suffix
    _check_unicode(text, "messages")
    # The template writes BOS itself; the tokenizer must not add another.
    token_ids = spellings.encode(tokenizer, text, placeholders)
    return Prompt(text=spellings.restore(text, placeholders), token_ids=token_ids)


def _render(tokenizer: ChatTokenizer, chat_template: str, inputs: dict[str, Any], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False, **inputs
    )


def _render_open_final(tokenizer: ChatTokenizer, chat_template: str, inputs: dict[str, Any]) -> str:
    """The rendered conversation up to the end of its final message's content (shielded inputs in,
    shielded text out): the template's own text after that content is removed, nothing else."""
    conversation = inputs["conversation"]
    final = conversation[-1]
    content = final.get("content") or ""
    marker = ControlSpellings.marker()
    marked = [*conversation[:-1], {**final, "content": content + marker}]
    text = _render(tokenizer, chat_template, {**inputs, "conversation": marked}, False)
    where = text.find(marker)
    if where < 0 or text.count(marker) != 1 or not text[:where].endswith(content):
        raise InvalidRequestError(
            "cannot continue the final message: the chat template does not render its content as given",
            param="messages",
        )
    tail = text[where + len(marker) :]
    bare = {"role": final["role"], "content": content + marker}
    if tail and (set(inputs) != {"conversation"} or set(final) - {"role", "content"}):
        # The template's own tail is what it writes after the bare message in the bare conversation;
        # anything more is the request's (tool calls or citations of the message, documents or
        # output modes placed after it) and would be cut away.
        plain = _render(tokenizer, chat_template, {"conversation": [*conversation[:-1], bare]}, False)
        if plain[plain.find(marker) + len(marker) :] != tail:
            raise InvalidRequestError(
                "cannot continue the final message: the chat template writes request content after it "
                "(e.g. documents when no user message comes before it)",
                param="messages",
            )
    return text[:where]


def encode_prompt(tokenizer: ChatTokenizer, text: str, add_special_tokens: bool = True) -> Prompt:
    """A raw completions prompt: the client owns all of it, control tokens included."""
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
