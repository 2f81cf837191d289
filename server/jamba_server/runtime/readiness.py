"""The server's one readiness state, and the 503 each state gives a request.

    loading ──engine up──▶ ready ──SIGTERM──▶ draining
       │                     │
       └─start fails─▶ failed └─engine dies─▶ dead

The state is read from the facts that decide it (the engine's own health, whether start-up finished
or failed, whether admission is draining) every time it is asked, so no transition can be missed;
`/ready`, `/health` and every request ask here and nowhere else.
"""

from __future__ import annotations

from enum import StrEnum

from jamba_server.errors import ServiceUnavailableError, shutting_down
from jamba_server.runtime.admission import AdmissionController
from jamba_server.runtime.backend import Engine


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"  # the engine did not start
    DEAD = "dead"  # the engine started, then failed


class Readiness:
    def __init__(self, engine: Engine, admission: AdmissionController):
        self._engine = engine
        self._admission = admission
        self.started = False
        self.start_error: BaseException | None = None

    @property
    def phase(self) -> Phase:
        if self._engine.dead:
            return Phase.DEAD
        if self.start_error is not None:
            return Phase.FAILED
        # Ready waits for the server's start-up, not for the engine alone: a request admitted before
        # admission is sized to the engine would be invisible to the running gauge and to the drain.
        if not self.started or not self._engine.ready:
            return Phase.LOADING
        if self._admission.draining:
            return Phase.DRAINING
        return Phase.READY

    @property
    def healthy(self) -> bool:
        """False once the process can only exit (liveness)."""
        return self.phase not in (Phase.FAILED, Phase.DEAD)

    def check(self) -> None:
        """Raise the 503 for any state but ready."""
        phase = self.phase
        if phase is Phase.READY:
            return
        if phase is Phase.DRAINING:
            raise shutting_down(self._admission.retry_after)
        raise ServiceUnavailableError(_NOT_READY[phase])


_NOT_READY = {
    Phase.DEAD: "The engine has failed; the server is restarting.",
    Phase.FAILED: "The engine failed to start; the server is restarting.",
    Phase.LOADING: "The model is still loading; retry shortly.",
}
