"""The CPU check at fleet scale: one metrics request per 100 candidates, and requests that overlap."""

from __future__ import annotations

import asyncio

from consumer.busy import CpuProbe
from consumer.e2b_adapter import CpuSample, E2BClient
from consumer.ratelimit import TokenBucket
from e2b_emulator import Emulator

from ..helpers.config import E2B_KEY as KEY


async def test_candidates_share_requests_of_a_hundred_and_each_gets_its_own_sample(
    emulator: Emulator,
) -> None:
    ids = [f"sbx-cpu-{i:03d}" for i in range(250)]
    for i, sandbox_id in enumerate(ids):
        emulator.add_sandbox(sandbox_id, cpu_used_pct=float(i % 100))
    client = E2BClient(api_key=KEY, api_url=emulator.url, request_timeout=10)
    probe = CpuProbe(client, TokenBucket(rate=1000, capacity=1000))

    samples = await asyncio.gather(*(probe.sample(sandbox_id) for sandbox_id in ids))

    assert [s.cpu_used_pct if s else None for s in samples] == [float(i % 100) for i in range(250)]
    assert len(emulator.calls("metrics")) == 3  # 100 + 100 + 50


async def test_a_batch_goes_out_while_the_one_before_is_still_answered(emulator: Emulator) -> None:
    ids = [f"sbx-lap-{i:03d}" for i in range(200)]
    for sandbox_id in ids:
        emulator.add_sandbox(sandbox_id, cpu_used_pct=5.0)
    emulator.faults.op_latency = {"metrics": 2.0}
    client = E2BClient(api_key=KEY, api_url=emulator.url, request_timeout=10)
    probe = CpuProbe(client, TokenBucket(rate=1000, capacity=1000))

    samples = await asyncio.gather(*(probe.sample(sandbox_id) for sandbox_id in ids))

    assert all(s is not None and s.cpu_used_pct == 5.0 for s in samples)
    first, second = emulator.calls("metrics")
    # the second request arrived before the first, two seconds long, was answered
    assert second.at < first.at + 2.0


async def test_a_saturated_worker_waits_for_a_full_request(emulator: Emulator) -> None:
    ids = [f"sbx-full-{i:03d}" for i in range(100)]
    for sandbox_id in ids:
        emulator.add_sandbox(sandbox_id, cpu_used_pct=1.0)
    client = E2BClient(api_key=KEY, api_url=emulator.url, request_timeout=10)
    late: list[asyncio.Task[CpuSample | None]] = []

    def saturated() -> bool:
        # asked when the first window ends with 60 candidates: the other 40 come now
        if not late:
            late.extend(asyncio.create_task(probe.sample(sandbox_id)) for sandbox_id in ids[60:])
        return True

    probe = CpuProbe(client, TokenBucket(rate=1000, capacity=1000), saturated=saturated)
    early = await asyncio.gather(*(probe.sample(sandbox_id) for sandbox_id in ids[:60]))
    samples = [*early, *await asyncio.gather(*late)]

    assert len(samples) == 100 and all(s is not None and s.cpu_used_pct == 1.0 for s in samples)
    assert len(emulator.calls("metrics")) == 1  # not 60 and then 40
