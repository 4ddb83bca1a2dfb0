"""Process lifecycle: check E2B, connect, migrate, start the roles and the health server, stop on a signal.

Failure policy of the background tasks: a role that ends with an exception
stops the whole process with exit code 1, for the supervisor to restart it;
the health probe never ends (a failing probe only marks the process unready).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from consumer import health
from consumer.broker import Broker
from consumer.e2b_adapter import DEFAULT_API_URL, Access, AccessCheck, E2BClient
from consumer.errors import AutopauseError, ConfigError, E2BError
from consumer.ratelimit import TokenBucket
from consumer.retrying import retrying, sleep_or_stop
from consumer.settings import PauseMode, Settings, env_name
from consumer.store import Store

if TYPE_CHECKING:
    from e2b_emulator import Emulator

log = logging.getLogger(__name__)

ROLES = ("ingest", "scheduler", "worker")
# the key the built-in emulator is started with (it checks that a key is sent, not which)
EMULATOR_KEY = "e2b_emulator"
T = TypeVar("T")


@dataclass
class Services:
    """What a role needs from the outside, opened once per process."""

    settings: Settings
    store: Store
    broker: Broker
    health: health.Health
    e2b_url: str | None


async def _retry(what: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event, patience: float) -> T:
    """Retry a start-up connection for a while: services in compose start in any order."""
    deadline = time.monotonic() + patience
    return await retrying(
        what, attempt, stop, role="startup", deadline=deadline, first_delay=0.5, max_delay=5
    )


def e2b_access(settings: Settings, api_url: str | None) -> tuple[E2BClient, TokenBucket]:
    """The E2B client and this process's share of E2B's rate limit."""
    client = E2BClient(
        api_key=settings.e2b_key or EMULATOR_KEY,
        api_url=api_url,
        request_timeout=settings.e2b_request_timeout,
        memory=settings.pause_mode is PauseMode.FULL,
    )
    rate = settings.worker_rate
    return client, TokenBucket(rate, capacity=max(1.0, rate / 10))


def check_e2b(settings: Settings, roles: set[str]) -> None:
    """A worker must know where its pauses go: a real key, or the emulator on purpose."""
    if "worker" not in roles or settings.dry_run:
        return
    if not settings.emulator and not settings.e2b_key:
        raise ConfigError(
            "the worker has no E2B API key: set AUTOPAUSE_E2B_API_KEY (or E2B_API_KEY), "
            "or choose the built-in emulator with --emulator / AUTOPAUSE_EMULATOR=true"
        )


def access_problem(check: AccessCheck, url: str) -> AutopauseError | None:
    """Pure: what a worker's start-up call to E2B means for the start; None: go on.

    A refused key is a setting that cannot work (exit 2). An API that cannot
    be reached, or a URL that does not answer as E2B's, is a service that is not
    there (exit 1), for the supervisor to try again. Other answers (429, 5xx,
    a slow one) cannot tell a good key from a bad one: the worker starts, and
    its pauses retry as they always do.
    """
    key, where = env_name("e2b_api_key"), env_name("e2b_api_url")
    match check.access:
        case Access.BAD_KEY:
            return ConfigError(
                f"E2B at {url} refused the API key ({check.error}): check {key} (or E2B_API_KEY)"
            )
        case Access.UNREACHABLE:
            return E2BError(
                f"cannot reach the E2B API at {url} ({check.error}): check {where}", retryable=True
            )
        case Access.NOT_E2B:
            return E2BError(
                f"{url} does not answer as the E2B API ({check.error}): check {where}", retryable=False
            )
    return None


async def verify_e2b(settings: Settings, roles: set[str], stop: asyncio.Event) -> bool:
    """A worker's one cheap authenticated call at start, so that a wrong key or URL stops it at once.

    An unreachable API is tried again for ``startup_patience`` seconds. Not made
    in dry run (which calls nothing) nor with the built-in emulator. False when
    ``stop`` was set meanwhile.
    """
    if "worker" not in roles or settings.dry_run or settings.emulator:
        return True
    client = E2BClient(
        api_key=settings.e2b_key or "",
        api_url=settings.e2b_api_url,
        request_timeout=settings.e2b_request_timeout,
    )
    url = settings.e2b_api_url or DEFAULT_API_URL
    deadline = time.monotonic() + settings.startup_patience
    delay = 0.5
    while (check := await client.check_access()).access is Access.UNREACHABLE:
        if time.monotonic() + delay > deadline:
            break
        log.warning(
            "E2B API unreachable, retrying",
            extra={"action": "e2b.unreachable", "url": url, "error": check.error, "retry_in": delay},
        )
        if await sleep_or_stop(stop, delay):
            return False
        delay = min(delay * 2, 5.0)
    problem = access_problem(check, url)
    if problem is not None:
        raise problem
    if check.access is Access.UNSURE:
        log.warning(
            "E2B did not confirm the API key at start; starting all the same",
            extra={"action": "e2b.unconfirmed", "url": url, "error": check.error},
        )
    else:
        log.info("E2B accepts the API key", extra={"action": "e2b.ready", "url": url})
    return True


async def run(
    settings: Settings,
    roles: set[str],
    *,
    burst: bool = False,
    once: bool = False,
    stop: asyncio.Event | None = None,
) -> int:
    """Run ``roles`` in this process until a signal or ``stop`` (or, with burst/once, until done)."""
    check_e2b(settings, roles)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if not await verify_e2b(settings, roles, stop):
        return 0

    state = health.Health()
    patience = settings.startup_patience
    store = await _retry(
        "PostgreSQL",
        lambda: Store.connect(
            settings.database_url.get_secret_value(),
            settings.database_schema,
            size=settings.db_pool_size,
        ),
        stop,
        patience,
    )
    emulator: Emulator | None = None
    runner = None
    broker: Broker | None = None
    try:
        await _retry("PostgreSQL", store.migrate, stop, patience)
        name = "+".join(sorted(roles))
        broker = await _retry("RabbitMQ", lambda: Broker.connect(settings, name), stop, patience)
        if settings.declare_topology:
            await _retry("RabbitMQ", broker.declare_topology, stop, patience)
        e2b_url = settings.e2b_api_url
        if settings.emulator and "worker" in roles:
            from e2b_emulator import Emulator

            emulator = Emulator(auto_create=True)
            e2b_url = await emulator.start()
            log.warning("using the built-in E2B emulator", extra={"action": "e2b.emulator", "url": e2b_url})
        services = Services(settings, store, broker, state, e2b_url)
        if settings.metrics_port:
            runner = await health.serve(state, settings.metrics_host, settings.metrics_port)
        return await _supervise(services, roles, stop, burst=burst, once=once)
    finally:
        if runner is not None:
            await runner.cleanup()
        if emulator is not None:
            await emulator.stop()
        if broker is not None:
            await broker.close()
        await store.close()


async def _supervise(
    services: Services, roles: set[str], stop: asyncio.Event, *, burst: bool, once: bool
) -> int:
    """Run the roles beside the health probe until they are done; the exit code."""

    async def broker_up() -> bool:
        return services.broker.is_open

    async def database_up() -> bool:
        await services.store.ping()
        return True

    probe = asyncio.create_task(
        health.probe_forever(services.health, {"database": database_up, "broker": broker_up}),
        name="health-probe",
    )
    try:
        tasks = _start_roles(services, roles, stop, burst=burst, once=once)
        return await _until_done(tasks, stop, finite=burst or once)
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe


def _start_roles(
    services: Services, roles: set[str], stop: asyncio.Event, *, burst: bool, once: bool
) -> dict[asyncio.Task[None], str]:
    """A task per role asked for (and reconcile beside a long-running worker), named by role."""
    from consumer.ingest import Ingest
    from consumer.reconcile import Reconciler
    from consumer.scheduler import Scheduler
    from consumer.worker import Worker

    tasks: dict[asyncio.Task[None], str] = {}
    if "ingest" in roles:
        ingest = Ingest(services.settings, services.store, services.broker, services.health, burst=burst)
        tasks[asyncio.create_task(ingest.run(stop), name="ingest")] = "ingest"
    if "scheduler" in roles:
        scheduler = Scheduler(services.settings, services.store, services.broker, services.health)
        tasks[asyncio.create_task(scheduler.run(stop, once=once), name="scheduler")] = "scheduler"
    if "worker" in roles:
        # one client and one rate limiter for every E2B request of the process: pauses,
        # repairs, CPU samples and reconcile
        client, bucket = e2b_access(services.settings, services.e2b_url)
        worker = Worker(services.settings, services.store, services.broker, services.health, client, bucket)
        tasks[asyncio.create_task(worker.run(stop, burst=burst), name="worker")] = "worker"
        if not burst:
            reconciler = Reconciler(services.settings, services.store, client, bucket, services.health)
            tasks[asyncio.create_task(reconciler.run_forever(stop), name="reconcile")] = "reconcile"
    return tasks


async def _until_done(tasks: dict[asyncio.Task[None], str], stop: asyncio.Event, *, finite: bool) -> int:
    """Wait for every role; 1 when one failed (the others are told to stop), else 0.

    Outside burst and once modes a role that returns on its own means the
    process must stop, so the others are told to.
    """
    code = 0
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                log.error(
                    f"{tasks[task]} failed, stopping",
                    exc_info=error,
                    extra={"action": "role.failed", "role": tasks[task]},
                )
                code = 1
                stop.set()
        if not finite:
            stop.set()
    return code
