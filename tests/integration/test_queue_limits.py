"""Back-pressure that shows: a full queue in `autopause status`, in metrics, and nacked to producers."""

from __future__ import annotations

import aio_pika
import orjson

from consumer import runner
from consumer.broker import Names, declare_topology, message, publish_all
from consumer.settings import Settings
from consumer.store import Store

from ..helpers.events import event
from ..helpers.metrics import metric
from ..helpers.processes import cli


async def test_a_full_events_queue_nacks_producers_and_shows_in_status_and_metrics(
    settings: Settings, store: Store
) -> None:
    limited = settings.model_copy(update={"events_queue_max_length": 5, "dead_letter_max_length": 7})
    names = Names(limited.topology_prefix)
    connection = await aio_pika.connect(limited.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare_topology(channel, limited)
        exchange = await channel.get_exchange(names.events_exchange)
        bodies = [event("activity", f"sbx-{i}") for i in range(8)]
        confirmed = await publish_all(
            exchange, [("sandbox.activity", message(orjson.dumps(b))) for b in bodies], window=1
        )
    # a quorum queue refuses once it is over its cap: it takes one message more
    assert confirmed == [True] * 6 + [False] * 2, "events past the cap must be refused, not dropped"

    caps = {"AUTOPAUSE_EVENTS_QUEUE_MAX_LENGTH": "5", "AUTOPAUSE_DEAD_LETTER_MAX_LENGTH": "7"}
    done = await cli(limited, "status", "--json", **caps)
    assert done.returncode == 0, done.stderr
    queues = orjson.loads(done.stdout)["queues"]
    assert queues[names.events_queue] == {"messages": 6, "consumers": 0, "limit": 5, "full": True}
    assert queues[names.events_dlq] == {"messages": 0, "consumers": 0, "limit": 7, "full": False}
    assert queues[names.pause_queue]["limit"] is None and queues[names.pause_queue]["full"] is False
    text = await cli(limited, "status", **caps)
    events_line = next(line for line in text.stdout.splitlines() if line.startswith(names.events_queue + " "))
    assert events_line.split()[1:] == ["6", "0", "5", "FULL"]

    # the scheduler samples depths and limits for the dashboard and the alert
    assert await runner.run(limited, {"scheduler"}, once=True) == 0
    assert metric("autopause_queue_limit", queue=names.events_queue) == 5
    assert metric("autopause_queue_limit", queue=names.events_dlq) == 7
    assert metric("autopause_queue_messages", queue=names.events_queue) == 6
