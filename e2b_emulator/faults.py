"""The faults the emulator injects, and the pure decision of what a call meets."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from e2b_emulator.calls import OPS

DEFAULT_ERROR_STATUSES = (500, 502, 503)


@dataclass
class Faults:
    """Faults the emulator injects; change the fields at any time, all off by default.

    ``latency`` (s) delays every answer, ``op_latency`` adds seconds per op name
    (e.g. ``{"pause": 2.0}``). ``error_rate`` is the share of calls answered
    with a status drawn from ``error_statuses``, and ``op_error_rate`` the same
    share for one op only (e.g. ``{"info": 1.0}``); ``timeout_rate`` the share that
    hang for ``hang_seconds`` (then 504). ``rate_limit`` is the admitted calls
    per sliding second above which calls get 429 (0: off). ``missing`` ids
    answer 404 and are left out of listings. After ``list_fail_after``
    successful list answers, counted from when the field is set, every list
    call answers 500 until the field is set again (None: off).
    """

    latency: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    rate_limit: float = 0.0
    hang_seconds: float = 3600.0
    missing: set[str] = field(default_factory=set)
    error_statuses: list[int] = field(default_factory=lambda: list(DEFAULT_ERROR_STATUSES))
    op_latency: dict[str, float] = field(default_factory=dict)
    op_error_rate: dict[str, float] = field(default_factory=dict)
    list_fail_after: int | None = None
    # Not a setting: the list answers given since list_fail_after was last set.
    lists_answered: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.update(self.to_json())

    def __setattr__(self, name: str, value: Any) -> None:
        # Setting the field, from Python or the control API, starts a new count.
        if name == "list_fail_after":
            object.__setattr__(self, "lists_answered", 0)
        object.__setattr__(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON: what ``GET /_emulator/faults`` answers."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        data["missing"] = sorted(self.missing)
        data["error_statuses"] = list(self.error_statuses)
        data["op_latency"] = dict(self.op_latency)
        data["op_error_rate"] = dict(self.op_error_rate)
        return data

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update from JSON, or raise ValueError and change nothing."""
        known = {f.name for f in fields(self) if f.init}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        parsed = {name: _parse(name, value) for name, value in changes.items()}
        for name, value in parsed.items():
            setattr(self, name, value)

    def list_exhausted(self) -> bool:
        return self.list_fail_after is not None and self.lists_answered >= self.list_fail_after


@dataclass(frozen=True, slots=True)
class Plan:
    """What the injected faults make of one admitted call.

    ``hang``: answer nothing (504 after ``hang_seconds``); ``status``: answer
    this error at once; otherwise wait ``delay`` seconds and answer for real.
    ``fault`` names the fault for the log.
    """

    hang: bool = False
    status: int = 0
    delay: float = 0.0
    fault: str | None = None


def plan(faults: Faults, op: str, rng: random.Random) -> Plan:
    """Pure apart from ``rng``: draw the faults for one call of ``op``, in the documented order.

    Errors come without the latency, like those of a gateway in front of an API.
    """
    if faults.timeout_rate and rng.random() < faults.timeout_rate:
        return Plan(hang=True, fault="hang")
    error_rate = max(faults.error_rate, faults.op_error_rate.get(op, 0.0))
    if error_rate and rng.random() < error_rate:
        return Plan(status=rng.choice(faults.error_statuses), fault="error")
    if op == "list" and faults.list_exhausted():
        return Plan(status=500, fault="list_fail_after")
    return Plan(delay=faults.latency + faults.op_latency.get(op, 0.0))


def _per_op(value: Any, each: Callable[[Any], bool]) -> bool:
    return isinstance(value, dict) and all(k in OPS and each(v) for k, v in value.items())


# field -> (is the JSON value acceptable, what it becomes, what to say when it is not)
_FIELDS: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
    "missing": (
        lambda v: isinstance(v, list | set) and all(isinstance(i, str) for i in v),
        set,
        "missing must be a list of sandbox ids",
    ),
    "error_statuses": (
        lambda v: isinstance(v, list | tuple) and bool(v) and all(_is_int(s) and 400 <= s <= 599 for s in v),
        list,
        "error_statuses must be a non-empty list of statuses 400..599",
    ),
    "op_latency": (
        lambda v: _per_op(v, _is_seconds),
        lambda v: {k: float(s) for k, s in v.items()},
        f"op_latency must map op names ({', '.join(OPS)}) to seconds >= 0",
    ),
    "op_error_rate": (
        lambda v: _per_op(v, lambda s: _is_seconds(s) and s <= 1),
        lambda v: {k: float(s) for k, s in v.items()},
        f"op_error_rate must map op names ({', '.join(OPS)}) to shares 0..1",
    ),
    "list_fail_after": (
        lambda v: v is None or (_is_int(v) and v >= 0),
        lambda v: v,
        "list_fail_after must be an integer >= 0 or null",
    ),
    "error_rate": (lambda v: _is_seconds(v) and v <= 1, float, "error_rate must be between 0 and 1"),
    "timeout_rate": (lambda v: _is_seconds(v) and v <= 1, float, "timeout_rate must be between 0 and 1"),
}


def _parse(name: str, value: Any) -> Any:
    """One field from JSON (or the constructor), checked; ValueError names what is wrong.

    Fields not in the table are durations in seconds.
    """
    valid, convert, problem = _FIELDS.get(name, (_is_seconds, float, f"{name} must be a number >= 0"))
    if not valid(value):
        raise ValueError(problem)
    return convert(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
