"""The machine description, the results table, and the JSON file."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson

from benchmarks.common import Figure, amqp, dsn
from consumer.settings import Settings


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def machine(settings: Settings) -> dict[str, Any]:
    """CPU, cores, RAM, Python, Postgres and RabbitMQ versions, and the Postgres settings that matter."""
    conn = await asyncpg.connect(dsn(settings))
    try:
        postgres = await conn.fetchval("SHOW server_version")
        pg_settings = {
            r["name"]: r["setting"] + (r["unit"] or "")
            for r in await conn.fetch(
                """SELECT name, setting, unit FROM pg_settings
                   WHERE name IN ('shared_buffers', 'synchronous_commit', 'fsync', 'wal_level')"""
            )
        }
    finally:
        await conn.close()
    connection = await aio_pika.connect(amqp(settings))
    async with connection:
        props = connection.transport.connection.server_properties if connection.transport else {}
        rabbit = props.get("version", b"?")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": postgres,
        "postgres_settings": pg_settings,
        "rabbitmq": rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit),
        "load_at_start": load(),
    }


async def servers_up(settings: Settings) -> bool:
    """Whether Postgres and RabbitMQ both accept a connection now."""
    try:
        conn = await asyncpg.connect(dsn(settings), timeout=5)
        await conn.close()
        connection = await aio_pika.connect(amqp(settings), timeout=5)
        await connection.close()
    except (OSError, asyncpg.PostgresError, aio_pika.exceptions.AMQPError, TimeoutError):
        return False
    return True


def describe(info: dict[str, Any]) -> str:
    pg = ", ".join(f"{k}={v}" for k, v in info["postgres_settings"].items())
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Linux {info['kernel']}; "
        f"Python {info['python']}, PostgreSQL {info['postgres']} ({pg}), RabbitMQ {info['rabbitmq']}; "
        f"load average at start {info['load_at_start']}"
    )


def _value(figure: Figure) -> str:
    value = figure.value
    if value is None:
        return "-"
    if figure.unit == "ratio":
        return f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3f}"


def table(figures: list[Figure]) -> str:
    """A Markdown table: benchmark, figure, value, unit, target, met, note."""
    rows = [["benchmark", "figure", "value", "unit", "target", "met", "note"]]
    for f in figures:
        met = "" if f.ok is None else ("yes" if f.ok else "NO")
        rows.append([f.bench, f.name, _value(f), f.unit, f.target, met, f.note])
    return markdown(rows)


def markdown(rows: list[list[str]]) -> str:
    """Rows (the first is the header) as a Markdown table; the last column is left unpadded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]

    def line(row: list[str]) -> str:
        cells = [cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(row)]
        return "| " + " | ".join(cells) + " |"

    out = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|---|"]
    out += [line(row) for row in rows[1:]]
    return "\n".join(out)


def write_json(
    path: Path,
    *,
    info: dict[str, Any],
    options: dict[str, Any],
    figures: list[Figure],
    details: dict[str, Any],
    errors: dict[str, str],
    started: datetime,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "machine": {**info, "load_at_end": load()},
        "options": options,
        "figures": [f.__dict__ for f in figures],
        "details": details,
        "errors": errors,
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2, default=str))
