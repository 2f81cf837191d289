import asyncio

import pytest

from jamba_server.core.limits import check_chat_limits
from jamba_server.runtime.admission import AdmissionController, worker_settings, worker_share
from jamba_server.errors import InvalidRequestError, RateLimitError, RequestTooLargeError, ServiceUnavailableError
from jamba_server.protocol import ChatCompletionRequest
from jamba_server.settings import Settings


def run(coro):
    return asyncio.run(coro)


def test_running_then_queue_then_429_with_retry_after():
    async def scenario():
        ctl = AdmissionController(max_running=2, max_queued=1, max_tokens=None, retry_after=3)
        a = await ctl.acquire(1)
        b = await ctl.acquire(1)
        queued = asyncio.ensure_future(ctl.acquire(1))
        await asyncio.sleep(0)
        assert (ctl.running, ctl.queued) == (2, 1)
        with pytest.raises(RateLimitError) as info:
            await ctl.acquire(1)
        assert info.value.headers == {"Retry-After": "3"} and info.value.status_code == 429
        ctl.release(a)
        c = await queued
        assert (ctl.running, ctl.queued) == (2, 0)
        ctl.release(b)
        ctl.release(c)
        ctl.release(c)  # idempotent
        assert (ctl.running, ctl.running_tokens) == (0, 0)

    run(scenario())


def test_token_budget_and_fifo():
    async def scenario():
        ctl = AdmissionController(max_running=10, max_queued=10, max_tokens=100, retry_after=1)
        big = await ctl.acquire(500)  # alone, a request over the budget still runs
        small = asyncio.ensure_future(ctl.acquire(10))
        await asyncio.sleep(0)
        assert ctl.queued == 1
        ctl.release(big)
        first = await small
        x = await ctl.acquire(60)
        y_task = asyncio.ensure_future(ctl.acquire(60))  # 10 + 60 + 60 > 100: waits
        z_task = asyncio.ensure_future(ctl.acquire(5))  # would fit, but FIFO keeps order
        await asyncio.sleep(0)
        assert ctl.queued == 2 and not z_task.done()
        ctl.release(x)
        y = await y_task
        z = await z_task
        assert ctl.running_tokens == 75
        for t in (first, y, z):
            ctl.release(t)

    run(scenario())


def test_cancelled_waiter_leaves_queue_and_draining_is_503():
    async def scenario():
        ctl = AdmissionController(max_running=1, max_queued=5, max_tokens=None, retry_after=1)
        held = await ctl.acquire(1)
        waiter = asyncio.ensure_future(ctl.acquire(1))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert ctl.queued == 0
        ctl.start_draining()
        with pytest.raises(ServiceUnavailableError):
            await ctl.acquire(1)
        ctl.release(held)
        assert ctl.in_flight == 0

    run(scenario())


LIMITS = Settings(
    model="m", max_messages=2, max_n=2, max_tokens_limit=50, max_stop_sequences=1, max_stop_length=3,
    max_tools=1, max_schema_bytes=64, max_documents=1, max_document_chars=10,
)  # fmt: skip
TOOL = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(
    "fields, param, error",
    [
        ({"messages": [{"role": "user", "content": "x"}] * 3}, "messages", InvalidRequestError),
        ({"n": 3}, "n", InvalidRequestError),
        ({"max_tokens": 51}, "max_tokens", InvalidRequestError),
        ({"max_completion_tokens": 51}, "max_completion_tokens", InvalidRequestError),
        ({"stop": ["a", "b"]}, "stop", InvalidRequestError),
        ({"stop": "abcd"}, "stop", InvalidRequestError),
        ({"tools": [TOOL, {"type": "function", "function": {"name": "g"}}]}, "tools", InvalidRequestError),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "description": "x" * 80}}}]}, "tools[0].function.parameters", RequestTooLargeError),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": "y" * 80}}}}, "response_format.json_schema.schema", RequestTooLargeError),
        ({"documents": [{"text": "a"}, {"text": "b"}]}, "documents", InvalidRequestError),
        ({"documents": [{"text": "a" * 11}]}, "documents", RequestTooLargeError),
    ],
)
def test_limits_name_their_param(fields, param, error):
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields})
    with pytest.raises(error) as info:
        check_chat_limits(request, LIMITS)
    assert info.value.param == param


def test_within_limits_passes():
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2, "max_tokens": 50, "stop": "abc",
         "tools": [TOOL], "documents": [{"text": "0123456789"}]}  # fmt: skip
    )
    check_chat_limits(request, LIMITS)


def test_choices_count_as_sequences_and_a_cancelled_head_wakes_the_next():
    async def scenario():
        ctl = AdmissionController(max_running=4, max_queued=5, max_tokens=None, retry_after=1)
        three = await ctl.acquire(1, sequences=3)
        four = asyncio.ensure_future(ctl.acquire(1, sequences=4))  # 3 + 4 > 4: waits
        one = asyncio.ensure_future(ctl.acquire(1, sequences=1))  # would fit, but FIFO keeps order
        await asyncio.sleep(0)
        assert (ctl.running, ctl.running_sequences, ctl.queued) == (1, 3, 2)
        four.cancel()
        admitted = await asyncio.wait_for(one, 5)  # woken by the cancellation, not by a release
        assert (ctl.running, ctl.running_sequences, ctl.queued) == (2, 4, 0)
        ctl.release(three)
        ctl.release(admitted)
        lone = await ctl.acquire(1, sequences=16)  # more than the engine's slots, but alone: it runs
        assert ctl.running_sequences == 16
        ctl.release(lone)
        assert (ctl.running, ctl.running_sequences) == (0, 0)

    asyncio.run(scenario())


def test_queue_admits_by_priority_then_arrival():
    async def scenario():
        ctl = AdmissionController(max_running=1, max_queued=10, max_tokens=None, retry_after=1)
        first = await ctl.acquire(1)
        order = []

        async def wait(name, priority):
            ticket = await ctl.acquire(1, priority=priority)
            order.append(name)
            return ticket

        tasks = [asyncio.ensure_future(wait(name, p)) for name, p in [("late", 5), ("a", 0), ("urgent", -3), ("b", 0)]]
        await asyncio.sleep(0)
        assert ctl.queued == 4
        ticket = first
        for _ in tasks:
            ctl.release(ticket)
            await asyncio.sleep(0)
            ticket = next(t.result() for t in tasks if t.done() and not t.result().released)
        assert order == ["urgent", "a", "b", "late"]

    run(scenario())


def test_a_more_urgent_request_that_fits_goes_ahead_of_a_blocked_head():
    async def scenario():
        ctl = AdmissionController(max_running=10, max_queued=10, max_tokens=100, retry_after=1)
        running = await ctl.acquire(60)
        big = asyncio.ensure_future(ctl.acquire(50))  # does not fit beside `running`
        await asyncio.sleep(0)
        small = await asyncio.wait_for(ctl.acquire(30, priority=-1), 1)  # fits, and outranks the head
        assert not big.done() and ctl.running_tokens == 90
        same_rank = asyncio.ensure_future(ctl.acquire(5))  # fits, but queues behind the head (FIFO)
        await asyncio.sleep(0)
        assert not same_rank.done()
        ctl.release(running)
        ctl.release(small)
        await asyncio.sleep(0)
        assert big.done() and same_rank.done()

    run(scenario())


def test_cancelled_waiter_leaves_the_priority_queue():
    async def scenario():
        ctl = AdmissionController(max_running=1, max_queued=10, max_tokens=None, retry_after=1)
        first = await ctl.acquire(1)
        urgent = asyncio.ensure_future(ctl.acquire(1, priority=-1))
        normal = asyncio.ensure_future(ctl.acquire(1))
        await asyncio.sleep(0)
        urgent.cancel()
        await asyncio.sleep(0)
        ctl.release(first)
        await asyncio.sleep(0)
        assert normal.done() and ctl.queued == 0 and ctl.running == 1

    run(scenario())


@pytest.mark.parametrize(
    "total, workers, shares",
    [
        (32, 2, [16, 16]),
        (10, 3, [4, 3, 3]),  # the remainder to the first workers
        (2, 4, [1, 1, 1, 1]),  # never below 1: together more than the total
        (0, 3, [0, 0, 0]),  # no queue stays no queue
    ],
)
def test_each_worker_gets_its_share_of_a_limit(total, workers, shares):
    assert [worker_share(total, workers, i) for i in range(workers)] == shares


def test_worker_settings_split_every_admission_limit_and_leave_unset_ones_unset():
    settings = Settings(
        model="m", api_server_count=3, max_concurrent_requests=10, max_queued_requests=256, limit_concurrency=None
    )
    shares = [worker_settings(settings, i) for i in range(3)]
    assert [s.max_concurrent_requests for s in shares] == [4, 3, 3]
    assert [s.max_queued_requests for s in shares] == [86, 85, 85]
    assert all(s.max_tokens_in_flight is None and s.limit_concurrency is None for s in shares)
    assert all(s.retry_after_seconds == settings.retry_after_seconds and s.model == "m" for s in shares)
    with_tokens = settings.model_copy(update={"max_tokens_in_flight": 1001, "limit_concurrency": 4096})
    assert [worker_settings(with_tokens, i).max_tokens_in_flight for i in range(3)] == [334, 334, 333]
    assert sum(worker_settings(with_tokens, i).limit_concurrency for i in range(3)) == 4096


def test_one_worker_keeps_the_whole_limits():
    settings = Settings(model="m", max_concurrent_requests=7, max_tokens_in_flight=100)
    assert worker_settings(settings, 0) == settings


def test_admission_changes_are_announced():
    """A multi-process server publishes its running and queued gauges on each change."""

    async def scenario():
        ctl = AdmissionController(max_running=1, max_queued=1, max_tokens=None, retry_after=1)
        seen: list[tuple[int, int]] = []
        ctl.on_change = lambda: seen.append((ctl.running, ctl.queued))
        first = await ctl.acquire(1)
        waiting = asyncio.ensure_future(ctl.acquire(1))
        await asyncio.sleep(0)
        ctl.release(first)
        second = await waiting
        ctl.release(second)
        assert seen[-1] == (0, 0) and (1, 1) in seen and (1, 0) in seen

    run(scenario())
