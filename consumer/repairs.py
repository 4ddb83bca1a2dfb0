"""Repairs: sandboxes a pause may have hit while in use, resumed at once.

Two ways lead here. The worker whose closing compare-and-set finds its row
RUNNING (activity landed during the E2B call) repairs it under the attempt it
holds (:meth:`Repairer.repair_own`). Activity that lands after a pause was
written makes ingest flag the row (``resume_requested_at``); every worker
looks for flagged rows each ``repair_interval`` (:meth:`Repairer.run_forever`).

A repair asks E2B first: a sandbox that runs (the app's connect() resumed it)
needs nothing; a paused one is resumed with at least the lifetime it had left
before the pause, and the transition says ``paused_in_use`` (our pause) or
``resumed_for_use`` (a pause E2B made by itself); a gone one becomes KILLED.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from consumer import metrics
from consumer.e2b_adapter import CallOutcome, E2BClient
from consumer.errors import StoreUnavailable
from consumer.ratelimit import TokenBucket
from consumer.retrying import sleep_or_stop
from consumer.settings import Settings
from consumer.state import Reason, State
from consumer.store import Repair, Store

log = logging.getLogger(__name__)


def resume_lifetime(
    recorded_s: float | None, end_at: datetime | None, now: datetime, fallback_s: float
) -> float:
    """Pure: seconds of life to give a sandbox resumed after a pause hit it in use.

    At least what it had left when it was paused (recorded then), and at least
    what E2B says its end of life is now (the app may have extended it since);
    ``fallback_s`` when neither is known.
    """
    known = [s for s in (recorded_s, (end_at - now).total_seconds() if end_at else None) if s is not None]
    return max(known) if known else fallback_s


class Repairer:
    """Finds and repairs sandboxes paused while in use (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store, client: E2BClient, bucket: TokenBucket) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.bucket = bucket

    async def repair_own(self, sandbox_id: str, attempt_id: uuid.UUID) -> None:
        """Our pause raced with activity: resume the sandbox now, under the attempt we hold."""
        try:
            repair = await self.store.take_own_repair(sandbox_id, attempt_id, self.settings.attempt_hold)
        except StoreUnavailable as exc:
            log.error("repair left to the next round", extra={"action": "worker.repair", "error": str(exc)})
            return
        if repair is not None:
            await self.repair(repair, attempt_id)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Every ``repair_interval``, repair the rows ingest flagged. Failure policy: log, next round."""
        while not stop.is_set():
            holder = uuid.uuid4()
            try:
                repairs = await self.store.take_repairs(
                    holder, self.settings.attempt_hold, self.settings.worker_concurrency
                )
            except StoreUnavailable as exc:
                log.error("repairs not read", extra={"action": "worker.repair", "error": str(exc)})
                repairs = []
            except Exception as exc:  # the next round tries again; a repair loop never stops
                log.error("repairs not read", exc_info=exc, extra={"action": "worker.repair"})
                repairs = []
            if repairs:
                await asyncio.gather(*(self.repair(r, holder) for r in repairs))
            if await sleep_or_stop(stop, self.settings.repair_interval):
                return

    async def repair(self, repair: Repair, holder: uuid.UUID) -> None:
        """Ask E2B; resume the sandbox if a pause left it paused while in use. Never raises."""
        sid = repair.sandbox_id
        try:
            metrics.RATE_LIMIT_WAIT.observe(await self.bucket.take())
            info = await self.client.info(sid)
            metrics.E2B_LATENCY.labels("info").observe(info.latency)
            if info.outcome is CallOutcome.GONE:
                await self.store.finish_repair(sid, holder, Reason.GONE, None)
                return
            if info.outcome is not CallOutcome.OK or info.sandbox is None:
                await self.store.delay_repair(sid, holder, self.settings.retry_base_delay * 4)
                return
            if info.sandbox.state != "paused":
                await self.store.finish_repair(sid, holder, None, None)
                return
            lifetime = resume_lifetime(
                repair.lifetime_left_s, info.sandbox.end_at, datetime.now(UTC), self.settings.resume_timeout
            )
            metrics.RATE_LIMIT_WAIT.observe(await self.bucket.take())
            resumed = await self.client.resume(sid, lifetime)
            metrics.E2B_LATENCY.labels("connect").observe(resumed.latency)
            if resumed.outcome is CallOutcome.OK:
                await self._record(repair, holder, lifetime)
            elif resumed.outcome is CallOutcome.GONE:
                await self.store.finish_repair(sid, holder, Reason.GONE, None)
            else:
                await self.store.delay_repair(sid, holder, self.settings.retry_base_delay * 4)
        except StoreUnavailable as exc:
            # the row stays flagged; its hold runs out and the next round takes it again
            log.error("repair not recorded", extra={"action": "worker.repair", "error": str(exc)})
        except Exception as exc:  # the same: the flag stays, the next round takes it again
            log.error("repair failed", exc_info=exc, extra={"action": "worker.repair", "sandbox_id": sid})

    async def _record(self, repair: Repair, holder: uuid.UUID, lifetime: float) -> None:
        detail = {
            "claimed_activity": repair.claimed_activity.isoformat() if repair.claimed_activity else None,
            "activity_at": repair.last_activity.isoformat(),
            "lifetime_s": round(lifetime, 1),
        }
        # no claim of ours saw the row when it was paused outside (E2B's own timeout)
        reason = Reason.PAUSED_IN_USE if repair.claimed_activity is not None else Reason.RESUMED_FOR_USE
        if await self.store.finish_repair(repair.sandbox_id, holder, reason, detail):
            metrics.TRANSITIONS.labels("worker", State.RUNNING.value, reason).inc()
            if reason is Reason.PAUSED_IN_USE:
                metrics.PAUSED_IN_USE.inc()
            log.warning(
                "a paused sandbox was in use; resumed it",
                extra={"action": f"worker.{reason}", "sandbox_id": repair.sandbox_id, **detail},
            )
