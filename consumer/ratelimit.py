"""A token bucket that keeps one worker process under its share of E2B's rate limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` saved up; ``take()`` waits for one.

    Waiters are served in arrival order (one lock), so a burst of callers is
    spread out at ``rate`` rather than stampeding when a token frees up.
    """

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = capacity
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait_time(self) -> float:
        """Seconds until a token is free (0 when one is). Takes nothing."""
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    async def take(self) -> float:
        """Take one token, waiting as long as needed; return the seconds waited."""
        waited = 0.0
        async with self._lock:
            while (delay := self.wait_time()) > 0:
                await asyncio.sleep(delay)
                waited += delay
            self.tokens -= 1
        return waited
