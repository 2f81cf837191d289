"""The benchmark's lean HTTP client reads the live server as the OpenAI client does: the same text
and token count, errors seen as errors, and one connection kept across requests."""

import asyncio

from bench import client as bench_client

MESSAGES = [{"role": "user", "content": "Hi"}]
BODY = {"model": "jamba-tiny-dev", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _connection(base_url: str) -> bench_client.Connection:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return bench_client.Connection(host, int(port))


def _local_port(conn: bench_client.Connection) -> int:
    return conn._writer.get_extra_info("sockname")[1]


def test_stream_and_non_stream_match_the_openai_client(server, client):
    stream_body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}

    async def run():
        conn = _connection(server.base_url)
        try:
            streamed = await bench_client.chat_stream(conn, stream_body)
            port = _local_port(conn)
            whole = await bench_client.chat(conn, BODY)
            return streamed, whole, port == _local_port(conn)
        finally:
            conn.close()

    streamed, whole, same_connection = asyncio.run(run())
    chunks = list(
        client.chat.completions.create(
            model="jamba-tiny-dev", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    openai_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed["ok"] and streamed["tokens"] == 8 == chunks[-1].usage.completion_tokens
    assert streamed["text"] == openai_text and openai_text  # greedy: the same tokens, read the same way
    assert streamed["ttft"] is not None and streamed["ttft"] <= streamed["end"]
    assert whole["ok"] and whole["tokens"] == 8
    assert same_connection


def test_error_status_is_not_ok_and_the_connection_stays_usable(server):
    async def run():
        conn = _connection(server.base_url)
        try:
            bad = await bench_client.chat(conn, {**BODY, "model": "no-such-model"})
            port = _local_port(conn)
            good = await bench_client.chat(conn, BODY)
            return bad, good, port == _local_port(conn)
        finally:
            conn.close()

    bad, good, same_connection = asyncio.run(run())
    assert not bad["ok"] and bad["tokens"] == 0
    assert good["ok"] and good["tokens"] == 8
    assert same_connection
