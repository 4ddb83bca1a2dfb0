"""Sandboxes as the emulated E2B keeps them, and the pure rules of their lifetime and samples.

Nothing here does I/O or reads a clock: every rule takes ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

STATES = ("running", "paused")
ENVD_VERSION = "0.4.0"
MIB = 1024 * 1024

# Seconds of life when a body gives none: the SDK's ConnectSandboxV2 model says
# 300 (and the SDK then leaves the field out); NewSandbox and ResumedSandbox say 15.
CONNECT_TIMEOUT = 300
CREATE_TIMEOUT = 15
RESUME_TIMEOUT = 15
# What add_sandbox gives a sandbox that the caller does not size.
DEFAULT_TIMEOUT = 300
DEFAULT_CPU_COUNT = 2
DEFAULT_MEMORY_MB = 512
DEFAULT_DISK_MB = 10240
# E2B samples a running sandbox's usage about every 5 s.
SAMPLE_INTERVAL = 5


@dataclass(slots=True)
class Box:
    """One sandbox's mutable state inside the emulator (never handed out: see Sandbox)."""

    sandbox_id: str
    template: str
    metadata: dict[str, str]
    seq: int
    started_at: datetime
    end_at: datetime
    cpu_count: int
    memory_mb: int
    disk_size_mb: int
    cpu_used_pct: float
    mem_used_mb: int
    disk_used_mb: int
    # Sampling restarts with each run: at creation and at each resume.
    run_started: datetime
    state: str = "running"
    pause_mode: str | None = None
    paused_at: datetime | None = None
    # A pinned latest sample (Unix seconds): newer samples are withheld until unpinned.
    pinned_sample: int | None = None


@dataclass(frozen=True, slots=True)
class Sizes:
    """A sandbox's size and usage; None for a used amount means a quarter of its size."""

    cpu_count: int = DEFAULT_CPU_COUNT
    memory_mb: int = DEFAULT_MEMORY_MB
    disk_size_mb: int = DEFAULT_DISK_MB
    cpu_used_pct: float = 0.0
    mem_used_mb: int | None = None
    disk_used_mb: int | None = None

    def checked(self) -> Sizes:
        """These sizes with the used amounts filled in, or ValueError."""
        for name in ("cpu_count", "memory_mb", "disk_size_mb"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1")
        check_cpu(self.cpu_used_pct)
        mem = self.memory_mb // 4 if self.mem_used_mb is None else self.mem_used_mb
        disk = self.disk_size_mb // 4 if self.disk_used_mb is None else self.disk_used_mb
        if not _is_int(mem) or not 0 <= mem <= self.memory_mb:
            raise ValueError("mem_used_mb must be an integer between 0 and memory_mb")
        if not _is_int(disk) or not 0 <= disk <= self.disk_size_mb:
            raise ValueError("disk_used_mb must be an integer between 0 and disk_size_mb")
        return replace(self, cpu_used_pct=float(self.cpu_used_pct), mem_used_mb=mem, disk_used_mb=disk)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """An immutable snapshot of one sandbox, for tests and the control API.

    ``latest_sample`` is the time of its latest metrics sample (None: none yet).
    """

    sandbox_id: str
    state: str
    template: str
    metadata: MappingProxyType[str, str]
    started_at: datetime
    end_at: datetime
    cpu_count: int
    memory_mb: int
    disk_size_mb: int
    cpu_used_pct: float
    mem_used_mb: int
    disk_used_mb: int
    pause_mode: str | None
    paused_at: datetime | None
    latest_sample: datetime | None

    def to_json(self) -> dict[str, Any]:
        """What ``GET /_emulator/sandboxes/{id}`` answers."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["metadata"] = dict(self.metadata)
        for name in ("started_at", "end_at", "paused_at", "latest_sample"):
            data[name] = data[name].isoformat() if data[name] is not None else None
        return data


@dataclass(frozen=True, slots=True)
class Sample:
    """One metrics sample (the SandboxMetric schema); ``at`` in Unix seconds."""

    at: int
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int


def new_box(
    sandbox_id: str,
    seq: int,
    now: datetime,
    *,
    template: str,
    metadata: dict[str, str],
    timeout: int,
    sizes: Sizes,
) -> Box:
    """A running sandbox that lives ``timeout`` seconds from ``now``; ValueError on bad input."""
    check_timeout(timeout)
    sizes = sizes.checked()
    assert sizes.mem_used_mb is not None and sizes.disk_used_mb is not None  # filled by checked()
    return Box(
        sandbox_id,
        template,
        metadata,
        seq,
        started_at=now,
        end_at=now + timedelta(seconds=timeout),
        cpu_count=sizes.cpu_count,
        memory_mb=sizes.memory_mb,
        disk_size_mb=sizes.disk_size_mb,
        cpu_used_pct=sizes.cpu_used_pct,
        mem_used_mb=sizes.mem_used_mb,
        disk_used_mb=sizes.disk_used_mb,
        run_started=now,
    )


def pause(box: Box, now: datetime, *, memory: bool = True) -> None:
    """Pause a running sandbox: its samples stop at ``now``."""
    box.state = "paused"
    box.pause_mode = "full" if memory else "filesystem"
    box.paused_at = now


def run(box: Box, now: datetime, timeout: int) -> bool:
    """Connect or resume: True when it resumed a paused sandbox.

    A running sandbox's end only moves later (``max(end_at, now + timeout)``);
    a resumed one ends ``timeout`` seconds from now, whatever its end was before
    the pause, and starts a new run of samples.
    """
    until = now + timedelta(seconds=timeout)
    if box.state == "running":
        box.end_at = max(box.end_at, until)
        return False
    box.state, box.pause_mode, box.paused_at = "running", None, None
    box.end_at = until
    box.run_started, box.pinned_sample = now, None
    return True


def snapshot(box: Box, now: datetime) -> Sandbox:
    latest = latest_sample_time(box, now)
    return Sandbox(
        box.sandbox_id,
        box.state,
        box.template,
        MappingProxyType(dict(box.metadata)),
        box.started_at,
        box.end_at,
        box.cpu_count,
        box.memory_mb,
        box.disk_size_mb,
        box.cpu_used_pct,
        box.mem_used_mb,
        box.disk_used_mb,
        box.pause_mode,
        box.paused_at,
        None if latest is None else datetime.fromtimestamp(latest, UTC),
    )


def latest_sample_time(box: Box, now: datetime) -> int | None:
    """When the latest sample of ``box`` was taken (Unix seconds), as seen at ``now``."""
    started, until = _run_span(box, now)
    return latest_of(started, until, box.pinned_sample)


def samples(box: Box, now: datetime, start: int | None = None, end: int | None = None) -> list[Sample]:
    """The samples of the sandbox's latest run within ``[start, end]`` (Unix seconds)."""
    return [
        sample(box, at)
        for at in run_sample_times(box, now)
        if (start is None or at >= start) and (end is None or at <= end)
    ]


def run_sample_times(box: Box, now: datetime) -> list[int]:
    return sample_times(*_run_span(box, now), box.pinned_sample)


def _run_span(box: Box, now: datetime) -> tuple[int, int]:
    """The latest run in Unix seconds: from its start to now, or to its pause."""
    until = box.paused_at if box.paused_at is not None else now
    return math.floor(box.run_started.timestamp()), math.floor(until.timestamp())


def latest_of(started: int, until: int, pinned: int | None) -> int:
    """Pure: the last of ``sample_times(started, until, pinned)``, without listing them."""
    if pinned is not None and pinned <= until:
        return pinned
    return max(started, until // SAMPLE_INTERVAL * SAMPLE_INTERVAL)


def sample_times(started: int, until: int, pinned: int | None) -> list[int]:
    """Pure: the sample times of one run, in Unix seconds.

    A run is sampled when it starts, then at every multiple of SAMPLE_INTERVAL
    up to ``until`` (now, or when it was paused). A pinned sample at or before
    ``until`` is the latest one: the samples after it are not there (yet).
    """
    first_tick = (started // SAMPLE_INTERVAL + 1) * SAMPLE_INTERVAL
    if pinned is None or pinned > until:
        return [started, *range(first_tick, until + 1, SAMPLE_INTERVAL)]
    times = [started] if started < pinned else []
    times += range(first_tick, pinned + 1, SAMPLE_INTERVAL)
    if not times or times[-1] != pinned:
        times.append(pinned)
    return times


def sample(box: Box, at: int) -> Sample:
    """A sample at ``at`` with the sandbox's current usage: the emulator keeps no usage history."""
    return Sample(
        at,
        box.cpu_count,
        box.cpu_used_pct,
        box.mem_used_mb * MIB,
        box.memory_mb * MIB,
        box.disk_used_mb * MIB,
        box.disk_size_mb * MIB,
    )


def set_cpu(box: Box, now: datetime, pct: float, sample_age: float | None) -> None:
    """Set the CPU that samples show; with ``sample_age``, pin the latest sample that old."""
    check_cpu(pct)
    if sample_age is not None and (
        isinstance(sample_age, bool) or not isinstance(sample_age, int | float) or sample_age < 0
    ):
        raise ValueError("sample_age must be a number of seconds >= 0")
    box.cpu_used_pct = float(pct)
    box.pinned_sample = None if sample_age is None else math.floor(now.timestamp() - sample_age)


def check_timeout(timeout: Any) -> int:
    if not _is_int(timeout) or timeout < 0:
        raise ValueError("timeout must be a non-negative integer")
    return int(timeout)


def check_cpu(pct: Any) -> None:
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct <= 100:
        raise ValueError("cpu_used_pct must be a number between 0 and 100")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
