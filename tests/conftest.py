"""Fixtures: the dev model path and the session's shared server; hooks that attach a failed test's
server log lines to its report. Helpers live in tests/support.py."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support import DEV_MODEL, SERVERS, TRAINED_MODEL, ServerProcess, log_size, start_server


def _built(model: Path) -> Path:
    if not (model / "config.json").exists():
        pytest.fail(f"{model} missing: run `make model` (make test does it)")
    return model


@pytest.fixture(scope="session")
def dev_model() -> Path:
    return _built(DEV_MODEL)


@pytest.fixture(scope="session")
def trained_model() -> Path:
    return _built(TRAINED_MODEL)


LOG_OFFSETS = pytest.StashKey[dict[int, int]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[LOG_OFFSETS] = {id(server): log_size(server) for server in SERVERS}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report carries what its servers logged meanwhile as warnings and errors
    (CI keeps the report, not the servers' log files)."""
    report = yield
    if report.failed and call.when == "call":
        offsets = item.stash.get(LOG_OFFSETS, {})
        for server in SERVERS:
            since = offsets.get(id(server), 0)
            if log_size(server) <= since:
                continue
            try:
                notable = server.notable_log_lines(since)
            except OSError as exc:
                notable = f"(log unreadable: {exc})"
            report.sections.append((f"server {server.port} log during the test (warnings, errors)", notable))
    return report


@pytest.fixture(scope="session")
def server(dev_model: Path) -> Iterator[ServerProcess]:
    """One dev-model server shared by the end-to-end modules that need default settings."""
    proc = start_server()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="session")
def trained_server(trained_model: Path) -> Iterator[ServerProcess]:
    """One trained-model server (default settings otherwise) for the modules about what it writes."""
    proc = start_server("--model", str(trained_model))
    yield proc
    assert proc.stop() == 0, proc.log_tail()
