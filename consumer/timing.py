"""Time math, pure: every function takes the time it reasons about as an argument."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import islice

from cronsim import CronSim, CronSimError

from consumer.errors import ConfigError


def validate_cron(spec: str) -> None:
    """Raise ConfigError unless ``spec`` is a 5-field or 6-field (seconds first) cron spec."""
    fields = spec.split()
    if len(fields) not in (5, 6):
        raise ConfigError(f"cron spec {spec!r} needs 5 fields, or 6 with seconds first")
    try:
        CronSim(spec, datetime(2000, 1, 1))
    except CronSimError as exc:
        raise ConfigError(f"cron spec {spec!r}: {exc}") from None


def iter_ticks(spec: str, after: datetime) -> Iterator[datetime]:
    """The times ``spec`` fires strictly after ``after``, in order."""
    validate_cron(spec)
    return iter(CronSim(spec, after))


def next_ticks(spec: str, after: datetime, count: int = 1) -> list[datetime]:
    """The next ``count`` times ``spec`` fires strictly after ``after``."""
    return list(islice(iter_ticks(spec, after), count))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [delay/2, delay] for retry ``attempt`` (1-based)."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    draw: float = (rng or random).random()
    return float(delay * (0.5 + draw / 2))


def parse_duration(text: str) -> timedelta:
    """Parse ``90``, ``90s``, ``15m``, ``2h``, ``7d`` or a sum such as ``1h30m``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    text = text.strip().lower()
    total, number = 0.0, ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            raise ConfigError(f"duration {text!r}: use forms like 90s, 15m, 2h, 7d")
    if number and total == 0 and text == number:
        total = float(number)  # a bare number means seconds
        number = ""
    if number or total <= 0:
        raise ConfigError(f"duration {text!r}: use forms like 90s, 15m, 2h, 7d")
    return timedelta(seconds=total)
