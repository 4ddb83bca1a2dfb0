"""What users would pick instead of autopause, computed from a trace by each rule; and the yardsticks.

All times are trace seconds. A policy's effect on one sandbox is when E2B
runs it: a list of running intervals. Every sandbox runs from its creation;
when its user comes back and finds it paused, the app's ``connect()``
resumes it (under every policy alike, so those calls are not counted).

* ``set_timeout`` on every activity: each activity event is one API call
  that moves the end of life to now + the idle timeout; E2B pauses the
  sandbox at its end (``on_timeout``). It runs until its last use plus the
  timeout: never past the deadline, never paused in use, one call per event.
* the same, throttled per sandbox to one call per N seconds, as a debounce:
  the first activity calls at once, later ones within N seconds wait, and the
  latest is sent once the N seconds are over. Each call moves the end to its
  own time + the timeout, so the sandbox runs at most N seconds past its
  deadline, and never stops early.
* a fixed lifetime: E2B pauses the sandbox a fixed time after it was
  created or resumed, whatever its use (``on_timeout`` with no calls at all).

Yardsticks, the same for every policy and for autopause's real runs:

* idle-billed seconds past the deadline: running time after a sandbox's
  last use plus the idle timeout (the deadline), until its next use or the
  trace's end;
* pauses in use: pauses that fall between two uses less than the idle
  timeout apart: the user was still at work (never idle by the rule
  autopause applies) and found the sandbox paused when they came back.
"""

from __future__ import annotations

import bisect
from itertools import pairwise

Interval = tuple[float, float]


def merged(intervals: list[Interval]) -> list[Interval]:
    """The union of ``intervals``, as sorted disjoint intervals."""
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def clipped(intervals: list[Interval], end: float) -> list[Interval]:
    return [(s, min(e, end)) for s, e in intervals if s < end]


def pauses(running: list[Interval], end: float) -> list[float]:
    """When the sandbox was paused: the ends of its running intervals before the trace's end."""
    return [e for _, e in running if e < end]


def idle_billed(uses: list[float], running: list[Interval], timeout: float, end: float) -> float:
    """Seconds the sandbox ran past its idle deadline, over the trace (see the module docstring)."""
    total = 0.0
    for used, next_use in pairwise([*uses, end]):
        low, high = used + timeout, min(next_use, end)
        if high <= low:
            continue
        for start, stop in running:
            total += max(0.0, min(high, stop) - max(low, start))
    return total


def in_use(uses: list[float], paused_at: list[float], timeout: float) -> int:
    """How many of ``paused_at`` fell between two uses less than ``timeout`` apart."""
    count = 0
    for at in paused_at:
        after = bisect.bisect_right(uses, at)
        if 0 < after < len(uses) and uses[after] - uses[after - 1] < timeout:
            count += 1
    return count


def each_activity(uses: list[float], timeout: float) -> tuple[list[Interval], int]:
    """``set_timeout`` on every activity: (running intervals, calls). ``uses[0]`` is the creation."""
    return merged([(u, u + timeout) for u in uses]), len(uses) - 1


def debounced_calls(uses: list[float], every: float, end: float) -> list[float]:
    """When a debounced ``set_timeout`` calls: at most once per ``every`` seconds, the latest use kept.

    The creation sets the first lifetime (no call of its own).
    """
    calls: list[float] = []
    last, pending = uses[0], False
    for used in uses[1:]:
        if pending and last + every <= used:
            last, pending = last + every, False  # the waiting call went out when its interval was over
            calls.append(last)
        if used - last >= every:
            last, pending = used, False
            calls.append(used)
        else:
            pending = True
    if pending and last + every < end:
        calls.append(last + every)
    return calls


def throttled(uses: list[float], timeout: float, every: float, end: float) -> tuple[list[Interval], int]:
    """``set_timeout`` debounced to one call per ``every`` seconds: (running intervals, calls)."""
    calls = debounced_calls(uses, every, end)
    return merged([(u, u + timeout) for u in uses] + [(c, c + timeout) for c in calls]), len(calls)


def fixed_lifetime(uses: list[float], lifetime: float) -> list[Interval]:
    """Paused ``lifetime`` after creation or a resume; resumed by the next use after that."""
    running: list[Interval] = []
    for used in uses:
        if running and used <= running[-1][1]:
            continue  # running: a use does not extend a fixed lifetime
        running.append((used, used + lifetime))
    return running


def from_calls(created: float, changes: list[tuple[float, bool]]) -> list[Interval]:
    """Running intervals from a creation and (time, runs afterwards) changes, e.g. pauses and resumes."""
    running: list[Interval] = []
    since: float | None = created
    for at, runs in sorted(changes):
        if runs and since is None:
            since = at
        elif not runs and since is not None:
            running.append((since, at))
            since = None
    if since is not None:
        running.append((since, float("inf")))
    return running
