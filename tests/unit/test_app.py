"""The app's startup sequence (engine start, then readiness) with the engine left out."""

import contextlib
import gc
import threading
import time

from fastapi.testclient import TestClient

from jamba_server.http.app import create_app
from jamba_server.settings import Settings


class EngineStartOnly:
    """What the startup sequence touches on the engine adapter; `start` records the heap's state."""

    max_num_seqs = 4
    max_model_len = 64
    dead = False

    def __init__(self, finish_start: threading.Event | None = None) -> None:
        self.ready = False
        self.frozen_at_start: int | None = None
        self.finish_start = finish_start

    def start(self) -> None:
        self.frozen_at_start = gc.get_freeze_count()
        self.ready = True
        if self.finish_start is not None:  # the engine is up; the start call has not returned yet
            assert self.finish_start.wait(10)

    def shutdown(self) -> None:
        pass


def wait_until(predicate, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_startup_heap_is_frozen_once_the_engine_is_up():
    gc.unfreeze()
    adapter = EngineStartOnly()
    try:
        with TestClient(create_app(Settings(model="m"), adapter)) as client:
            assert wait_until(lambda: client.get("/ready").status_code == 200)
            # Nothing frozen before the engine start, the whole heap after it: full collections
            # then skip the startup objects instead of pausing the event loop to walk them.
            assert adapter.frozen_at_start == 0
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def client_with_engine_held():
    """A running app whose engine is up (`adapter.ready`) while its start call has not returned;
    setting the yielded event lets the start finish."""
    finish_start = threading.Event()
    adapter = EngineStartOnly(finish_start)
    app = create_app(Settings(model="m"), adapter)
    try:
        with TestClient(app) as client:
            try:
                assert wait_until(lambda: adapter.ready)
                yield client, app.state.server, finish_start
            finally:
                finish_start.set()  # before the client's exit waits for the start thread
    finally:
        gc.unfreeze()


def test_not_ready_until_admission_is_sized_for_the_engine():
    with client_with_engine_held() as (client, state, finish_start):
        # The adapter reports ready, but the server has not sized admission to the engine yet:
        # a request admitted now would be missing from the running gauge and the drain.
        assert client.get("/ready").status_code == 503
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        refused = client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 503
        assert "loading" in refused.json()["error"]["message"]
        finish_start.set()
        assert wait_until(lambda: client.get("/ready").status_code == 200)
        assert state.admission.max_running == EngineStartOnly.max_num_seqs


def test_drain_begun_while_loading_survives_the_engine_start():
    with client_with_engine_held() as (client, state, finish_start):
        state.admission.start_draining()  # what a SIGTERM during model load does first
        finish_start.set()
        assert wait_until(lambda: state.readiness.started)
        refused = client.get("/ready")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"


class EngineWithABug(EngineStartOnly):
    """`/v1/models` reads `max_model_len`; here that raises, as a bug in a route would."""

    @property
    def max_model_len(self) -> int:
        raise RuntimeError("a bug")


def test_unhandled_error_is_a_500_with_request_id_counted_as_500():
    from prometheus_client import REGISTRY

    def count(status: str) -> float:
        labels = {"route": "/v1/models", "method": "GET", "status": status, "model": ""}
        return REGISTRY.get_sample_value("jamba_http_requests_total", labels) or 0.0

    app = create_app(Settings(model="m"), EngineWithABug())
    before_500, before_499 = count("500"), count("499")
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/v1/models", headers={"x-request-id": "bug-1"})
    gc.unfreeze()
    assert resp.status_code == 500
    assert resp.headers.get("x-request-id") == "bug-1"
    assert resp.json()["error"] == {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert (count("500"), count("499")) == (before_500 + 1, before_499)
