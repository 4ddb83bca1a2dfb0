"""Metrics: this process's registry, and the text exposition a process serves."""

from __future__ import annotations

import aiohttp
from prometheus_client import REGISTRY


def metric(name: str, **labels: str) -> float:
    """The current value of a metric of this process (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        series, _, label_text = key.partition("{")
        if series != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == wanted:
            return float(value)
    return 0.0


async def scrape(port: int) -> str | None:
    """The exposition served on ``port`` at /metrics; None while nothing answers."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            return await response.text()
    except aiohttp.ClientError:
        return None
