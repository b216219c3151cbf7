"""Stopping asyncio tasks for certain on Python 3.11.

Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives in the same loop
turn as its inner awaitable finishes: the task goes on as if it had never been cancelled.
aiomqtt waits for every QoS 1 acknowledgement with it and pymodbus waits for every reply,
so a task that publishes or polls in a loop can survive one ``cancel()`` and then wait
forever for a message that no longer comes. Every stop in fedgate therefore cancels until
the task has ended. (3.12 rebuilt ``wait_for`` on ``asyncio.timeout`` and has no such race.)

The only module of ``fedgate_common`` that uses asyncio; it does no IO.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any, Final, TypeVar

__all__ = [
    "CANCEL_NUDGE_S",
    "BackgroundTasks",
    "cancel_persistently",
    "cancel_until_done",
    "finish_then_cancel",
    "leaf_error",
]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

CANCEL_NUDGE_S: Final = 0.5  # how long a cancelled task gets before it is cancelled again
SIGNAL_NUDGE_S: Final = 2.0  # the same after a stop signal: time for the task's own cleanup


async def cancel_until_done(
    tasks: Iterable[asyncio.Future[Any]], *, nudge_s: float = CANCEL_NUDGE_S
) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while any is still running."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=nudge_s)


async def finish_then_cancel(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end even when the caller is cancelled meanwhile, then let
    the cancellation through: for work that must not stop half-way, such as storing
    readings and counting them (cancelled between the two, the count would fall short of
    what was stored). ``asyncio.wait`` does not cancel what it waits for."""
    task = asyncio.ensure_future(coroutine)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True  # the caller's: finish first (cancel_until_done asks again)
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: an error of the finished work is not lost silently
        raise asyncio.CancelledError
    return task.result()


def cancel_persistently(task: asyncio.Task[Any], *, nudge_s: float = SIGNAL_NUDGE_S) -> None:
    """Cancel ``task`` now, and again every ``nudge_s`` seconds until it has ended.

    Meant for a stop-signal handler (``loop.add_signal_handler(SIGTERM, ...)``), where
    nothing awaits the task's end to cancel it again.
    """
    if task.done():
        return
    task.cancel()
    task.get_loop().call_later(nudge_s, _cancel_again, task, nudge_s)


def _cancel_again(task: asyncio.Task[Any], nudge_s: float) -> None:
    if not task.done():  # not task.cancelling(): a swallowed cancellation still counts there
        cancel_persistently(task, nudge_s=nudge_s)


class BackgroundTasks:
    """Tasks that live exactly as long as the ``async with`` body that started them.

    An :class:`asyncio.TaskGroup` underneath (a task that fails cancels the body and the
    others, and its error propagates), with one difference: when the body ends, however it
    ends, the tasks are cancelled until they have stopped. A plain TaskGroup cancels them
    once and then waits, which hangs forever behind a swallowed cancellation::

        async with BackgroundTasks() as background:
            background.create_task(link.run())
            await serve()  # link.run() is stopped when this returns or raises
    """

    def __init__(self) -> None:
        self._group = asyncio.TaskGroup()
        self._tasks: list[asyncio.Task[Any]] = []

    async def __aenter__(self) -> BackgroundTasks:
        await self._group.__aenter__()
        return self

    def create_task(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None
    ) -> asyncio.Task[T]:
        task = self._group.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, asyncio.CancelledError) and type(exc) is not asyncio.CancelledError:
            # A subclass (wait_for2's CancelledWithResultError: asyncua raises it when a
            # cancellation meets a request that has just finished). Python 3.11's TaskGroup
            # knows a cancellation only as ``type is CancelledError`` and would wrap this one
            # in a BaseExceptionGroup: an error, which ends every enclosing group (a bridge
            # whose source was being stopped lost its publisher and other sources).
            cancelled = asyncio.CancelledError(*exc.args)
            cancelled.__cause__ = exc
            exc_type, exc = asyncio.CancelledError, cancelled
        try:
            await cancel_until_done(self._tasks)
        finally:
            await self._group.__aexit__(exc_type, exc, traceback)


def leaf_error(error: BaseException, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` in ``error`` or, for a task group's
    ``ExceptionGroup``, among the exceptions it holds (depth first); ``None`` if none is.
    A command maps it to its exit code as if it had been raised alone."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := leaf_error(inner, kind)) is not None:
                return found
    return None
