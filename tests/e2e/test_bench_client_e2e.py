"""The benchmark's lean HTTP client reads the live server as the OpenAI client does: the same text
and token count, errors seen as errors, and one connection kept across requests."""

import asyncio

from bench import client as bench_client

MESSAGES = [{"role": "user", "content": "Hi"}]
BODY = {"model": "jamba-tiny-dev", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _two_on_one_connection(base_url: str, first, second) -> tuple[dict, dict, bool]:
    """Run two (send, body) requests one after the other on one connection; also say whether the
    second went over the same socket as the first."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)

    async def run():
        conn = bench_client.Connection(host, int(port))

        def local_port() -> int:
            return conn._writer.get_extra_info("sockname")[1]

        try:
            one = await first[0](conn, first[1])
            before = local_port()
            two = await second[0](conn, second[1])
            return one, two, before == local_port()
        finally:
            conn.close()

    return asyncio.run(run())


def test_stream_and_non_stream_match_the_openai_client(server, client):
    stream_body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}

    streamed, whole, same_connection = _two_on_one_connection(
        server.base_url, (bench_client.chat_stream, stream_body), (bench_client.chat, BODY)
    )
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
    bad, good, same_connection = _two_on_one_connection(
        server.base_url, (bench_client.chat, {**BODY, "model": "no-such-model"}), (bench_client.chat, BODY)
    )
    assert not bad["ok"] and bad["tokens"] == 0
    assert good["ok"] and good["tokens"] == 8
    assert same_connection
