"""The benchmark's HTTP client: keep-alive HTTP/1.1 connections, chunked-body decoding and SSE
event splitting, nothing more.

It runs on the same two cores as the system under test, so every cycle it spends is taken from
that system (the engine core shares a core with the API server and the client). httpx spent
0.15-0.28 ms of CPU per streamed token here, about as much as the API server itself; this client
spends a fraction of that, so the numbers measure the servers rather than the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator


class HTTPError(Exception):
    """The connection broke or the server answered with something that is not HTTP/1.1."""


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._body_pending = False  # a response body not read to its end: the connection cannot be reused

    async def _ensure_open(self) -> None:
        if self._body_pending:
            self.close()
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
            self._body_pending = False

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def post(self, path: str, body: dict) -> tuple[int, AsyncIterator[bytes]]:
        """Send a JSON POST; return the status and an iterator over the body's bytes as they arrive."""
        await self._ensure_open()
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self._writer.write(head.encode() + payload)
        self._body_pending = True
        try:
            header_block = await self._reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            self.close()
            raise HTTPError(f"no response: {exc!r}") from exc
        status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            self.close()
            raise HTTPError(f"not an HTTP response: {status_line!r}") from None
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("connection", "").lower() == "close":
            return status, self._body_then_close(headers)
        return status, self._body(headers)

    async def _body_then_close(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        async for data in self._body(headers):
            yield data
        self.close()

    async def _body(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        reader = self._reader
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
                    data = await reader.readexactly(size + 2)
                    yield data[:-2]
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields, up to the blank line that ends the message
            elif "content-length" in headers:
                length = int(headers["content-length"])
                if length:
                    yield await reader.readexactly(length)
            else:  # the body runs to the end of the connection
                yield await reader.read()
                self.close()
                return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError) as exc:
            self.close()
            raise HTTPError(f"broken response body: {exc!r}") from exc
        self._body_pending = False


async def chat_stream(conn: Connection, body: dict) -> dict:
    """One streaming chat completion: time to first content, gaps between content chunks, the
    completion token count from the usage chunk, and the content itself."""
    start = time.perf_counter()
    status, data = await conn.post("/v1/chat/completions", body)
    first, last, gaps, tokens, done, text = None, None, [], 0, False, []
    buffer = b""
    async for piece in data:
        now = time.perf_counter()
        buffer += piece
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                if content := choice["delta"].get("content"):
                    text.append(content)
                    if first is None:
                        first = now - start
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
    ok = status == 200 and done and tokens > 0
    end = time.perf_counter() - start
    return {"ttft": first, "gaps": gaps, "tokens": tokens, "ok": ok, "end": end, "text": "".join(text)}


async def chat(conn: Connection, body: dict) -> dict:
    """One non-streaming chat completion."""
    start = time.perf_counter()
    status, data = await conn.post("/v1/chat/completions", body)
    raw = b"".join([piece async for piece in data])
    end = time.perf_counter() - start
    tokens = json.loads(raw)["usage"]["completion_tokens"] if status == 200 else 0
    return {"ttft": end, "gaps": [], "tokens": tokens, "ok": status == 200 and tokens > 0, "end": end}
