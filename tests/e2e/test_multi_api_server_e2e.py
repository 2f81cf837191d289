"""`--api-server-count 2`: a supervisor, one engine core and two API worker processes on one socket
(runtime/vllm_api_servers.py), against a live server through its HTTP API.

Correctness, not speed: both workers answer chat and completions alike, requests on separate
connections reach both, `/metrics` from either worker counts the whole server's requests (ours and
vLLM's), and SIGTERM drains both workers and ends every process with exit status 0."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.support import MODEL_NAME, sample, start_server, wait_for

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8, "temperature": 0}
COMPLETION = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
CHAT_REQUESTS = 20
COMPLETION_REQUESTS = 4
CHAT_COUNTER = ('jamba_http_requests_total', f'method="POST",model="{MODEL_NAME}",route="/v1/chat/completions",status="200"')


@pytest.fixture(scope="module")
def server(dev_model):
    """The last test stops it (SIGTERM) and checks how it ends."""
    proc = start_server("--api-server-count", "2")
    try:
        # /ready answers from whichever worker took the connection: wait until both are attached
        # (the merged readiness gauge is the least over the workers).
        wait_for(lambda: proc.metric("jamba_engine_ready") == 1, 120, "both API workers attached to the engine")
    except BaseException:
        proc.stop()
        raise
    yield proc
    proc.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    """On a connection of its own (httpx.post opens one per call)."""
    return httpx.post(server.base_url + path, json=body, timeout=120)


def workers_of(server, responses: list[httpx.Response]) -> list[int]:
    """The API worker that served each response, from the access log (by request id)."""
    ids = [r.headers["x-request-id"] for r in responses]
    wait_for(lambda: set(ids) <= set(server.access_log()), 30, "the requests' access-log lines")
    logged = server.access_log()
    return [logged[i]["api_worker"] for i in ids]


def test_chat_and_completions_answer_alike_from_both_workers(server):
    with ThreadPoolExecutor(4) as pool:
        chats = list(pool.map(lambda _: post(server, "/v1/chat/completions", CHAT), range(CHAT_REQUESTS)))
        completions = list(pool.map(lambda _: post(server, "/v1/completions", COMPLETION), range(COMPLETION_REQUESTS)))
    assert [r.status_code for r in chats + completions] == [200] * (CHAT_REQUESTS + COMPLETION_REQUESTS)
    # Greedy: one answer, whichever worker served it.
    assert len({r.json()["choices"][0]["message"]["content"] for r in chats}) == 1
    texts = {r.json()["choices"][0]["text"] for r in completions}
    assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 8 for r in completions)
    assert set(workers_of(server, chats)) == {0, 1}


def test_metrics_from_either_worker_count_the_whole_server(server):
    wait_for(lambda: server.metric(*CHAT_COUNTER) == CHAT_REQUESTS, 30, lambda: f"chat counter {server.metric(*CHAT_COUNTER)}")
    clients: list[httpx.Client] = []
    scrapes: list[httpx.Response] = []
    try:
        # Each client keeps its connection open, so the next connection goes to the less loaded worker.
        while len(set(workers_of(server, scrapes))) < 2:
            assert len(clients) < 10, "ten scrapes on separate connections all reached one worker"
            clients.append(httpx.Client(base_url=server.base_url, timeout=30))
            scrapes.append(clients[-1].get("/metrics"))
        for scrape in scrapes:
            text = scrape.text
            assert sample(text, *CHAT_COUNTER) == CHAT_REQUESTS
            # vLLM's own metrics merged too: every generation request finished once in the engine.
            finished = sum(
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total{")
            )  # fmt: skip
            assert finished == CHAT_REQUESTS + COMPLETION_REQUESTS
            assert sample(text, "jamba_admission_limit", 'kind="running"') == 32  # the dev config's max_num_seqs, split 16 + 16
            assert sample(text, "jamba_requests_running") == 0
    finally:
        for client in clients:
            client.close()


def test_sigterm_drains_both_workers_and_ends_every_process(server):
    """Last: two requests admitted while the engine is paused (so neither can have finished), SIGTERM
    to the supervisor: new work is refused, both finish, then every process exits, the supervisor 0."""
    processes = psutil.Process(server.proc.pid).children(recursive=True)
    assert len(processes) >= 3, processes  # two API workers, the engine core (and its worker)
    with ThreadPoolExecutor(2) as pool:
        with server.engine_paused():
            in_flight = [pool.submit(post, server, "/v1/chat/completions", CHAT) for _ in range(2)]
            wait_for(lambda: server.metric("jamba_requests_running") == 2, 30, lambda: server.request_gauges())
            server.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(server.base_url + "/ready").status_code == 503, 10, "/ready 503 while draining")
            refused = post(server, "/v1/chat/completions", CHAT)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        answers = [future.result() for future in in_flight]
    assert [a.status_code for a in answers] == [200, 200]
    assert server.proc.wait(90) == 0, server.log_tail()
    wait_for(lambda: not [p for p in processes if _alive(p)], 10, lambda: f"processes left: {[p for p in processes if _alive(p)]}")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
