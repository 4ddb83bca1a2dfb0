"""``autopause demo``: the whole pipeline on this machine, against the built-in E2B emulator.

Every role runs in this process, simulated users publish events, a live view
shows sessions, pauses, resumes and savings; at the end the run is judged
against the users' real behaviour: every sandbox left idle past its timeout
must have been paused, and none must have been paused while in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, TextIO

import aio_pika
import asyncpg

from consumer import broker, metrics, runner, showcase
from consumer.e2b_adapter import E2BClient
from consumer.operations import default_size_price, prices
from consumer.settings import Settings
from consumer.store import Store
from consumer.traffic import Plan, SimUser, Traffic

DEMO_KEY = "e2b_demo_key"
# How late a pause may come after the idle deadline: a tick (1 s) plus ingest and worker time.
LATE_ALLOWANCE = 3.0
# How close to fresh activity a pause may land without being called wrong: clock and ingest lag.
EARLY_ALLOWANCE = 1.0


@dataclass(frozen=True)
class Verdict:
    idle_spans: int
    missed: list[str]
    wrongly_paused: list[str]

    @property
    def ok(self) -> bool:
        return not self.missed and not self.wrongly_paused


def judge(users: list[SimUser], pauses: dict[str, list[float]], timeout: float, end: float) -> Verdict:
    """Pure: compare the pauses E2B saw with when each sandbox was really used."""
    missed, wrong, spans = [], [], 0
    for user in users:
        calls = pauses.get(user.sandbox_id, [])
        for at in calls:
            if any(at - timeout + EARLY_ALLOWANCE < used <= at for used in user.activity):
                wrong.append(user.sandbox_id)
        for start, stop in user.idle_spans(end):
            if stop - start < timeout + LATE_ALLOWANCE:
                continue
            spans += 1
            if not any(start + timeout - EARLY_ALLOWANCE <= at <= stop for at in calls):
                missed.append(user.sandbox_id)
    return Verdict(spans, sorted(set(missed)), sorted(set(wrong)))


def passed(final: dict[str, Any], verdict: Verdict, scenes: showcase.Scenes, service_code: int) -> bool:
    """The run shows autopause working: it paused, missed no idle sandbox, paused none in use,
    and E2B's own view played its part in the three scenes."""
    return (
        verdict.ok and scenes.ok and service_code == 0 and final["paused"] > 0 and not final["paused_in_use"]
    )


def demo_settings(base: Settings, idle_timeout: float) -> Settings:
    """The demo's own schema and names, so that it never touches a real deployment's."""
    return base.model_copy(
        update={
            "database_schema": "autopause_demo",
            "topology_prefix": "demo.",
            "default_idle_timeout": idle_timeout,
            "tick_cron": "* * * * * *",
            "flush_interval": 0.1,
            "claim_max_share": 1.0,
            "retry_base_delay": 0.1,
            "retry_max_delay": 1.0,
            "e2b_request_timeout": 5.0,
            "metrics_port": 0,
            "emulator": False,
            "dry_run": False,
            "auto_pause_enabled": True,
            # E2B's own view, every two seconds: strays in the demo's scope are adopted
            "reconcile_cron": "*/2 * * * * *",
            "reconcile_metadata": ",".join(f"{k}={v}" for k, v in showcase.SCOPE.items()),
            "busy_cpu_percent": 50.0,
        }
    )


async def reset(settings: Settings) -> None:
    """Start from nothing: the demo schema and broker names are dropped and made anew."""
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
    finally:
        await conn.close()
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        await broker.delete_topology(channel, settings.topology_prefix)
        await broker.declare_topology(channel, settings)


async def snapshot(store: Store, settings: Settings) -> dict[str, Any]:
    recent = await store.transitions_since(24 * 3600)
    paused_seconds, saved = await store.paused_usage(prices(settings))
    return {
        "states": await store.count_by_state(),
        "paused": sum(n for (to, _), n in recent.items() if to == "PAUSED"),
        "resumed": sum(n for (_, reason), n in recent.items() if reason == "resumed"),
        "cancelled": sum(n for (_, reason), n in recent.items() if reason == "activity_during_pause"),
        "paused_seconds": paused_seconds,
        "saved": saved,
        # the service's own count (every role runs in this process)
        "paused_in_use": metrics.value("autopause_paused_in_use_total"),
    }


def render(snap: dict[str, Any], *, elapsed: float, duration: float, published: int) -> str:
    states = "  ".join(f"{state} {n}" for state, n in snap["states"].items())
    return "\n".join(
        [
            f"autopause demo  {elapsed:5.1f}s / {duration:.0f}s",
            f"sessions        {states}",
            f"events sent     {published}",
            f"pauses          {snap['paused']}   resumes {snap['resumed']}   "
            f"pauses cancelled by activity {snap['cancelled']}",
            f"paused time     {snap['paused_seconds']:.0f} sandbox-seconds = ${snap['saved']:.6f} saved",
        ]
    )


async def run_demo(base: Settings, *, duration: float, users: int, idle_timeout: float, out: TextIO) -> int:
    from e2b_emulator import Emulator

    settings = demo_settings(base, idle_timeout)
    await reset(settings)
    async with Emulator(auto_create=True, api_key=DEMO_KEY) as emulator:
        settings = settings.model_copy(
            update={"e2b_api_url": emulator.url, "e2b_api_key": type(settings.amqp_url)(DEMO_KEY)}
        )
        store = await Store.connect(
            settings.database_url.get_secret_value(), settings.database_schema, size=2
        )
        await store.migrate()
        stop_service = asyncio.Event()
        service = asyncio.create_task(
            runner.run(settings, set(runner.ROLES), stop=stop_service), name="service"
        )
        connection = (await broker.Broker.connect(settings, "demo-traffic")).connection
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(broker.Names(settings.topology_prefix).events_exchange)
            client = E2BClient(api_key=DEMO_KEY, api_url=emulator.url, request_timeout=5)
            traffic = Traffic(exchange, users, Plan(idle_timeout), seed=42, resume=client.connect)
            stop_traffic = asyncio.Event()
            started = time.monotonic()
            users_task = asyncio.create_task(traffic.run(stop_traffic), name="traffic")
            scenes_task = asyncio.create_task(
                showcase.stage(emulator, exchange, store, stop_traffic), name="showcase"
            )
            await _watch(store, traffic, settings, started, duration, out, service)
            stop_traffic.set()
            await asyncio.gather(users_task, scenes_task)
            end = time.monotonic()
            final = await snapshot(store, settings)
            scenes = await showcase.observe(store)
        finally:
            stop_service.set()
            code = await service
            await connection.close()
            await store.close()
        pauses: dict[str, list[float]] = {}
        for call in emulator.calls("pause"):
            if call.status == 204 and call.sandbox_id:
                pauses.setdefault(call.sandbox_id, []).append(call.at)
        verdict = judge(traffic.users, pauses, idle_timeout, end)
        out.write(
            summary(final, verdict, scenes, traffic, settings, duration=end - started, service_code=code)
            + "\n"
        )
        return 0 if passed(final, verdict, scenes, code) else 1


async def _watch(
    store: Store,
    traffic: Traffic,
    settings: Settings,
    started: float,
    duration: float,
    out: TextIO,
    service: asyncio.Task[int],
) -> None:
    """Refresh the live view until ``duration`` passes (or the service stops)."""
    tty = out.isatty()
    last_line = 0.0
    while (elapsed := time.monotonic() - started) < duration and not service.done():
        snap = await snapshot(store, settings)
        view = render(
            snap,
            elapsed=elapsed,
            duration=duration,
            published=traffic.published,
        )
        if tty:
            out.write("\x1b[H\x1b[J" + view + "\n")
        elif elapsed - last_line >= 5 or last_line == 0:
            out.write(
                view.splitlines()[0] + " | " + " | ".join(v.strip() for v in view.splitlines()[1:]) + "\n"
            )
            last_line = elapsed or 0.001
        out.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(service), timeout=1.0)


def summary(
    final: dict[str, Any],
    verdict: Verdict,
    scenes: showcase.Scenes,
    traffic: Traffic,
    settings: Settings,
    *,
    duration: float,
    service_code: int,
) -> str:
    users = len(traffic.users)
    breakers = sum(u.wanders_off for u in traffic.users)
    share = final["paused_seconds"] / max(1.0, users * duration)
    saved = final["saved"]
    price = default_size_price(settings)
    # the same paused share over a month, for a fleet of 1,000 sandboxes
    monthly = share * 1000 * 86400 * 30 * price
    paused_spans = verdict.idle_spans - len(verdict.missed)
    lines = [
        "",
        "== autopause demo summary ==",
        f"ran {duration:.0f}s with {users} simulated users ({breakers} take long breaks),"
        f" idle timeout {settings.default_idle_timeout:.0f}s, {traffic.published} events sent",
        "sessions:  " + "  ".join(f"{state} {n}" for state, n in final["states"].items()),
        f"pauses: {final['paused']}   resumes: {final['resumed']}"
        f"   pauses cancelled by activity: {final['cancelled']}",
        f"paused time: {final['paused_seconds']:.0f} sandbox-seconds ({share:.0%} of all sandbox time)",
        f"savings: ${saved:.6f} in this run at ${price:.8f} per second of a default-size sandbox;"
        f" at this share a fleet of 1,000 sandboxes saves ${monthly:,.0f} a month",
        f"idle periods past the timeout: {verdict.idle_spans}, paused: {paused_spans}",
        f"sandboxes paused while in use: {final['paused_in_use']:.0f}"
        " (pauses that raced with activity, each resumed at once)",
    ]
    if verdict.missed:
        lines.append("NOT paused though idle: " + ", ".join(verdict.missed[:10]))
    if verdict.wrongly_paused:
        lines.append("paused within moments of use: " + ", ".join(verdict.wrongly_paused[:10]))
    if service_code:
        lines.append(f"the service stopped with exit code {service_code}")
    lines.extend(scenes.lines())
    lines.append("result: OK" if passed(final, verdict, scenes, service_code) else "result: FAILED")
    return "\n".join(lines)
