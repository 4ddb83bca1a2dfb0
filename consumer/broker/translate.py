"""Every aio-pika and aiormq error, turned into the service's own at the broker boundary."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiormq

from consumer.errors import BrokerUnavailable, ConfigError, NotFound

# What "the broker or the channel went away" looks like from aio-pika and aiormq.
UNAVAILABLE = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPError,
)
REFUSED = (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelAccessRefused)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn driver exceptions into the service's own.

    :class:`~consumer.errors.BrokerUnavailable` for "try again later",
    :class:`~consumer.errors.ConfigError` for a topology or permission that
    cannot work, :class:`~consumer.errors.NotFound` for a queue or exchange
    that is not there.
    """
    try:
        yield
    except REFUSED as exc:
        raise ConfigError(f"RabbitMQ refused {what}: {exc}") from None
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise NotFound(f"RabbitMQ: {what}: {exc}") from None
    except UNAVAILABLE as exc:
        raise BrokerUnavailable(f"RabbitMQ unavailable ({what}): {type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:
        # aio-pika reports a connection or channel that is closed or reconnecting with a bare
        # RuntimeError; inside these blocks nothing else raises one
        raise BrokerUnavailable(f"RabbitMQ unavailable ({what}): {exc}") from exc
