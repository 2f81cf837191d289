"""`priority` on a server run with --scheduling-policy priority: accepted, passed to vLLM's priority
scheduler, and it orders our own admission queue (lower first). The default (fcfs) server's 400 is
in test_request_options_e2e.py."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from tests.support import MODEL_NAME, start_server, wait_for


@pytest.fixture(scope="module")
def server(dev_model):
    proc = start_server("--scheduling-policy", "priority", "--max-concurrent-requests", "1")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def test_priority_is_accepted_by_a_priority_scheduling_server(client):
    done = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, extra_body={"priority": -5})
    assert done.choices[0].finish_reason in {"stop", "length"}


def _served_order(server, ids: dict[str, str]) -> list[str]:
    """The names of `ids` (name → response id) in the order the server finished them: its access
    log, written as each request ends. With one slot that is the order they were admitted; the
    clients' own order of return can differ on a loaded machine."""
    names = {rid: name for name, rid in ids.items()}
    order = []
    for line in server.log_path.read_text().splitlines():
        if line.startswith("{") and '"jamba_server.access"' in line:
            rid = json.loads(line).get("engine_request_id")
            if rid in names:
                order.append(names[rid])
    return order


def test_queued_requests_are_admitted_lower_priority_first(server, client):
    ids: dict[str, str] = {}

    def send(name: str, priority: int) -> None:
        done = client.completions.create(
            model=MODEL_NAME, prompt="Hello", max_tokens=3, extra_body={"priority": priority, "ignore_eos": True}
        )
        ids[name] = done.id

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        with server.engine_paused():  # the first request holds the one slot; the others must queue
            futures = [pool.submit(send, "first", 0)]
            wait_for(lambda: server.metric("jamba_requests_running") == 1, 30, server.request_gauges)
            futures.append(pool.submit(send, "later", 5))
            wait_for(lambda: server.metric("jamba_requests_queued") == 1, 30, server.request_gauges)
            futures.append(pool.submit(send, "urgent", -5))
            wait_for(lambda: server.metric("jamba_requests_queued") == 2, 30, server.request_gauges)
        for future in futures:
            future.result(timeout=300)
    # The access log line is written as the response ends, so it can trail the client's return.
    wait_for(lambda: len(_served_order(server, ids)) == 3, 30, lambda: f"logged: {_served_order(server, ids)}")
    assert _served_order(server, ids) == ["first", "urgent", "later"]
