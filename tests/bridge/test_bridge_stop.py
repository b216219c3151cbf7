"""Stopping the bridge's tasks when a cancellation is swallowed on the way."""

from __future__ import annotations

import asyncio

from fedgate_bridge.bridge import cancel_until_done


async def test_a_task_that_swallows_one_cancellation_is_still_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as 3.11's wait_for does when its inner call just finished

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_until_done([task]), 5)
    assert task.cancelled()
    assert swallowed == 1


async def test_finished_tasks_are_left_alone() -> None:
    async def finish() -> None:
        return None

    task = asyncio.create_task(finish())
    await task
    await cancel_until_done([task])
    assert task.done()
    assert not task.cancelled()
