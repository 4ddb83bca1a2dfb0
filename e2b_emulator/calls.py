"""The call log and the rate window: what the emulator remembers about API calls."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# The op name each E2B endpoint is recorded under; the package docstring maps them to paths.
OPS = (
    "create",
    "connect",
    "resume",
    "pause",
    "kill",
    "info",
    "list",
    "metrics",
    "sandbox_metrics",
)


@dataclass(frozen=True, slots=True)
class Call:
    """One API call as the emulator saw it; ``at`` is its arrival (time.monotonic())."""

    method: str
    op: str
    sandbox_id: str | None
    status: int
    at: float


class CallLog:
    """The API calls in the order they were answered (or given up by their client)."""

    def __init__(self) -> None:
        self._calls: list[Call] = []

    def record(self, call: Call) -> None:
        self._calls.append(call)

    def select(self, op: str | None = None, sandbox_id: str | None = None) -> list[Call]:
        return [
            c
            for c in self._calls
            if (op is None or c.op == op) and (sandbox_id is None or c.sandbox_id == sandbox_id)
        ]

    def peak_rate(self, op: str | None = None, window: float = 1.0) -> int:
        return peak_count(sorted(c.at for c in self.select(op)), window)

    def clear(self) -> None:
        self._calls.clear()


def peak_count(times: list[float], window: float) -> int:
    """The most of the sorted ``times`` that fall within any half-open ``window``."""
    best = start = 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


class RateWindow:
    """A sliding one-second window over the admitted calls; rejected ones do not count,
    so a client that backs off gets through as soon as the window has room."""

    def __init__(self) -> None:
        self._admitted: deque[float] = deque()

    def admit(self, now: float, limit: float) -> bool:
        window = self._admitted
        while window and window[0] <= now - 1.0:
            window.popleft()
        if limit and len(window) >= limit:
            return False
        window.append(now)
        return True
