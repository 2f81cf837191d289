"""The production modules' server settings (small limits, two API keys, a short queue, a small
Responses store) and the
chat body they send; conftest.py starts the one server with FLAGS."""

from __future__ import annotations

from tests.support import MODEL_NAME

KEY = "test-key-1-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS, QUEUE = 4, 4
STORED_RESPONSES = 2
FLAGS = [
    "--max-num-seqs", str(SLOTS), "--max-concurrent-requests", str(SLOTS), "--max-queued-requests", str(QUEUE),
    "--api-key", KEY, "--api-key", "test-key-2-0123456789abcdef", "--retry-after-seconds", "2",
    "--max-tokens-limit", "256", "--max-body-bytes", "65536",
    "--max-messages", "8", "--max-n", "2", "--max-stop-sequences", "2", "--max-stop-length", "10",
    "--max-tools", "2", "--max-schema-bytes", "512", "--max-documents", "2", "--max-document-chars", "100",
    "--responses-store-max-entries", str(STORED_RESPONSES),
]  # fmt: skip
MSG = [{"role": "user", "content": "Tell me a long story."}]


def chat_body(**fields):
    return {"model": MODEL_NAME, "messages": MSG, "max_tokens": 4, **fields}
