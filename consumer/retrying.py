"""Waiting out an outage: one backoff loop for every role, and an interruptible sleep.

A role that meets :class:`~consumer.errors.StoreUnavailable` or
:class:`~consumer.errors.BrokerUnavailable` holds what it has, backs off and
tries again; it never exits and never turns valid input away because a service
was down. When the process is told to stop meanwhile, :class:`Stopping` is
raised and the caller leaves its work unsettled for the broker to redeliver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from consumer import metrics
from consumer.errors import BrokerUnavailable, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

OUTAGES = (StoreUnavailable, BrokerUnavailable)


class Stopping(Exception):
    """The process is stopping while a service is away: leave the work for redelivery."""


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when it is set."""
    if stop.is_set():
        return True
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def retrying(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    *,
    role: str,
    on_outage: Callable[[], None] | None = None,
    deadline: float | None = None,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
) -> T:
    """Run ``attempt`` until it succeeds, backing off while Postgres or RabbitMQ is away.

    Raises :class:`Stopping` when ``stop`` is set during an outage, and the
    outage itself once ``deadline`` (a ``time.monotonic()`` value) has passed.
    ``on_outage`` runs at every failed try (a role marks itself alive there:
    waiting on purpose is not hanging).
    """
    delay = first_delay
    while True:
        try:
            return await attempt()
        except OUTAGES as exc:
            service = "database" if isinstance(exc, StoreUnavailable) else "broker"
            metrics.OUTAGES.labels(role, service).inc()
            if isinstance(exc, StoreUnavailable):
                metrics.STORE_ERRORS.labels(role).inc()
            if on_outage is not None:
                on_outage()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            log.error(
                f"{what}: {service} unavailable, retrying",
                extra={"action": f"{role}.outage", "service": service, "error": str(exc), "retry_in": delay},
            )
            if await sleep_or_stop(stop, delay):
                raise Stopping(what) from exc
            delay = min(delay * 2, max_delay)
