"""Three scenes of the demo that app events alone cannot show: what E2B itself knows.

- a sandbox no app announced, running in the reconcile scope: adopted, then paused when idle;
- an agent at work with no user in sight (busy CPU, no events): never paused;
- a paused sandbox that E2B resumes by itself (auto-resume): noticed by reconcile.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from aio_pika.abc import AbstractExchange

from consumer.broker import message
from consumer.state import Reason, State
from consumer.store import Store
from consumer.traffic import event_body

if TYPE_CHECKING:
    from e2b_emulator import Emulator

SCOPE = {"app": "autopause-demo"}
STRAY = "stray-never-announced"
AGENT = "agent-busy-no-events"
WOKEN = "woken-by-e2b"


@dataclass(frozen=True)
class Scenes:
    """What became of the three sandboxes, from their transitions."""

    stray_adopted: bool
    stray_paused: bool
    agent_vetoes: int
    agent_paused: bool
    woken_noticed: bool

    @property
    def ok(self) -> bool:
        return (
            self.stray_adopted
            and self.stray_paused
            and self.agent_vetoes > 0
            and not self.agent_paused
            and self.woken_noticed
        )

    def lines(self) -> list[str]:
        return [
            f"a sandbox no app announced: {'adopted' if self.stray_adopted else 'NOT adopted'},"
            f" {'paused when idle' if self.stray_paused else 'NOT paused'}",
            f"an agent busy with no events: {self.agent_vetoes} pauses vetoed by its CPU,"
            f" {'PAUSED while busy' if self.agent_paused else 'kept running'}",
            f"a sandbox E2B resumed by itself: {'noticed' if self.woken_noticed else 'NOT noticed'}",
        ]


async def stage(emulator: Emulator, exchange: AbstractExchange, store: Store, stop: asyncio.Event) -> None:
    """Set the scenes up, then resume WOKEN "outside" once autopause has paused it."""
    emulator.add_sandbox(STRAY, metadata=SCOPE)
    emulator.add_sandbox(AGENT, cpu_used_pct=90.0)
    emulator.add_sandbox(WOKEN)
    for sandbox in (AGENT, WOKEN):
        body = event_body("created", sandbox, project_id="demo-agents", user_id="demo")
        await exchange.publish(message(orjson.dumps(body)), routing_key="sandbox.created")
    while not stop.is_set():
        found = await store.get_session(WOKEN)
        if found is not None and found.state is State.PAUSED:
            emulator.resume_outside(WOKEN)  # as E2B's auto-resume does on a request
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            continue


async def observe(store: Store) -> Scenes:
    reasons = {sid: [t.reason for t in await store.transitions_of(sid)] for sid in (STRAY, AGENT, WOKEN)}
    return Scenes(
        stray_adopted=Reason.ADOPTED in reasons[STRAY],
        stray_paused=Reason.PAUSED in reasons[STRAY],
        agent_vetoes=reasons[AGENT].count(Reason.BUSY_CPU),
        agent_paused=Reason.PAUSED in reasons[AGENT],
        woken_noticed=Reason.RESUMED_OUTSIDE in reasons[WOKEN],
    )
