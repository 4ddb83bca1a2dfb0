"""RabbitMQ, and the one boundary that consumes, acks, publishes and dead-letters.

The roles never hold a driver exception or an ack: :class:`Broker`
(``connection``) hands them a :class:`Consumer` (``consuming``: deliveries
in, settled deliveries acked, dead letters published with confirms) and
:class:`Publisher` objects (``publishing``). Every aio-pika and aiormq error
is translated at this boundary (``translate``). Names and the declared
topology are in ``topology``.
"""

from __future__ import annotations

from consumer.broker.connection import Broker, QueueState, connected, connection_name
from consumer.broker.consuming import Consumer, DeadLetter, Delivery, ack_plan, producer_headers
from consumer.broker.publishing import Outgoing, Publisher, publish_all
from consumer.broker.topology import (
    BROKER_DEATH_HEADERS,
    DETAIL_HEADER,
    OWN_HEADER_PREFIX,
    PAUSE_ROUTING_KEY,
    PROBE_ROUTING_KEY,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    Names,
    declare_topology,
    delete_topology,
    message,
    queue_limits,
)
from consumer.broker.translate import translated

__all__ = [
    "BROKER_DEATH_HEADERS",
    "DETAIL_HEADER",
    "OWN_HEADER_PREFIX",
    "PAUSE_ROUTING_KEY",
    "PROBE_ROUTING_KEY",
    "REASON_HEADER",
    "ROUTING_KEY_HEADER",
    "Broker",
    "Consumer",
    "DeadLetter",
    "Delivery",
    "Names",
    "Outgoing",
    "Publisher",
    "QueueState",
    "ack_plan",
    "connected",
    "connection_name",
    "declare_topology",
    "delete_topology",
    "message",
    "producer_headers",
    "publish_all",
    "queue_limits",
    "translated",
]
