"""Prompt truncation: vLLM's `truncate_prompt_tokens` / `truncation_side`, cut so that a too-long
prompt fits instead of being refused.

The budget (`prompt_budget`): at most `truncate_prompt_tokens` tokens (-1: the model's context), and
never so many that `max_tokens` no longer fits after the prompt (the request's `max_tokens`, else the
server's `max_tokens_limit`, the default a request without one gets, else one token). vLLM cuts to
`truncate_prompt_tokens` and then quietly lowers `max_tokens` to what is left; here `max_tokens` is
always honoured, so `-1` with `max_tokens` means "the longest prompt that still leaves my answer room".

Completions (`truncate_ids`) cut token ids as vLLM does: `left` keeps the last tokens, `right` the
first ones; a text prompt keeps the BOS the tokenizer put in front of it.

Chat (`truncate_chat`) never cuts blindly through the template. It cuts client text only, at token
boundaries of that text, in a fixed order, and re-renders, so the prompt keeps every control token
of its structure and the provenance rule of core/prompt.py (client text is never a control token)
holds for the cut prompt as for any other. What is cut, first to last:

1. history and grounding: every non-system message's content except the final user message's —
   earlier turns (`history`, the messages before the final user message), the documents' texts, and
   the turns after the final user message (an agent loop's tool calls and tool results) — in the
   order the template renders them (history, documents, later turns) for `left`, the reverse for
   `right`. A history *exchange* (a user message and the assistant and tool turns that answer it)
   whose content is all cut is dropped whole (its turns, tool calls and names go too). Documents
   and turns after the final user message are never dropped, only emptied: citations number the
   documents, and the latest turns carry the tool calls being answered.
2. the final user message's content;
3. system (and developer) messages' content.

Inside one piece of text, `left` keeps its end and `right` its beginning. Never cut: the template's
own text, tool definitions, tool calls, names, document titles and metadata; when those alone do
not fit the budget the request is a 400 naming `truncate_prompt_tokens`.

`truncate_chat` is a pure function of the template inputs, the budget and two callables (render the
inputs; where a client string's tokens start), so tests/unit/test_truncation.py checks it on random
conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from jamba_server.core.prompt import Prompt
from jamba_server.errors import ContextLengthExceededError, InvalidRequestError

Side = Literal["left", "right"]
DEFAULT_SIDE: Side = "left"  # vLLM's for generation models (its tokenizer registry's default)
PARAM = "truncate_prompt_tokens"
# Correction renders before the cut falls back to growing geometrically (a guard: the first
# estimate is exact or a token or two short).
_LINEAR_STEPS = 4
# Renders spent giving back tokens the cut took beyond the budget.
_GIVE_BACK_STEPS = 2


@dataclass(frozen=True)
class Truncation:
    """What truncation did to one prompt (the response's `prompt_truncation`)."""

    side: Side
    limit: int  # the prompt budget applied
    prompt_tokens_before: int
    prompt_tokens: int
    messages_truncated: tuple[int, ...] = ()  # messages whose content was shortened (kept)
    messages_dropped: tuple[int, ...] = ()  # history messages removed whole
    documents_truncated: tuple[int, ...] = ()  # documents whose text was shortened or emptied

    @property
    def tokens_removed(self) -> int:
        return self.prompt_tokens_before - self.prompt_tokens


def prompt_budget(
    truncate_prompt_tokens: int | None,
    max_tokens: int | None,
    max_model_len: int,
    default_cap: int | None,
    max_tokens_param: str = "max_tokens",
) -> int | None:
    """The most prompt tokens the request may keep, or None when it asks for no truncation."""
    if truncate_prompt_tokens is None:
        return None
    if truncate_prompt_tokens > max_model_len:
        raise InvalidRequestError(
            f"truncate_prompt_tokens={truncate_prompt_tokens} cannot be greater than max_model_len={max_model_len}",
            param=PARAM,
        )
    reserve = max_tokens if max_tokens is not None else min(default_cap or 1, max_model_len - 1)
    room = max_model_len - reserve
    if room < 1:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens: {max_tokens_param}={max_tokens} "
            f"leaves no room for a prompt, however truncated.",
            param=max_tokens_param,
        )
    return room if truncate_prompt_tokens == -1 else min(truncate_prompt_tokens, room)


def truncate_ids(ids: list[int], limit: int, side: Side, keep_first: int = 0) -> list[int]:
    """`ids` cut to `limit`: `left` keeps the last ones, `right` the first; the first `keep_first`
    ids (a BOS the tokenizer added) are kept either way."""
    if len(ids) <= limit:
        return list(ids)
    head = ids[:keep_first] if keep_first < limit else []
    room = limit - len(head)
    body = ids[len(head):]
    return head + (body[len(body) - room:] if side == "left" else body[:room])


# ------------------------------------------------------------------ chat


@dataclass(frozen=True)
class _Piece:
    """One cuttable client string: a message's content or a document's text."""

    kind: Literal["message", "document"]
    index: int
    text: str
    exchange: int | None = None  # the history exchange it belongs to (dropped when all cut)


@dataclass(frozen=True)
class ChatCut:
    inputs: dict[str, Any]  # the template inputs after the cut
    prompt: Prompt
    truncation: Truncation


def _exchanges(conversation: list[dict[str, Any]], final_user: int) -> list[list[int]]:
    """The history before the final user message in exchanges: a user message and the non-system
    turns after it (anything before the first user message is an exchange of its own). System
    messages belong to none: they are never dropped."""
    groups: list[list[int]] = []
    for i in range(final_user):
        role = conversation[i]["role"]
        if role == "system":
            continue
        if role == "user" or not groups:
            groups.append([])
        groups[-1].append(i)
    return groups


def _pieces(inputs: dict[str, Any], side: Side) -> list[_Piece | int]:
    """Every cuttable string, in the order they are cut; an int after an exchange's pieces marks
    where that exchange is dropped (once the cut has passed all its content)."""
    conversation: list[dict[str, Any]] = inputs["conversation"]
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    final_user = users[-1] if users else -1
    exchanges = _exchanges(conversation, final_user)
    in_history = {i for group in exchanges for i in group}

    def message(i: int, exchange: int | None = None) -> _Piece:
        return _Piece("message", i, conversation[i].get("content") or "", exchange)

    history: list[list[_Piece | int]] = [[*(message(i, g) for i in group), g] for g, group in enumerate(exchanges)]
    documents: list[list[_Piece | int]] = [
        [_Piece("document", j, doc.get("text") or "")] for j, doc in enumerate(inputs.get("documents") or [])
    ]
    later: list[list[_Piece | int]] = [
        [message(i)]
        for i, m in enumerate(conversation)
        if m["role"] != "system" and i != final_user and i not in in_history
    ]
    if final_user == -1:  # the template renders documents after every turn
        first = later + documents
    else:
        first = history + documents + later
    tiers = [
        first,
        [[message(final_user)]] if final_user >= 0 else [],
        [[message(i)] for i, m in enumerate(conversation) if m["role"] == "system"],
    ]
    order: list[_Piece | int] = []
    for tier in tiers:
        for unit in (tier if side == "left" else reversed(tier)):
            pieces = [p for p in unit if isinstance(p, _Piece)]
            marks = [p for p in unit if not isinstance(p, _Piece)]
            order.extend(pieces if side == "left" else reversed(pieces))
            order.extend(marks)
    return order


def _kept(text: str, starts: list[int], removed: int, side: Side) -> str:
    """`text` less `removed` of its tokens from `side`, cut where a token starts (more when that
    token starts inside a character: a byte-level tokenizer splits one character over several)."""
    n = len(starts)
    if removed <= 0:
        return text
    if removed >= n:
        return ""
    if side == "left":
        while removed < n and starts[removed] <= starts[removed - 1]:
            removed += 1
        return text[starts[removed]:] if removed < n else ""
    keep = n - removed
    while keep > 0 and starts[keep] <= starts[keep - 1]:
        keep -= 1
    return text[: starts[keep]] if keep > 0 else ""


class _Cutter:
    """Cut positions over the order of pieces: position `k` has removed the first `k` tokens of
    the order (each piece's tokens counted standalone, as `token_starts` gives them)."""

    def __init__(self, inputs: dict[str, Any], side: Side, token_starts: Callable[[str], list[int]]):
        self.inputs = inputs
        self.side = side
        self.order = _pieces(inputs, side)
        self._token_starts = token_starts
        self._starts: dict[int, list[int]] = {}  # by position in the order, computed once reached

    def starts(self, at: int) -> list[int]:
        if at not in self._starts:
            piece = self.order[at]
            assert isinstance(piece, _Piece)
            self._starts[at] = self._token_starts(piece.text) if piece.text else []
        return self._starts[at]

    def advance(self, k: int, tokens: int) -> int | None:
        """The position `tokens` past `k`; when fewer remain, the end (one past the last token:
        everything cut, every exchange passed and dropped); None when `k` is the end already."""
        target, offset = k + tokens, 0
        for at, piece in enumerate(self.order):
            if isinstance(piece, _Piece):
                offset += len(self.starts(at))
                if offset >= target:
                    return target
        return offset + 1 if offset + 1 > k else None

    def apply(self, k: int) -> tuple[dict[str, Any], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The inputs with the first `k` tokens of the order cut: (inputs, messages shortened,
        messages dropped, documents shortened)."""
        conversation = [dict(m) for m in self.inputs["conversation"]]
        documents = [dict(d) for d in self.inputs.get("documents") or []]
        shortened: list[int] = []
        shortened_documents: list[int] = []
        dropped: list[int] = []
        members: list[int] = []  # the current exchange's messages
        exhausted = True  # every piece of the current exchange reached and cut whole
        remaining = k
        for at, piece in enumerate(self.order):
            if not isinstance(piece, _Piece):  # the end of an exchange
                if members and exhausted:
                    dropped.extend(members)
                members, exhausted = [], True
                continue
            if piece.exchange is not None:
                members.append(piece.index)
            if remaining <= 0:  # not reached (a piece the cut only touches the end of is not passed)
                exhausted = False
                continue
            size = len(self.starts(at))
            removed = min(remaining, size)
            remaining -= removed
            exhausted = exhausted and removed == size
            if removed == 0:
                continue
            kept = _kept(piece.text, self.starts(at), removed, self.side)
            if piece.kind == "message":
                conversation[piece.index]["content"] = kept
                shortened.append(piece.index)
            else:
                documents[piece.index]["text"] = kept
                shortened_documents.append(piece.index)
        gone = set(dropped)
        inputs = dict(self.inputs)
        inputs["conversation"] = [m for i, m in enumerate(conversation) if i not in gone]
        if "documents" in self.inputs:
            inputs["documents"] = documents
        kept_shortened = tuple(sorted(i for i in shortened if i not in gone))
        return inputs, kept_shortened, tuple(sorted(gone)), tuple(sorted(shortened_documents))


def truncate_chat(
    inputs: dict[str, Any],
    prompt: Prompt,
    limit: int,
    side: Side,
    render: Callable[[dict[str, Any]], Prompt],
    token_starts: Callable[[str], list[int]],
) -> ChatCut:
    """`prompt` (the render of `inputs`) cut to at most `limit` tokens, as the module says.

    `render(inputs)` renders template inputs as the request does; `token_starts(text)` gives the
    character offsets where each token of a client string starts, tokenized as client text is.
    Raises ContextLengthExceededError when even the most the order can cut leaves too many tokens.
    """
    before = len(prompt.token_ids)
    if before <= limit:
        return ChatCut(inputs, prompt, Truncation(side, limit, before, before))
    cutter = _Cutter(inputs, side, token_starts)  # never mutates `inputs`: it copies what it cuts
    k = k_over = 0
    current, cut = prompt, (inputs, (), (), ())
    steps = 0
    while len(current.token_ids) > limit:
        over = len(current.token_ids) - limit
        steps += 1
        if steps > _LINEAR_STEPS:  # guard against many one-token corrections
            over <<= steps - _LINEAR_STEPS
        nxt = cutter.advance(k, over)
        if nxt is None or nxt == k:
            raise ContextLengthExceededError(
                f"The prompt cannot be truncated to {limit} tokens: the parts that are never cut (the "
                f"template's own tokens, tool definitions, tool calls, names, document titles and "
                f"metadata) take {len(current.token_ids)} tokens with every message's and document's text cut.",
                param=PARAM,
            )
        k_over, k = k, nxt
        cut = cutter.apply(k)
        current = render(cut[0])
    # Dropping an exchange frees its turns' template tokens too, and a cut token may take a merge
    # with it: give back what the cut took beyond the budget while that still fits.
    for _ in range(_GIVE_BACK_STEPS):
        slack = limit - len(current.token_ids)
        if slack <= 0 or k - slack <= k_over:
            break
        fewer = cutter.apply(k - slack)
        shorter_cut = render(fewer[0])
        if len(shorter_cut.token_ids) > limit:
            break
        k, cut, current = k - slack, fewer, shorter_cut
    new_inputs, truncated, dropped, documents = cut
    return ChatCut(
        new_inputs,
        current,
        Truncation(side, limit, before, len(current.token_ids), truncated, dropped, documents),
    )
