"""Waiting for a condition with a deadline: the only way tests synchronise, never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

POLL = 0.05


async def _value(read: Callable[[], Any]) -> Any:
    value = read()
    if inspect.isawaitable(value):
        value = await value
    return value


async def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``condition`` (plain or async) until it returns something truthy, and return that.

    Fails after ``timeout`` seconds, naming ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await _value(condition)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(POLL)


async def wait_until_equal(
    read: Callable[[], Any], expected: object, timeout: float = 30, what: str = "value"
) -> None:
    """Poll ``read`` until it returns ``expected``; fail with the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (value := await _value(read)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what} to be {expected!r} (last: {value!r})"
            )
        await asyncio.sleep(POLL)
