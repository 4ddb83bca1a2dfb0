"""The one module that talks to E2B, through the real ``e2b`` SDK.

It turns what the SDK returns or raises into the service's own outcomes, so
the worker decides on an :class:`CallOutcome` and never sees an SDK type::

    answer                                        outcome
    pause 204 (SDK: True)                         PAUSED
    pause 409 (SDK: False)                        ALREADY_PAUSED
    get_info / connect 200, 201                   OK, with what E2B says of the sandbox
    404 SandboxNotFoundException                  GONE
    429, 503 (busy), 5xx, timeouts, no connection RETRYABLE
    401 and anything else                         FAILED, with a short error text

The SDK's own response retries are off (``retries=0``): the worker retries
with its own backoff under its own rate limit, so every request that reaches
E2B is one it counted. (The SDK still retries failures to *connect*, which by
construction never reach the server.) The API key never appears in an error
text.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

import httpx
from e2b import AsyncSandbox, SandboxQuery, SandboxState
from e2b.api.client.api.sandboxes import get_sandboxes_metrics
from e2b.api.client.models import SandboxesWithMetrics
from e2b.api.client_async import get_api_client
from e2b.connection_config import ApiParams, ConnectionConfig
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    ServiceBusyException,
    TimeoutException,
)
from e2b.sandbox.sandbox_api import SnapshotMode

from consumer.errors import E2BError

DEFAULT_API_URL = "https://api.e2b.app"
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_MAX_ERROR_CHARS = 300

T = TypeVar("T")


class CallOutcome(StrEnum):
    """What an E2B call achieved, as far as the worker has to know."""

    OK = "ok"
    PAUSED = "paused"
    ALREADY_PAUSED = "already_paused"
    GONE = "gone"
    RETRYABLE = "retryable"
    FAILED = "failed"


# The longest lifetime E2B gives a sandbox (its Pro plan), for a resume.
MAX_LIFETIME_S = 86_400


# E2B lists at most this many sandboxes a page, and samples this many in one metrics request.
PAGE_SIZE = 100
METRICS_BATCH = 100


@dataclass(frozen=True)
class SandboxView:
    """What E2B says of one sandbox."""

    state: str  # "running" or "paused"
    end_at: datetime | None
    cpu_count: int | None = None
    memory_mb: int | None = None
    sandbox_id: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CpuSample:
    """The latest metrics sample of a sandbox: CPU in use (percent of its vCPUs) and when."""

    cpu_used_pct: float
    at: datetime


@dataclass(frozen=True)
class CallResult:
    """The outcome of one call; ``latency`` is its wall time in seconds."""

    outcome: CallOutcome
    error: str | None = None
    latency: float = 0.0
    sandbox: SandboxView | None = None


class Access(StrEnum):
    """What one authenticated call says of the key and the URL a worker was given."""

    OK = "ok"
    BAD_KEY = "bad_key"  # 401 or 403
    UNREACHABLE = "unreachable"  # no connection: no such host, refused, connect timeout
    NOT_E2B = "not_e2b"  # an answer, but not the E2B API's (404 and the like)
    UNSURE = "unsure"  # 429, 5xx or no answer in time: the key may be right or wrong


@dataclass(frozen=True)
class AccessCheck:
    access: Access
    error: str | None = None


def access_of(exc: BaseException) -> Access:
    """Map an exception from the access check to what it says of the key and URL."""
    if isinstance(exc, AuthenticationException):
        return Access.BAD_KEY
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | ConnectionRefusedError):
        return Access.UNREACHABLE
    status = (exc.status_code or 0) if isinstance(exc, SandboxException) else 0
    if status == 403:
        return Access.BAD_KEY
    if classify(exc) is CallOutcome.RETRYABLE:
        return Access.UNSURE
    if 400 <= status < 500:
        return Access.NOT_E2B
    return Access.UNSURE


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

    async def check_access(self) -> AccessCheck:
        """One cheap authenticated call: the first page of the sandbox list, one item long.

        It reads, changes nothing, and is the smallest request of the API that
        needs the key (``GET /v2/sandboxes?limit=1``).
        """
        if not self._api_key:
            return AccessCheck(Access.BAD_KEY, "no E2B API key configured")
        try:
            async with asyncio.timeout(self._timeout + 1):
                await AsyncSandbox.list(limit=1, **self._opts).next_items()
        except Exception as exc:
            return AccessCheck(access_of(exc), self._describe(exc))
        return AccessCheck(Access.OK)

    async def pause(self, sandbox_id: str) -> CallResult:
        """Pause ``sandbox_id``; every API answer becomes a result, none raises."""
        started = time.monotonic()
        if not self._api_key:
            return CallResult(CallOutcome.FAILED, "no E2B API key configured")
        try:
            async with asyncio.timeout(self._timeout + 1):
                paused = await AsyncSandbox.pause(sandbox_id, mode=self._mode, **self._opts)
        except Exception as exc:
            outcome = classify(exc)
            return CallResult(outcome, self._describe(exc), time.monotonic() - started)
        outcome = CallOutcome.PAUSED if paused else CallOutcome.ALREADY_PAUSED
        return CallResult(outcome, None, time.monotonic() - started)

    async def info(self, sandbox_id: str) -> CallResult:
        """What E2B says of ``sandbox_id`` (state, end of life, size); every answer becomes a result."""
        started = time.monotonic()
        try:
            info = await self._call(lambda: AsyncSandbox.get_info(sandbox_id, **self._opts))
        except _Gone:
            return CallResult(CallOutcome.GONE, None, time.monotonic() - started)
        except E2BError as exc:
            outcome = CallOutcome.RETRYABLE if exc.retryable else CallOutcome.FAILED
            return CallResult(outcome, str(exc), time.monotonic() - started)
        view = SandboxView(str(info.state.value), info.end_at, info.cpu_count, info.memory_mb)
        return CallResult(CallOutcome.OK, None, time.monotonic() - started, view)

    async def resume(self, sandbox_id: str, lifetime_s: float) -> CallResult:
        """Resume ``sandbox_id`` (connect) and let it live ``lifetime_s`` seconds from now."""
        started = time.monotonic()
        timeout = max(1, min(MAX_LIFETIME_S, math.ceil(lifetime_s)))
        try:
            await self._call(lambda: AsyncSandbox.connect(sandbox_id, timeout=timeout, **self._opts))
        except _Gone:
            return CallResult(CallOutcome.GONE, None, time.monotonic() - started)
        except E2BError as exc:
            outcome = CallOutcome.RETRYABLE if exc.retryable else CallOutcome.FAILED
            return CallResult(outcome, str(exc), time.monotonic() - started)
        return CallResult(CallOutcome.OK, None, time.monotonic() - started)

    async def list_sandboxes(self, before_page: Callable[[], Awaitable[object]]) -> list[SandboxView]:
        """Every running and paused sandbox of the team, page by page (``before_page`` runs first each time).

        Raises E2BError when a page fails: a partial listing is never returned.
        """
        query = SandboxQuery(state=[SandboxState.RUNNING, SandboxState.PAUSED])
        paginator = AsyncSandbox.list(query=query, limit=PAGE_SIZE, **self._opts)
        found: list[SandboxView] = []
        while paginator.has_next:
            await before_page()
            for info in await self._call(paginator.next_items):
                found.append(
                    SandboxView(
                        str(info.state.value),
                        info.end_at,
                        info.cpu_count,
                        info.memory_mb,
                        info.sandbox_id,
                        tuple(sorted(info.metadata.items())),
                    )
                )
        return found

    async def cpu_samples(self, sandbox_ids: list[str]) -> dict[str, CpuSample]:
        """The latest sample of up to METRICS_BATCH sandboxes in one request; none for a sandbox
        E2B has no sample of. Raises E2BError when the request fails."""
        if len(sandbox_ids) > METRICS_BATCH:
            raise ValueError(f"at most {METRICS_BATCH} sandboxes a request")
        config = ConnectionConfig(**self._opts)
        response = await self._call(
            lambda: get_sandboxes_metrics.asyncio_detailed(
                client=get_api_client(config), sandbox_ids=sandbox_ids
            )
        )
        if response.status_code != 200 or not isinstance(response.parsed, SandboxesWithMetrics):
            retryable = response.status_code in _RETRYABLE_STATUSES or response.status_code >= 500
            raise E2BError(f"metrics: HTTP {response.status_code}", retryable=retryable)
        samples: dict[str, CpuSample] = {}
        for sandbox_id, sample in (response.parsed.sandboxes or {}).items():
            try:
                at = datetime.fromisoformat(sample["timestamp"])
                samples[str(sandbox_id)] = CpuSample(float(sample["cpuUsedPct"]), at)
            except (KeyError, TypeError, ValueError):
                continue  # a sample we cannot read is no evidence of work
        return samples

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
            if outcome is CallOutcome.GONE:
                raise _Gone from None
            # from None: an httpx exception holds the request, with the key in its headers.
            raise E2BError(self._describe(exc), retryable=outcome is CallOutcome.RETRYABLE) from None

    def _describe(self, exc: BaseException) -> str:
        """A short error text, with the API key scrubbed out."""
        text = f"{type(exc).__name__}: {exc}".strip().removesuffix(":")
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text[:_MAX_ERROR_CHARS]


class _Gone(Exception):
    """The sandbox does not exist (any more)."""


def classify(exc: BaseException) -> CallOutcome:
    """Map an exception from an SDK call to an outcome; success is mapped by the caller."""
    if isinstance(exc, NotFoundException):
        return CallOutcome.GONE
    if isinstance(exc, AuthenticationException):
        return CallOutcome.FAILED
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
        return CallOutcome.RETRYABLE
    if isinstance(exc, SandboxException):
        status = exc.status_code or 0
        if status == 404:
            return CallOutcome.GONE
        if status in _RETRYABLE_STATUSES or status >= 500:
            return CallOutcome.RETRYABLE
    return CallOutcome.FAILED
