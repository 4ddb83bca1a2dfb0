"""A real Prometheus on loopback scrapes a running scheduler with the shipped rules loaded."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from consumer.settings import Settings

from ..helpers.monitoring import RULES, rules, tool
from ..helpers.processes import Spawn, autopause, free_port, isolated_env
from ..helpers.waiting import wait_for


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], str]]:
    """Start Prometheus on loopback scraping ``targets`` every second; returns its URL."""
    started: list[subprocess.Popen[bytes]] = []

    def start(targets: list[str]) -> str:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "autopause",
                    "static_configs": [{"targets": targets, "labels": {"role": "scheduler"}}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def test_prometheus_scrapes_a_running_scheduler(
    settings: Settings,
    spawn: Spawn,
    prometheus: Callable[[list[str]], str],
) -> None:
    metrics_port = free_port()
    env = isolated_env(
        settings,
        AUTOPAUSE_METRICS_HOST="127.0.0.1",
        AUTOPAUSE_METRICS_PORT=str(metrics_port),
        AUTOPAUSE_TICK_CRON="* * * * * *",  # a tick every second
    )
    scheduler = spawn(autopause("run", "scheduler"), env, "scheduler")
    url = prometheus([f"127.0.0.1:{metrics_port}"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def query(promql: str) -> list[dict[str, Any]]:
            try:
                async with http.get(f"{url}/api/v1/query", params={"query": promql}) as response:
                    if response.status != 200:
                        return []
                    body = await response.json()
            except aiohttp.ClientError:
                return []
            result: list[dict[str, Any]] = body["data"]["result"]
            return result

        async def ticks() -> list[dict[str, Any]]:
            assert scheduler.alive(), scheduler.output()
            # alone, with nothing due, every tick ends after one probe of the idle index
            return await query('autopause_ticks_total{job="autopause", outcome="ran"} > 0')

        found = await wait_for(ticks, timeout=90, what="autopause_ticks_total through Prometheus")
        assert found[0]["metric"]["role"] == "scheduler"
        up = await query('up{job="autopause"}')
        assert [sample["value"][1] for sample in up] == ["1"]

        # the shipped rules load into this Prometheus and evaluate against the live series
        async with http.get(f"{url}/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
        loaded = {rule["name"] for group in groups for rule in group["rules"]}
        assert loaded == {rule["alert"] for rule in rules()}
        assert all(rule["health"] != "err" for group in groups for rule in group["rules"])

        # what the live process exports covers what the rules use of the scheduler's own metrics
        names = await query('count by (__name__) ({__name__=~"autopause_.+", job="autopause"})')
        live = {sample["metric"]["__name__"] for sample in names}
    assert {"autopause_ticks_total", "autopause_tick_seconds_bucket"} <= live
