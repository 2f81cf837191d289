"""The multi-turn RAG point: conversations over a long document, time to first token of each turn,
jamba-server with vLLM's prefix cache on against off (issue 17's goal: turns 2-4 TTFT p50 with the
cache at most a third of the figure without it).

8 conversations run in parallel, each over its own ~3,000-token document and 4 turns (a reply is
streamed, then appended to the history with the next question). Two placements of the document:
- `system`: in the system message, where it stays the prompt's prefix on every turn;
- `documents`: Jamba's `documents` field, which Jamba 1.5's chat format renders just before the
  *last* user message, so each turn moves it after the previous turns: the prompt shares only the
  system message with the previous turn's, and a prefix cache cannot serve the document.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import client

CONVERSATIONS, TURNS, DOC_TOKENS, REPLY_TOKENS = 8, 4, 3000, 32
PLACEMENTS = ("system", "documents")
WORDS = ("river", "harbor", "ledger", "copper", "meadow", "signal", "lantern", "quarry", "orchard", "tide",
         "beacon", "granite", "willow", "market", "furnace", "canal", "thistle", "mill", "pier", "ember")  # fmt: skip
QUESTIONS = ("What does the document say about the harbor?", "Who kept the ledger?",
             "Summarize the part about the quarry.", "What happened at the mill?")  # fmt: skip


def document(seed: int, tokens: int, count_tokens) -> str:
    """Deterministic filler text of about `tokens` tokens (counted with the model's tokenizer)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while True:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
        if len(sentences) % 20 == 0 and count_tokens(" ".join(sentences)) >= tokens:
            return " ".join(sentences)


def first_request(name: str, doc: str, placement: str) -> dict[str, Any]:
    system = "You answer questions about the document."
    body: dict[str, Any] = {"model": name, "max_tokens": REPLY_TOKENS, "temperature": 0.0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if placement == "system":
        body["messages"] = [{"role": "system", "content": f"{system}\n\nDocument:\n{doc}"}]
    else:
        body["messages"] = [{"role": "system", "content": system}]
        body["documents"] = [{"title": "Report", "text": doc}]
    return body


async def conversation(host: str, port: int, body: dict[str, Any]) -> list[float | None]:
    """One conversation's turns in order; each turn's time to first token (None: the turn failed)."""
    conn = client.Connection(host, port)
    ttfts: list[float | None] = []
    try:
        for turn in range(TURNS):
            body["messages"].append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            result = await client.chat_stream(conn, body)
            ttfts.append(result["ttft"] if result["ok"] else None)
            body["messages"].append({"role": "assistant", "content": result.get("text") or "..."})
    finally:
        conn.close()
    return ttfts


async def rag_point(base_url: str, name: str, docs: list[str], placement: str) -> dict[str, Any]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    start = time.perf_counter()
    runs = await asyncio.gather(*(conversation(host, int(port), first_request(name, doc, placement)) for doc in docs))
    by_turn = [[run[t] for run in runs] for t in range(TURNS)]
    later = [v for turn in by_turn[1:] for v in turn if v is not None]
    return {
        "seconds": time.perf_counter() - start,
        "ttft_p50_by_turn": [statistics.median(v for v in turn if v is not None) if any(turn) else None for turn in by_turn],
        "ttft_p50_turns_2_4": statistics.median(later) if later else None,
        "failed_turns": sum(v is None for turn in by_turn for v in turn),
    }  # fmt: skip
