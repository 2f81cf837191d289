"""The request runner (runtime/runner.py) and the pipeline's `collect` / `stream` (http/pipeline.py)
against a fake engine: the order of admission, engine steps, writes and release, for each way a
request can end. Written against the behaviour before the runner moved into its own module (then
`ServerState.collect` / `stream`), and kept green through the move.

Every scenario checks the invariant that matters most: the admission ticket is released exactly once
and the engine request is closed, however the request ends.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.errors import APIError, ClientDisconnected, RequestTimeoutError, ServiceUnavailableError
from jamba_server.http.pipeline import EventSource, collect, stream
from jamba_server.runtime.runner import EngineRequest
from jamba_server.runtime.server import Server
from jamba_server.settings import Settings

SPEC = SimpleNamespace(max_tokens=8, n=1)


def step(text: str, finished: bool = False) -> EngineStep:
    return EngineStep(choices=(ChoiceDelta(0, text, (1,), finish_reason="stop" if finished else None),), prompt_tokens=3, finished=finished)


class FakeEngine:
    """The adapter's slice the runner uses. `script` is what each request's generate does, in order:
    an EngineStep to yield, an exception to raise, or "hang" (wait until closed)."""

    max_num_seqs = 2
    max_model_len = 64
    ready = True
    dead = False

    def __init__(self, script: list):
        self.script = script
        self.log: list[str] = []
        self.aborted: list[str] = []
        self.shut_down = asyncio.Event()

    async def generate(self, prompt_ids, spec, request_id, deadline=None, **options):
        self.log.append("generate")
        self.options = options
        try:
            for item in self.script:
                await asyncio.sleep(0)
                if item == "hang":  # until the engine aborts everything, as at the end of a drain
                    await self.shut_down.wait()
                    raise ServiceUnavailableError("The server shut down before the request finished.")
                if isinstance(item, BaseException):
                    raise item
                self.log.append(f"step {item.choices[0].text}")
                yield item
        finally:
            self.log.append("engine closed")

    async def abort(self, request_id, cause):
        self.aborted.append(cause)

    async def abort_all(self, cause):
        self.aborted.append(cause)
        self.shut_down.set()
        return 1


class Metrics:
    def admitted(self) -> None:
        pass

    def step(self, step) -> None:
        pass


class Client:
    """An ASGI client side: `disconnect()` makes the request's receive report http.disconnect."""

    def __init__(self):
        self.gone = asyncio.Event()
        self.body: list[bytes] = []

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        if message["type"] == "http.response.body" and message.get("body"):
            self.body.append(message["body"])

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, self.receive)


def make_state(engine: FakeEngine, **settings) -> Server:
    state = Server(Settings(model="m", **settings), engine)
    state.engine_started()
    return state


def chunks(step: EngineStep) -> list[str]:
    return [step.choices[0].text]


def engine_request() -> EngineRequest:
    return EngineRequest("r1", [1, 2, 3], SPEC, params=SPEC, deadline=None, observer=Metrics())


async def run_collect(state, client, on_step):
    await collect(client.request(), state.runner, engine_request(), on_step)


async def run_stream(state, client):
    source = EventSource(on_step=chunks, opening=["open"], closing=lambda: ["usage"])
    response = await stream(client.request(), state.runner, engine_request(), source, write_timeout=30)
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await response(scope, client.receive, client.send)
    return b"".join(client.body).decode()


def released(state: Server) -> bool:
    return (state.admission.running, state.admission.running_sequences, state.admission.queued) == (0, 0, 0)


# ---- non-streaming


@pytest.mark.parametrize(
    "script, raises",
    [
        ([step("a"), step("b", finished=True)], None),  # normal
        ([RequestTimeoutError("late")], RequestTimeoutError),  # deadline (the adapter raises it)
        ([step("a"), ServiceUnavailableError("engine died")], ServiceUnavailableError),  # engine death
    ],
    ids=["normal", "deadline", "engine-death"],
)
def test_collect_releases_once_however_it_ends(script, raises):
    async def scenario():
        engine = FakeEngine(script)
        state = make_state(engine)
        seen: list[str] = []
        client = Client()
        if raises is None:
            await run_collect(state, client, lambda s: seen.append(s.choices[0].text))
        else:
            with pytest.raises(raises):
                await run_collect(state, client, lambda s: seen.append(s.choices[0].text))
        return engine, state, seen

    engine, state, seen = asyncio.run(scenario())
    assert engine.log[0] == "generate" and engine.log[-1] == "engine closed"
    assert released(state)
    assert seen == [s.choices[0].text for s in script if isinstance(s, EngineStep)]


def test_collect_client_disconnect_closes_the_engine_request():
    async def scenario():
        engine = FakeEngine([step("a"), "hang"])
        state = make_state(engine)
        client = Client()
        task = asyncio.ensure_future(run_collect(state, client, lambda s: None))
        while "step a" not in engine.log:
            await asyncio.sleep(0)
        client.gone.set()
        with pytest.raises(ClientDisconnected):
            await task
        return engine, state

    engine, state = asyncio.run(scenario())
    assert engine.log == ["generate", "step a", "engine closed"]
    assert released(state)


def test_cancelled_while_queued_never_reaches_the_engine():
    async def scenario():
        engine = FakeEngine(["hang"])
        state = make_state(engine, max_concurrent_requests=1)
        first, second = Client(), Client()
        running = asyncio.ensure_future(run_collect(state, first, lambda s: None))
        while engine.log != ["generate"]:
            await asyncio.sleep(0)
        queued = asyncio.ensure_future(run_collect(state, second, lambda s: None))
        while state.admission.queued != 1:
            await asyncio.sleep(0)
        second.gone.set()
        with pytest.raises(ClientDisconnected):
            await queued
        assert (state.admission.running, state.admission.queued) == (1, 0)
        first.gone.set()
        with pytest.raises(ClientDisconnected):
            await running
        return engine, state

    engine, state = asyncio.run(scenario())
    assert engine.log == ["generate", "engine closed"]  # only the first request reached the engine
    assert released(state)


# ---- streaming


def test_stream_sends_opening_steps_usage_and_done_in_order():
    async def scenario():
        engine = FakeEngine([step("a"), step("b"), step("c", finished=True)])
        state = make_state(engine)
        body = await run_stream(state, Client())
        return engine, state, body

    engine, state, body = asyncio.run(scenario())
    # The opening goes out with the first step; the last step with usage and [DONE], in one write.
    assert body == "data: open\n\ndata: a\n\ndata: b\n\ndata: c\n\ndata: usage\n\ndata: [DONE]\n\n"
    assert engine.log[-1] == "engine closed"
    assert released(state)


def test_stream_error_before_the_first_step_is_an_http_error():
    async def scenario():
        engine = FakeEngine([ServiceUnavailableError("engine died")])
        state = make_state(engine)
        with pytest.raises(ServiceUnavailableError):
            await run_stream(state, Client())
        return engine, state

    engine, state = asyncio.run(scenario())
    assert engine.log == ["generate", "engine closed"]
    assert released(state)


def test_stream_error_mid_stream_ends_with_an_error_event_then_done():
    async def scenario():
        engine = FakeEngine([step("a"), RequestTimeoutError("late")])
        state = make_state(engine)
        body = await run_stream(state, Client())
        return engine, state, body

    engine, state, body = asyncio.run(scenario())
    events = body.split("\n\n")
    assert events[:2] == ["data: open", "data: a"]
    assert '"code":"request_timeout"' in events[2].replace(" ", "") and events[3] == "data: [DONE]"
    assert engine.log[-1] == "engine closed"
    assert released(state)


def test_stream_client_disconnect_closes_the_engine_request_and_releases():
    async def scenario():
        engine = FakeEngine([step("a"), step("b"), "hang"])
        state = make_state(engine)
        client = Client()
        task = asyncio.ensure_future(run_stream(state, client))
        while "step b" not in engine.log:
            await asyncio.sleep(0)
        client.gone.set()
        await task
        return engine, state

    engine, state = asyncio.run(scenario())
    assert engine.log[-1] == "engine closed"
    assert released(state)


def test_stream_client_gone_before_the_first_write_closes_the_engine_request():
    """The client leaves while the headers are being written: the body generator never starts, so
    the response's close must end the engine request itself (not garbage collection, later)."""

    async def scenario():
        engine = FakeEngine([step("a"), step("b"), "hang"])
        state = make_state(engine)
        client = Client()
        never = asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.start":
                client.gone.set()
                await never.wait()  # a full socket: the headers never go out

        source = EventSource(on_step=chunks, opening=["open"], closing=lambda: ["usage"])
        response = await stream(client.request(), state.runner, engine_request(), source, write_timeout=30)
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, client.receive, send)
        return list(engine.log), state  # as the response ends (asyncio.run closes leftovers after)

    log, state = asyncio.run(scenario())
    assert log == ["generate", "step a", "engine closed"]
    assert released(state)


def test_drain_refuses_new_work_waits_then_aborts_what_is_left():
    async def scenario():
        engine = FakeEngine(["hang"])
        state = make_state(engine, drain_timeout=0.2)
        task = asyncio.ensure_future(run_collect(state, Client(), lambda s: None))
        while engine.log != ["generate"]:
            await asyncio.sleep(0)
        await state.drain()  # returns once nothing is in flight
        assert task.done() and isinstance(task.exception(), ServiceUnavailableError)
        with pytest.raises(APIError) as refused:
            state.readiness.check()
        assert refused.value.code == "shutting_down"
        return engine, state

    engine, state = asyncio.run(scenario())
    assert engine.aborted == ["shutdown"]
    assert engine.log == ["generate", "engine closed"]
    assert released(state)


@pytest.mark.parametrize("stream", [False, True])
def test_runner_passes_priority_cache_salt_and_streaming_to_the_engine_and_admission(stream):
    async def scenario():
        engine = FakeEngine([step("a", finished=True)])
        state = make_state(engine)
        acquired = []
        acquire = state.admission.acquire

        async def spy(tokens, sequences=1, priority=0):
            acquired.append(priority)
            return await acquire(tokens, sequences, priority)

        state.admission.acquire = spy
        request = EngineRequest(
            "r1", [1, 2], SPEC, params=SPEC, deadline=None, observer=Metrics(), priority=-2, cache_salt="s", stream=stream
        )  # fmt: skip
        await collect(Client().request(), state.runner, request, lambda s: None)
        return engine, acquired

    engine, acquired = asyncio.run(scenario())
    assert engine.options == {"priority": -2, "cache_salt": "s", "stream": stream} and acquired == [-2]


# ---- multi-prompt requests: one engine request per prompt, one ticket, merged steps


class PromptEngine(FakeEngine):
    """Each prompt's request yields two steps of its n=2 choices (text "<prompt id>:<choice>"); a
    prompt [0] fails after its first step, a prompt [5] never ends by itself."""

    async def generate(self, prompt_ids, spec, request_id, deadline=None, **options):
        self.log.append(f"generate {request_id}")
        try:
            for last in (False, True):
                await asyncio.sleep(0)
                if prompt_ids == [0] and last:
                    raise ServiceUnavailableError("engine died")
                if prompt_ids == [5] and last:
                    await asyncio.Event().wait()
                yield EngineStep(
                    tuple(ChoiceDelta(j, f"{prompt_ids[0]}:{j}", (1,), finish_reason="stop" if last else None) for j in range(2)),
                    prompt_tokens=len(prompt_ids),
                    finished=last,
                )
        finally:
            self.log.append(f"closed {request_id}")


def multi_request(*prompts: list[int]) -> EngineRequest:
    spec = SimpleNamespace(max_tokens=4, n=2)
    parts = [EngineRequest(f"r-{i}", p, spec, params=spec, deadline=None, observer=Metrics()) for i, p in enumerate(prompts)]
    return EngineRequest(**{**parts[0].__dict__, "more": tuple(parts[1:])})


def test_multi_prompt_steps_merge_with_openai_indexes_on_one_ticket():
    async def scenario():
        engine = PromptEngine([])
        state = make_state(engine)
        seen: list[EngineStep] = []
        request = multi_request([7], [8, 8], [9, 9, 9])
        assert (request.budget, request.sequences) == (6 + 3 * 8, 6)
        await collect(Client().request(), state.runner, request, seen.append)
        return engine, state, seen

    engine, state, seen = asyncio.run(scenario())
    texts = {c.index: c.text for s in seen for c in s.choices if c.finish_reason is None}
    assert texts == {0: "7:0", 1: "7:1", 2: "8:0", 3: "8:1", 4: "9:0", 5: "9:1"}
    assert {s.prompt_tokens for s in seen} == {6} and [s.finished for s in seen].count(True) == 1 and seen[-1].finished
    assert sorted(e for e in engine.log if e.startswith("closed")) == ["closed r-0", "closed r-1", "closed r-2"]
    assert released(state)


def test_a_failing_prompt_ends_the_whole_request():
    async def scenario():
        engine = PromptEngine([])
        state = make_state(engine)
        with pytest.raises(ServiceUnavailableError):
            await asyncio.wait_for(collect(Client().request(), state.runner, multi_request([7], [0], [5]), lambda s: None), 5)
        return engine, state

    engine, state = asyncio.run(scenario())
    assert sorted(e for e in engine.log if e.startswith("closed")) == ["closed r-0", "closed r-1", "closed r-2"]
    assert released(state)
