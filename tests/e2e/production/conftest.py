"""Production behaviour against one live server with small limits (config.FLAGS), shared by every
module in this package: `server` here overrides the session's default server for them, and `http`
sends a valid API key. (Disconnects, deadlines and drains: ../test_lifecycle_e2e.py.)"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.production.config import AUTH, FLAGS
from tests.support import start_server


@pytest.fixture(scope="package")
def server(dev_model):
    proc = start_server(*FLAGS)
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120) as c:
        yield c
