"""The one module that talks to E2B, through the real ``e2b`` SDK.

It turns what the SDK returns or raises into the service's own outcomes, so
the worker decides on a :class:`PauseOutcome` and never sees an SDK type::

    pause answer                          outcome
    204 (SDK: True)                       PAUSED
    409 (SDK: False)                      ALREADY_PAUSED
    404 SandboxNotFoundException          GONE
    429, 5xx, timeouts, connection errors RETRYABLE
    401 and anything else                 FAILED, with a short error text

The SDK's own response retries are off (``retries=0``): the worker retries
with its own backoff under its own rate limit, so every request that reaches
E2B is one it counted. (The SDK still retries failures to *connect*, which by
construction never reach the server.) The API key never appears in an error
text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import httpx
from e2b import AsyncSandbox
from e2b.connection_config import ApiParams
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    ServiceBusyException,
    TimeoutException,
)
from e2b.sandbox.sandbox_api import SnapshotMode

from consumer.errors import AutopauseError

DEFAULT_API_URL = "https://api.e2b.app"
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_MAX_ERROR_CHARS = 300

T = TypeVar("T")


class PauseOutcome(StrEnum):
    """What a pause call achieved, as far as the worker has to know."""

    PAUSED = "paused"
    ALREADY_PAUSED = "already_paused"
    GONE = "gone"
    RETRYABLE = "retryable"
    FAILED = "failed"


@dataclass(frozen=True)
class PauseResult:
    """The outcome of one pause call; ``latency`` is its wall time in seconds."""

    outcome: PauseOutcome
    error: str | None = None
    latency: float = 0.0


class E2BError(AutopauseError):
    """An E2B call other than pause failed; ``retryable`` says whether a later try may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class E2BClient:
    """Pause, resume, kill and inspect sandboxes through the e2b SDK."""

    def __init__(
        self,
        *,
        api_key: str,
        api_url: str | None,
        request_timeout: float,
        memory: bool = True,
    ) -> None:
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        self._api_key = api_key
        self._timeout = request_timeout
        self._mode: SnapshotMode = "full" if memory else "filesystem"
        # Every option is explicit so that the SDK reads nothing from the
        # environment (E2B_API_URL, E2B_DEBUG, ...). pyqwest, under the SDK,
        # bounds a request by the read plus the write timeout, each set to the
        # request timeout: half of ours makes the whole request take at most ours.
        self._opts: ApiParams = {
            "api_key": api_key,
            "api_url": api_url or DEFAULT_API_URL,
            "request_timeout": request_timeout / 2,
            "retries": 0,
            "debug": False,
        }

    async def pause(self, sandbox_id: str) -> PauseResult:
        """Pause ``sandbox_id``; every API answer becomes a result, none raises."""
        started = time.monotonic()
        if not self._api_key:
            return PauseResult(PauseOutcome.FAILED, "no E2B API key configured")
        try:
            async with asyncio.timeout(self._timeout + 1):
                paused = await AsyncSandbox.pause(sandbox_id, mode=self._mode, **self._opts)
        except Exception as exc:
            outcome = classify(exc)
            return PauseResult(outcome, self._describe(exc), time.monotonic() - started)
        outcome = PauseOutcome.PAUSED if paused else PauseOutcome.ALREADY_PAUSED
        return PauseResult(outcome, None, time.monotonic() - started)

    async def connect(self, sandbox_id: str) -> bool:
        """Resume ``sandbox_id`` if paused: True when it runs afterwards, False when gone."""
        try:
            await self._call(lambda: AsyncSandbox.connect(sandbox_id, **self._opts))
        except _Gone:
            return False
        return True

    async def kill(self, sandbox_id: str) -> bool:
        """Kill ``sandbox_id``: True if this call killed it, False if it was already gone."""
        try:
            killed = await self._call(lambda: AsyncSandbox.kill(sandbox_id, **self._opts))
        except _Gone:
            return False
        return bool(killed)

    async def state(self, sandbox_id: str) -> str | None:
        """``"running"`` or ``"paused"`` as E2B sees it, or None when the sandbox is gone."""
        try:
            info = await self._call(lambda: AsyncSandbox.get_info(sandbox_id, **self._opts))
        except _Gone:
            return None
        return str(info.state.value)

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one SDK call under our bound; raise _Gone or E2BError on failure."""
        if not self._api_key:
            raise E2BError("no E2B API key configured", retryable=False)
        try:
            async with asyncio.timeout(self._timeout + 1):
                return await call()
        except Exception as exc:
            outcome = classify(exc)
            if outcome is PauseOutcome.GONE:
                raise _Gone from None
            # from None: an httpx exception holds the request, with the key in its headers.
            raise E2BError(self._describe(exc), retryable=outcome is PauseOutcome.RETRYABLE) from None

    def _describe(self, exc: BaseException) -> str:
        """A short error text, with the API key scrubbed out."""
        text = f"{type(exc).__name__}: {exc}".strip().removesuffix(":")
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text[:_MAX_ERROR_CHARS]


class _Gone(Exception):
    """The sandbox does not exist (any more)."""


def classify(exc: BaseException) -> PauseOutcome:
    """Map an exception from an SDK call to an outcome; success is mapped by the caller."""
    if isinstance(exc, NotFoundException):
        return PauseOutcome.GONE
    if isinstance(exc, AuthenticationException):
        return PauseOutcome.FAILED
    if isinstance(
        exc,
        RateLimitException
        | ServiceBusyException
        | TimeoutException  # the SDK's own, also for an unreachable sandbox
        | httpx.TimeoutException
        | httpx.NetworkError  # ConnectError, ReadError, ...
        | httpx.RemoteProtocolError
        | TimeoutError  # our asyncio.timeout bound
        | ConnectionError,
    ):
        return PauseOutcome.RETRYABLE
    if isinstance(exc, SandboxException):
        status = exc.status_code or 0
        if status == 404:
            return PauseOutcome.GONE
        if status in _RETRYABLE_STATUSES or status >= 500:
            return PauseOutcome.RETRYABLE
    return PauseOutcome.FAILED
