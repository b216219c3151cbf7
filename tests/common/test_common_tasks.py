"""Stopping tasks when a cancellation is swallowed on the way (Python 3.11's wait_for)."""

from __future__ import annotations

import asyncio

import pytest
from fedgate_common.tasks import (
    BackgroundTasks,
    cancel_persistently,
    cancel_until_done,
    finish_then_cancel,
    leaf_error,
)


async def ignore_cancellations(swallow: int, swallowed: list[int]) -> None:
    """Ignore the first ``swallow`` cancellations, as 3.11's wait_for does when the
    awaited call finishes in the same loop turn as the cancel; count them."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed[0] >= swallow:
                raise
            swallowed[0] += 1


def stubborn(swallow: int) -> tuple[list[int], asyncio.Task[None]]:
    swallowed = [0]
    return swallowed, asyncio.create_task(ignore_cancellations(swallow, swallowed))


async def test_a_task_that_swallows_cancellations_is_still_stopped() -> None:
    swallowed, task = stubborn(2)
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_until_done([task], nudge_s=0.01), 5)
    assert task.cancelled()
    assert swallowed == [2]


async def test_finished_tasks_are_left_alone() -> None:
    async def finish() -> None:
        return None

    task = asyncio.create_task(finish())
    await task
    await cancel_until_done([task])
    assert task.done()
    assert not task.cancelled()


async def test_a_signal_handler_cancel_is_repeated_until_the_task_ends() -> None:
    swallowed, task = stubborn(3)
    await asyncio.sleep(0)
    cancel_persistently(task, nudge_s=0.01)
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task}
    assert task.cancelled()
    assert swallowed == [3]


async def test_one_cancel_is_not_enough_for_such_a_task() -> None:
    # The reason for the two helpers above: a single cancel() leaves the task running.
    swallowed, task = stubborn(1)
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()
    assert swallowed == [1]
    await cancel_until_done([task])
    assert task.cancelled()


async def test_background_tasks_stop_with_the_body_even_when_they_swallow_a_cancel() -> None:
    swallowed = [0]
    async with BackgroundTasks() as tasks:
        task = tasks.create_task(ignore_cancellations(1, swallowed))
        await asyncio.sleep(0)
    assert task.cancelled()
    assert swallowed == [1]


async def test_a_failing_background_task_stops_the_body_and_its_error_propagates() -> None:
    async def fail() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("broken")

    others: list[asyncio.Task[None]] = []

    async def body() -> None:
        async with BackgroundTasks() as tasks:
            tasks.create_task(fail())
            others.append(tasks.create_task(asyncio.sleep(3600)))
            await asyncio.sleep(3600)

    with pytest.raises(BaseExceptionGroup) as raised:
        await asyncio.wait_for(body(), 5)
    other = others[0]
    assert raised.group_contains(RuntimeError, match="broken")
    assert other.cancelled()


async def test_a_cancelled_body_stops_its_tasks_and_the_cancellation_propagates() -> None:
    started = asyncio.Event()
    inner: list[asyncio.Task[None]] = []

    async def body() -> None:
        async with BackgroundTasks() as tasks:
            inner.append(tasks.create_task(asyncio.sleep(3600)))
            started.set()
            await asyncio.sleep(3600)

    outer = asyncio.create_task(body())
    await started.wait()
    await cancel_until_done([outer])
    assert outer.cancelled()
    assert inner[0].cancelled()


def test_leaf_error_finds_the_cause_inside_nested_task_groups() -> None:
    cause = KeyError("store")
    group = ExceptionGroup("outer", [ValueError("a"), ExceptionGroup("inner", [cause])])
    assert leaf_error(group, KeyError) is cause
    assert leaf_error(group, TypeError) is None
    assert leaf_error(cause, LookupError) is cause  # not a group: itself, if of the kind


async def test_finish_then_cancel_ends_the_work_before_the_cancellation_goes_through() -> None:
    """Cancelled between storing and counting, a source would count less than it stored:
    the work runs to its end, then the caller sees the cancellation (also a repeated one,
    as cancel_until_done sends)."""
    release = asyncio.Event()
    done: list[str] = []

    async def store_and_count() -> int:
        await release.wait()
        done.append("stored and counted")
        return 2

    caller = asyncio.create_task(finish_then_cancel(store_and_count()))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0.01)
    caller.cancel()  # asked again while the work still runs
    await asyncio.sleep(0.01)
    assert not caller.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert done == ["stored and counted"]
    # Not cancelled: the work's result comes back.
    release.set()
    assert await finish_then_cancel(store_and_count()) == 2


class _CancelledWithResult(asyncio.CancelledError):
    """Like wait_for2's CancelledWithResultError, which asyncua raises when a cancellation
    meets a request that has just been answered."""


async def test_a_cancelled_error_subclass_out_of_the_body_is_a_cancellation() -> None:
    """Python 3.11's TaskGroup takes only CancelledError itself for a cancellation; a
    subclass out of the body would come out as a BaseExceptionGroup, an error that ends
    every enclosing group. Out of BackgroundTasks it is a cancellation: the task ends
    cancelled, its background tasks stopped, and a sibling in an enclosing group lives on."""
    inner: list[asyncio.Task[None]] = []

    async def body() -> None:
        async with BackgroundTasks() as tasks:
            inner.append(tasks.create_task(asyncio.sleep(3600)))
            await asyncio.sleep(0)
            raise _CancelledWithResult("answered", False)

    async with asyncio.TaskGroup() as group:
        source = group.create_task(body())
        sibling = group.create_task(asyncio.sleep(0.05, result="still here"))
    assert source.cancelled()
    assert inner[0].cancelled()
    assert sibling.result() == "still here"
