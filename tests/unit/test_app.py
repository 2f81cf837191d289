"""The app's startup sequence (engine start, then readiness) with the engine left out."""

import gc

from fastapi.testclient import TestClient

from jamba_server.app import create_app
from jamba_server.settings import Settings


class EngineStartOnly:
    """What the startup sequence touches on the engine adapter; `start` records the heap's state."""

    max_num_seqs = 4
    max_model_len = 64
    dead = False

    def __init__(self) -> None:
        self.ready = False
        self.frozen_at_start: int | None = None

    def start(self) -> None:
        self.frozen_at_start = gc.get_freeze_count()
        self.ready = True

    def shutdown(self) -> None:
        pass


def test_startup_heap_is_frozen_once_the_engine_is_up():
    gc.unfreeze()
    adapter = EngineStartOnly()
    try:
        with TestClient(create_app(Settings(model="m"), adapter)) as client:
            for _ in range(200):
                if client.get("/ready").status_code == 200:
                    break
            assert client.get("/ready").status_code == 200
            # Nothing frozen before the engine start, the whole heap after it: full collections
            # then skip the startup objects instead of pausing the event loop to walk them.
            assert adapter.frozen_at_start == 0
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
