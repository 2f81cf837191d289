"""Long-document RAG through the live server: `truncate_prompt_tokens` / `truncation_side` on chat and
completions (openai client's `extra_body`), the Responses API's `truncation: "auto"`; the dev
server's context is 4,096 tokens (configs/dev-cpu.yaml)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.support import CONTROL_IDS, MODEL_NAME

CONTEXT = 4096
DOCUMENT = " ".join(f"fact{i}" for i in range(3000))  # ~12K tokens
QUESTION = "Which fact comes last?"
SYSTEM = "Answer from the documents only."


def _controls(ids):
    return [i for i in ids if i in CONTROL_IDS]


MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
DOCUMENTS = [{"text": DOCUMENT, "title": "Facts"}]


def _rag(client, extra_body=None, **fields):
    """The RAG chat request (documents are an extension: they go in `extra_body`)."""
    return client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, extra_body={"documents": DOCUMENTS, **(extra_body or {})}, **fields
    )


def test_a_document_over_the_context_is_cut_and_the_cut_reported(client, http):
    full = http.post("/tokenize", json={"messages": MESSAGES, "documents": DOCUMENTS}).json()
    assert full["count"] > 2 * CONTEXT
    with pytest.raises(openai.BadRequestError) as refused:
        _rag(client, max_tokens=8)
    assert refused.value.body["code"] == "context_length_exceeded"

    resp = _rag(client, {"truncate_prompt_tokens": -1, "return_token_ids": True}, max_tokens=8)
    ids = resp.prompt_token_ids
    # Room left for max_tokens, and not much more (a cut ends where a token of the text starts, and the
    # text's tokens around the cut may merge differently).
    assert resp.usage.prompt_tokens == len(ids) and CONTEXT - 8 - 3 <= len(ids) <= CONTEXT - 8
    assert resp.prompt_truncation == {
        "side": "left", "limit": CONTEXT - 8, "prompt_tokens_before": full["count"], "tokens_removed": full["count"] - len(ids),
        "messages_truncated": [], "messages_dropped": [], "documents_truncated": [0],
    }  # fmt: skip
    # Every control token of the untruncated render, in order; the system prompt and the question whole.
    assert _controls(ids) == _controls(full["tokens"])
    text = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert f"<|system|> {SYSTEM}<|eom|>" in text and f"<|user|> {QUESTION}<|eom|><|bom|><|assistant|>" in text
    assert "fact2999\n</documents>" in text and "fact0 " not in text  # left: the document's end is kept


def test_right_keeps_the_documents_beginning_and_streams_the_report_first(client):
    stream = _rag(client, {"truncate_prompt_tokens": 3000, "truncation_side": "right"}, max_tokens=4, stream=True)
    chunks = list(stream)
    report = chunks[0].prompt_truncation
    assert report["side"] == "right" and report["limit"] == 3000 and report["documents_truncated"] == [0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(getattr(chunk, "prompt_truncation", None) is None for chunk in chunks[1:])
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_token_ids_cut_left_keep_the_last(client):
    prompt = [20 + i % 600 for i in range(5000)]
    resp = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=6, extra_body={"truncate_prompt_tokens": -1, "return_token_ids": True}
    )
    assert resp.prompt_token_ids == prompt[-(CONTEXT - 6):]
    assert resp.prompt_truncation == {"side": "left", "limit": CONTEXT - 6, "prompt_tokens_before": 5000, "tokens_removed": 5000 - CONTEXT + 6}
    right = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=6,
        extra_body={"truncate_prompt_tokens": 1000, "truncation_side": "right", "return_token_ids": True},
    )  # fmt: skip
    assert right.prompt_token_ids == prompt[:1000]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"truncate_prompt_tokens": CONTEXT + 1}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -1, "truncation_side": "middle"}, "truncation_side"),
        ({"truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),  # below what is never cut
    ],
)
def test_out_of_range_truncation_is_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        _rag(client, extra, max_tokens=4)
    assert refused.value.body["param"] == param


def test_responses_truncation_auto(client):
    long_input = "Please consider this. " * 1500
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL_NAME, input=long_input, max_output_tokens=16)
    resp = client.responses.create(model=MODEL_NAME, input=long_input, max_output_tokens=16, truncation="auto", store=False)
    assert resp.truncation == "auto" and CONTEXT - 16 - 3 <= resp.usage.input_tokens <= CONTEXT - 16


def test_messages_api_has_no_truncation_field(server):
    with anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0) as claude:
        with pytest.raises(anthropic.BadRequestError) as refused:
            claude.messages.create(
                model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                extra_body={"truncate_prompt_tokens": -1},
            )  # fmt: skip
    assert "truncate_prompt_tokens" in refused.value.message
