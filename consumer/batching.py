"""Many callers, one round trip: what concurrent pauses ask of Postgres and E2B, gathered per window.

A :class:`Batcher` collects the items submitted while its window is open (or
until ``max_size`` of them) and hands them to one call that answers each.
Every caller awaits its own answer; an error of the call is every caller's
error (each retries as it would have alone). A batch is cut short as soon as
it is full, so at high concurrency the window costs nothing; at low
concurrency it bounds the wait a lone item pays for company.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Submit items one by one; ``run`` answers a whole batch, in order."""

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_size: int,
        window: float,
        name: str,
    ) -> None:
        if max_size < 1 or window < 0:
            raise ValueError("max_size must be >= 1 and window >= 0")
        self._run = run
        self._max_size = max_size
        self._window = window
        self._name = name
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The answer for ``item``, from the batch it joins."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._waiting) >= self._max_size:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_while_waiting(), name=self._name)
        return await future

    async def _flush_while_waiting(self) -> None:
        """One call per batch until nobody waits. Failure policy: the call's error goes to its
        batch's callers; the next batch is called all the same."""
        while self._waiting:
            if self._window and len(self._waiting) < self._max_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._window)
            self._full.clear()
            batch, self._waiting = self._waiting[: self._max_size], self._waiting[self._max_size :]
            if len(self._waiting) >= self._max_size:
                self._full.set()
            items = [item for item, _ in batch]
            try:
                answers = await self._run(items)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)


async def distinct_rounds(
    items: list[T], key: Callable[[T], str], call: Callable[[list[T]], Awaitable[Sequence[R]]]
) -> list[R]:
    """Answer ``items`` in order, calling ``call`` on items of distinct keys at a time.

    One statement may take each row once: a batch that holds two commands for
    one sandbox sends the second in a later round.
    """
    answers: dict[int, R] = {}
    pending = list(enumerate(items))
    while pending:
        seen: set[str] = set()
        now: list[tuple[int, T]] = []
        later: list[tuple[int, T]] = []
        for i, item in pending:
            (later if key(item) in seen else now).append((i, item))
            seen.add(key(item))
        for (i, _), answer in zip(now, await call([item for _, item in now]), strict=True):
            answers[i] = answer
        pending = later
    return [answers[i] for i in range(len(items))]
