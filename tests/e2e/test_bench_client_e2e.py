"""The benchmark's lean HTTP client reads the live server as the OpenAI client does: same token
counts, same number of content chunks, errors seen as errors, connections reused."""

import asyncio

from bench import client as bench_client

BODY = {"model": "jamba-tiny-dev", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}


def _split(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def test_stream_and_non_stream_match_the_openai_client(server, client):
    stream_body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}

    async def run():
        conn = bench_client.Connection(*_split(server.base_url))
        try:
            return [await bench_client.chat_stream(conn, stream_body), await bench_client.chat(conn, BODY)]
        finally:
            conn.close()

    streamed, whole = asyncio.run(run())
    chunks = list(
        client.chat.completions.create(
            model="jamba-tiny-dev", messages=BODY["messages"], max_tokens=8, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert streamed["ok"] and streamed["tokens"] == 8 == chunks[-1].usage.completion_tokens
    assert streamed["ttft"] is not None and streamed["ttft"] <= streamed["end"]
    # One gap between each pair of content chunks; chunk boundaries depend on the detokenizer,
    # so compare with what the OpenAI client saw within the same bounds.
    assert 0 <= len(streamed["gaps"]) < 8 and 1 <= content_chunks <= 8
    assert whole["ok"] and whole["tokens"] == 8


def test_error_status_is_not_ok_and_the_connection_stays_usable(server):
    async def run():
        conn = bench_client.Connection(*_split(server.base_url))
        try:
            bad = await bench_client.chat(conn, {**BODY, "model": "no-such-model"})
            good = await bench_client.chat(conn, BODY)
            return bad, good
        finally:
            conn.close()

    bad, good = asyncio.run(run())
    assert not bad["ok"] and bad["tokens"] == 0
    assert good["ok"] and good["tokens"] == 8
