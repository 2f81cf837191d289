"""`jamba-server` command: settings → engine adapter → FastAPI app → uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Sequence

from jamba_server.settings import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        settings.chat_template_text()
    except SettingsError as exc:
        print(f"jamba-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Preset environment (e.g. VLLM_FUSED_MOE_CHUNK_SIZE) must be in place before vLLM is imported;
    # a variable already set in the real environment wins.
    for name, value in settings.env.items():
        os.environ.setdefault(name, value)

    import uvicorn

    from jamba_server.app import create_app
    from jamba_server.engine import EngineAdapter

    exit_code = 0
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    app = create_app(settings, EngineAdapter(settings), on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="uvloop",
        http="httptools",
        access_log=False,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it has shut down; a drained SIGTERM/SIGINT
    # is a clean exit (status 0), so make that re-raise a no-op.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return exit_code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
