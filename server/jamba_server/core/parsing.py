"""Incremental parser for Jamba's output: content, `<tool_calls>[...]</tool_calls>`, `<citations>[...]</citations>`.

The engine detokenizes with special tokens kept, so this parser sees Jamba's tags as text. It is a
small state machine fed text deltas:

- content is emitted as soon as it cannot be the start of a tag (a possible tag prefix is held back);
- a tool-call block is held until it closes (or the output ends), then validated as a whole: valid →
  tool calls, malformed or not allowed → its text becomes plain content (never an error); a block the
  output ends inside (cut by `max_tokens`) gives the calls that completed, and the cut call is
  dropped — never returned as content in the protocol's own syntax;
- a citation block is held until it closes (or the output ends) and becomes the citation list;
- every other special token (`<|eom|>`, `<|bom|>`, ...) is dropped.

A grammar-constrained reply (response_format JSON, structured_outputs) is parsed verbatim: its text
is all content, so a JSON string or a regex match that spells `<tool_calls>` stays text (the engine
bans the control tokens under a constraint, so the grammar spells such text in ordinary tokens).

Feeding the whole output at once and feeding it in any split give the same result; the streaming
property test checks exactly that.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

TOOL_OPEN, TOOL_CLOSE = "<tool_calls>", "</tool_calls>"
CITE_OPEN, CITE_CLOSE = "<citations>", "</citations>"
DROPPED_TOKENS = (
    "<|bom|>", "<|eom|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>",
    "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>",
)  # fmt: skip
_MARKERS = (TOOL_OPEN, CITE_OPEN, TOOL_CLOSE, CITE_CLOSE, *DROPPED_TOKENS)
_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI returns it


@dataclass(frozen=True)
class Citation:
    document_id: int
    title: str | None = None


@dataclass
class ParseDelta:
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    citations: list[Citation] | None = None

    def extend(self, other: ParseDelta) -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        if other.citations is not None:
            self.citations = (self.citations or []) + other.citations


@dataclass(frozen=True)
class ParserConfig:
    """What the request allows the output to contain."""

    tool_names: frozenset[str] | None = None  # None: tool calls are not allowed
    parallel_tool_calls: bool = True
    document_titles: tuple[str | None, ...] | None = None  # None: no documents in the request
    citation_mode: bool = False
    starts_in_tool_block: bool = False  # the prompt already ends with `<tool_calls>`
    verbatim: bool = False  # a grammar-constrained reply: all of it is content, as generated


_MARKER_PREFIXES = frozenset(m[:size] for m in _MARKERS for size in range(1, len(m)))
_LONGEST_MARKER = max(len(m) for m in _MARKERS)


def _held_prefix_len(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some marker.

    Every marker has its only `<` at the start, so such a suffix starts at the last `<`."""
    start = text.rfind("<")
    if start < 0 or len(text) - start >= _LONGEST_MARKER:
        return 0
    return len(text) - start if text[start:] in _MARKER_PREFIXES else 0


def _strip_special(text: str) -> str:
    """Drop every tag and special token from text that is returned as content."""
    for token in _MARKERS:
        text = text.replace(token, "")
    return text


def parse_tool_block(
    block: str, config: ParserConfig, id_factory: Callable[[], str] = new_tool_call_id
) -> list[ParsedToolCall] | None:
    """The calls in a tool-call block, or None when it is malformed or not allowed."""
    try:
        items = json.loads(block)
    except ValueError:
        return None
    return _tool_calls(items, config, id_factory)


def parse_cut_tool_block(
    block: str, config: ParserConfig, id_factory: Callable[[], str] = new_tool_call_id
) -> list[ParsedToolCall] | None:
    """The calls of a tool-call block the output ended inside (cut by `max_tokens`): the whole block
    if it is complete but for its closing tag, else the calls that completed before the cut (an
    empty list if none did). None when what there is is not the start of a JSON array of calls."""
    calls = parse_tool_block(block, config, id_factory)
    if calls is not None:
        return calls
    items = _complete_array_items(block)
    if items is None:
        return None
    return _tool_calls(items, config, id_factory, allow_empty=True) if items else ([] if config.tool_names else None)


_DECODER = json.JSONDecoder()


def _complete_array_items(text: str) -> list[Any] | None:
    """The complete items at the start of a JSON array that `text` begins (a prefix of one), or None
    when `text` does not begin one."""
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        return None
    items: list[Any] = []
    position += 1
    while True:
        position = len(text) - len(text[position:].lstrip())
        if position < len(text) and text[position] != "{":
            return items or None  # not a call object: after a complete call, the cut; first, not an array of calls
        try:
            item, position = _DECODER.raw_decode(text, position)
        except ValueError:
            return items  # the cut call (or nothing after `[`)
        items.append(item)
        position = len(text) - len(text[position:].lstrip())
        if not text.startswith(",", position):
            return items
        position += 1


def _tool_calls(
    items: Any, config: ParserConfig, id_factory: Callable[[], str], allow_empty: bool = False
) -> list[ParsedToolCall] | None:
    if config.tool_names is None:
        return None
    if not isinstance(items, list) or not (items or allow_empty):
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or set(item) - {"name", "arguments"}:
            return None
        name, arguments = item.get("name"), item.get("arguments", {})
        if not isinstance(name, str) or name not in config.tool_names:
            return None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ParsedToolCall(id_factory(), name, json.dumps(arguments, ensure_ascii=False)))
    return calls if config.parallel_tool_calls else calls[:1]


def parse_citation_block(block: str, config: ParserConfig) -> list[Citation] | None:
    """Citations for ids that exist in the request's documents, or None when malformed."""
    try:
        ids = json.loads(block)
    except ValueError:
        return None
    if not isinstance(ids, list):
        return None
    titles = config.document_titles or ()
    seen: list[int] = []
    for value in ids:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(titles):
            if value not in seen:
                seen.append(value)
    return [Citation(i, titles[i]) for i in seen]


class OutputParser:
    """Feed text deltas, get `ParseDelta`s; call `finish()` once the output has ended."""

    def __init__(self, config: ParserConfig, id_factory: Callable[[], str] = new_tool_call_id):
        self.config = config
        self._id_factory = id_factory
        self._buffer = ""
        self._state = "tools" if config.starts_in_tool_block else "content"
        self._citations_seen = False
        self.tool_calls_returned = 0
        self.tool_blocks_parsed = 0
        self.tool_blocks_rejected = 0  # malformed or not allowed: returned as content
        self.citations_returned = 0

    def feed(self, text: str) -> ParseDelta:
        if self.config.verbatim:
            return ParseDelta(content=text)
        self._buffer += text
        out = ParseDelta()
        while True:
            if self._state == "content":
                if not self._scan_content(out):
                    return out
            else:
                close = TOOL_CLOSE if self._state == "tools" else CITE_CLOSE
                end = self._buffer.find(close)
                if end < 0:
                    return out
                block, self._buffer = self._buffer[:end], self._buffer[end + len(close) :]
                self._close_block(block, out)

    def finish(self) -> ParseDelta:
        out = ParseDelta()
        if self._state == "content":
            out.content += _strip_special(self._buffer)
            self._buffer = ""
        elif self._state == "tools":
            # The output ended inside a tool-call block (cut by max_tokens): the calls that completed
            # are calls; the cut one is dropped, never returned as text in the protocol's syntax.
            block, self._buffer = self._buffer, ""
            calls = parse_cut_tool_block(block, self.config, self._id_factory)
            if calls is None:
                self._close_block(block, out)  # not a call array at all: plain content, as ever
            else:
                if calls:
                    self._accept_calls(calls, out)
                self._state = "content"
        else:
            block, self._buffer = self._buffer, ""
            self._close_block(block, out)
        if self.config.citation_mode and not self._citations_seen:
            out.citations = []
        return out

    def _scan_content(self, out: ParseDelta) -> bool:
        """Emit content up to the next marker and act on it; False when more text is needed."""
        if "<" not in self._buffer:  # the common case: plain text, no marker can start here
            out.content += self._buffer
            self._buffer = ""
            return False
        positions = [(self._buffer.find(m), m) for m in _MARKERS]
        found = [(pos, m) for pos, m in positions if pos >= 0]
        if not found:
            keep = _held_prefix_len(self._buffer)
            emit_to = len(self._buffer) - keep
            out.content += self._buffer[:emit_to]
            self._buffer = self._buffer[emit_to:]
            return False
        pos, marker = min(found, key=lambda item: (item[0], -len(item[1])))
        out.content += self._buffer[:pos]
        self._buffer = self._buffer[pos + len(marker) :]
        if marker == TOOL_OPEN:
            self._state = "tools"
        elif marker == CITE_OPEN:
            self._state = "citations"
        return True

    def _accept_calls(self, calls: list[ParsedToolCall], out: ParseDelta) -> None:
        out.tool_calls.extend(calls)
        self.tool_blocks_parsed += 1
        self.tool_calls_returned += len(calls)

    def _close_block(self, block: str, out: ParseDelta) -> None:
        if self._state == "tools":
            calls = parse_tool_block(block, self.config, self._id_factory)
            if calls is None:
                self.tool_blocks_rejected += 1
                out.content += _strip_special(block)
            else:
                self._accept_calls(calls, out)
        else:
            citations = parse_citation_block(block, self.config)
            if citations is None:
                out.content += _strip_special(block)
            else:
                self._citations_seen = True
                self.citations_returned += len(citations)
                out.citations = (out.citations or []) + citations
        self._state = "content"


def parse_output(text: str, config: ParserConfig, id_factory: Callable[[], str] = new_tool_call_id) -> ParseDelta:
    """Parse a whole output at once (what the non-streaming path does)."""
    parser = OutputParser(config, id_factory)
    result = parser.feed(text)
    result.extend(parser.finish())
    return result


def document_titles(documents: Sequence[dict[str, Any]] | None) -> tuple[str | None, ...] | None:
    if documents is None:
        return None
    return tuple(doc.get("title") for doc in documents)
