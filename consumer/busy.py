"""CPU-aware pausing: E2B's latest metrics sample can veto a pause.

An agent or a build can work for many minutes with no user keystroke, so no
``sandbox.activity``; its CPU shows it. Just before a pause, the worker reads
the sandbox's latest sample; at or above ``busy_cpu_percent`` it is busy, not
paused, and its deadline starts again from now.

Samples are read in batches: every pause candidate of a 0.1 s window goes into
one ``GET /sandboxes/metrics`` request of up to 100 ids, sent while the one
before is still answered. While the worker is saturated (a batch of checked
commands already waits for a pause slot) the window stays open until the
request is full, since waiting then delays no pause: at fleet scale a thousand
pauses cost ten requests. Below that, candidates that trickle in cost one
request per window, the price of not holding a pause back for company. A
sandbox with no sample, or only a stale
one, is not kept running: without evidence of work the idle timeout decides,
and a sample E2B cannot give never blocks a pause forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from consumer import metrics
from consumer.e2b_adapter import METRICS_BATCH, CpuSample, E2BClient
from consumer.errors import E2BError
from consumer.ratelimit import TokenBucket

log = logging.getLogger(__name__)

# How long the first candidate of a batch waits for others to join it.
WINDOW = 0.1
# Requests in flight at once: a batch goes out while the previous one is still answered,
# so the check adds one request's latency to a pause, never a queue of them.
MAX_REQUESTS = 4


def is_busy(sample: CpuSample | None, now: datetime, threshold_pct: float, max_age_s: float) -> bool:
    """Pure: does this sample prove the sandbox is working? (No check when the threshold is 0.)"""
    if threshold_pct <= 0 or sample is None:
        return False
    if (now - sample.at).total_seconds() > max_age_s:
        return False
    return sample.cpu_used_pct >= threshold_pct


class CpuProbe:
    """The latest CPU sample of pause candidates, one E2B request per batch of up to 100."""

    def __init__(
        self,
        client: E2BClient,
        bucket: TokenBucket,
        window: float = WINDOW,
        saturated: Callable[[], bool] = lambda: False,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._window = window
        self._saturated = saturated
        self._waiting: dict[str, list[asyncio.Future[CpuSample | None]]] = {}
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()

    async def sample(self, sandbox_id: str) -> CpuSample | None:
        """The sandbox's latest sample, or None when E2B has none or cannot say now."""
        future: asyncio.Future[CpuSample | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(sandbox_id, []).append(future)
        if len(self._waiting) >= METRICS_BATCH:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_while_waiting(), name="cpu-samples")
        return await future

    async def _flush_while_waiting(self) -> None:
        """Cut a batch per window (sooner when it is full) until nobody waits, and send each
        without waiting for the one before: up to MAX_REQUESTS in flight."""
        while self._waiting:
            await self._gather()
            self._full.clear()
            if len(self._requests) >= MAX_REQUESTS:
                await asyncio.wait(self._requests, return_when=asyncio.FIRST_COMPLETED)
            batch = {sid: self._waiting.pop(sid) for sid in list(self._waiting)[:METRICS_BATCH]}
            request = asyncio.create_task(self._answer(batch), name="cpu-samples-request")
            self._requests.add(request)
            request.add_done_callback(self._requests.discard)
            if len(self._waiting) >= METRICS_BATCH:
                self._full.set()

    async def _gather(self) -> None:
        """The batching window: candidates arriving meanwhile join this request. While the
        caller is saturated (candidates that passed the check wait for it anyway) a longer
        wait costs no pause anything, so the window stays open until the batch is full."""
        while True:
            try:
                await asyncio.wait_for(self._full.wait(), self._window)
                return
            except TimeoutError:
                if not self._saturated():
                    return

    async def _answer(self, batch: dict[str, list[asyncio.Future[CpuSample | None]]]) -> None:
        """One request for a batch. Failure policy: an error answers None to the batch's waiters
        (no evidence of work); nobody waits forever."""
        samples: dict[str, CpuSample] = {}
        try:
            metrics.RATE_LIMIT_WAIT.observe(await self._bucket.take())
            samples = await self._client.cpu_samples(list(batch))
        except E2BError as exc:
            log.warning("CPU samples not read", extra={"action": "worker.cpu_samples", "error": str(exc)})
        except Exception as exc:
            log.error("CPU samples failed", exc_info=exc, extra={"action": "worker.cpu_samples"})
        finally:
            for sandbox_id, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(samples.get(sandbox_id))
