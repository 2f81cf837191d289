"""One server's runtime: the engine, admission, readiness, the runner and the Responses API's
store, the served model's identity, and the engine's start and death watch. The HTTP layer holds one `Server` (app.state)."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Callable

from jamba_server import __version__
from jamba_server.errors import ModelNotFoundError
from jamba_server.metrics import ADMISSION_LIMIT, BUILD_INFO, ENGINE_READY, observed_gauge
from jamba_server.runtime.admission import controller_for, running_limit
from jamba_server.runtime.backend import Engine
from jamba_server.runtime.readiness import Readiness
from jamba_server.runtime.response_store import ResponseStore
from jamba_server.runtime.runner import Runner
from jamba_server.settings import Settings

logger = logging.getLogger(__name__)

ENGINE_DEATH_EXIT_DELAY_S = 2.0


def freeze_startup_heap() -> None:
    """Take everything alive once the engine is up (torch, transformers, the tokenizer, vLLM's
    client) out of the garbage collector's reach, as vLLM's own server does. Without this, each
    full collection walks that heap with the event loop stopped: 250-420 ms pauses were seen on
    the dev model, stalling every stream and every arrival behind them."""
    gc.collect()
    gc.freeze()


class Server:
    def __init__(self, settings: Settings, engine: Engine, engine_version: str = ""):
        self.settings = settings
        self.engine = engine
        self.engine_version = engine_version
        self.chat_template = settings.chat_template_text()
        self.model_name = settings.public_model_name
        self.model_aliases = {self.model_name, settings.model}
        self.admission = controller_for(settings, None)
        self.readiness = Readiness(engine, self.admission)
        self.runner = Runner(engine, self.admission, settings.drain_timeout)
        self.publish_engine_ready: Callable[[], None] = lambda: None
        self.responses = ResponseStore(
            settings.responses_store_max_entries, settings.responses_store_max_bytes, settings.responses_store_ttl
        )

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_aliases:
            raise ModelNotFoundError(
                f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                param="model",
            )

    def engine_started(self) -> None:
        """Size admission to the engine, then open for requests."""
        self.admission.resize(running_limit(self.settings, self.engine.max_num_seqs))
        ADMISSION_LIMIT.labels("running").set(self.admission.max_running)
        ADMISSION_LIMIT.labels("queued").set(self.admission.max_queued)
        self.readiness.started = True
        self.publish_engine_ready = observed_gauge(ENGINE_READY, lambda: 1.0 if self.engine.ready else 0.0)
        BUILD_INFO.labels(
            __version__,
            self.engine_version,
            self.model_name,
            str(self.settings.tensor_parallel_size),
            self.settings.quantization or "none",
        ).set(1)
        logger.info("engine ready: %s (max_model_len=%d)", self.model_name, self.engine.max_model_len)

    async def start_engine(self) -> None:
        """Load the engine (off the event loop), freeze the start-up heap and open admission; a
        failure is kept as readiness's start error, logged and raised."""
        try:
            await asyncio.to_thread(self.engine.start)
            freeze_startup_heap()
        except BaseException as exc:
            self.readiness.start_error = exc
            logger.exception("engine failed to start")
            raise
        self.engine_started()

    async def run_engine(self, fatal: Callable[[str], None]) -> None:
        """Start the engine, then watch it: `fatal` is called if it fails to start or dies."""
        try:
            await self.start_engine()
        except BaseException as exc:  # noqa: BLE001 - any start failure ends the process
            fatal(f"engine failed to start: {exc}")
            return
        while not self.engine.dead:
            await asyncio.sleep(0.5)
        self.publish_engine_ready()
        # Stay up briefly so in-flight requests get their 503s and probes see /health fail, then
        # exit non-zero for the orchestrator to restart us.
        logger.error("the engine died; exiting in %.0fs", ENGINE_DEATH_EXIT_DELAY_S)
        await asyncio.sleep(ENGINE_DEATH_EXIT_DELAY_S)
        fatal("the engine died")

    async def drain(self) -> None:
        await self.runner.drain()
