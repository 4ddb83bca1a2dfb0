"""A local E2B API emulator: a real HTTP server that the e2b SDK talks to.

It answers the sandbox endpoints the SDK calls with the status codes and
bodies of E2B's API description, keeps each sandbox's state, size, usage and
lifetime, and injects faults on demand. Demos and benchmarks run the whole
pipeline against it without an account; tests assert on the calls it
recorded. It is not part of the production path: autopause's roles never
import it.

The E2B API, and the op name each call is recorded under::

    POST   /v2/sandboxes, /sandboxes                 create           201 Sandbox
    POST   /v2/sandboxes/{id}/connect, v1 the same   connect          200 running, 201 resumed
    POST   /sandboxes/{id}/resume                    resume           201; 409 when running
    POST   /sandboxes/{id}/pause                     pause            204; 409 when paused
    DELETE /sandboxes/{id}                           kill             204
    GET    /sandboxes/{id}                           info             200 SandboxDetail
    GET    /v2/sandboxes                             list             200 [ListedSandbox], paged
    GET    /sandboxes/metrics?sandbox_ids=a,b        metrics          200 {"sandboxes": {id: SandboxMetric}}
    GET    /sandboxes/{id}/metrics?start=&end=       sandbox_metrics  200 [SandboxMetric]

An unknown id answers 404. Every API call needs an ``X-API-KEY`` header (any
non-empty key, or exactly ``api_key`` when one is given), else 401.

Lifetimes, as E2B keeps them: ``timeout`` in a body is seconds from now.
create ends a sandbox ``timeout`` (default 15) from now. connect of a running
sandbox only moves its end later: ``end_at = max(end_at, now + timeout)``;
connect or resume of a paused one sets ``end_at = now + timeout``, whatever
its end was before the pause (connect's default is 300, the SDK's model
default, since the SDK leaves the field out when not given; resume's is 15).
Sandboxes never expire on their own: past ``end_at`` they go on running,
so a test decides what E2B's timeout does (``pause_outside``, ``kill_outside``).

Metrics: E2B samples a running sandbox about every 5 s. Here a run (from
creation or a resume to now, or to its pause) is sampled when it starts and
at every multiple of 5 s of Unix time; so the latest sample of a running
sandbox is at most 5 s old, and a paused one has no fresh samples, only its
last one from before the pause. ``set_cpu(..., sample_age=s)`` pins the
latest sample ``s`` seconds back, to make it stale; a resume unpins it.
Every sample shows the sandbox's current usage (no usage history is kept),
and only the latest run's samples are kept. ``metrics`` takes 1 to 100
distinct ids (400 otherwise) and leaves unknown and hidden ids out.

Faults (:class:`Faults`) are checked in this order: 429 when the admitted
calls of the last second reach ``rate_limit``; a hang (``timeout_rate``); an
error status drawn from ``error_statuses`` (``error_rate``, or ``op_error_rate[op]``
when higher); 500 for a list
call once ``list_fail_after`` list answers succeeded; the latency sleep
(``latency`` plus ``op_latency[op]``); then the real answer. So error answers
come without the latency, like those of a gateway in front of an API. 503
is what E2B answers while a node is busy (the SDK raises ServiceBusyException).

Status 0 in the call log means no answer was given: a hung call is recorded
with status 0 when it starts hanging (after ``hang_seconds`` it answers 504),
and a call cancelled by its client going away is recorded with status 0 too.

A killed sandbox is gone for good, even with ``auto_create``, which only
makes never-seen ids that an API call names exist (running).

The control API, without API key (each route has its Python method on
:class:`Emulator`; a changed sandbox is answered with its detail, the JSON
of :meth:`Emulator.sandbox`)::

    GET  /_emulator/calls?op=&sandbox_id=      calls()
    GET  /_emulator/peak-rate?op=&window=      peak_rate(): {"peak": n}
    POST /_emulator/sandboxes                  add_sandbox(): {"sandbox_id", "state"?, "template"?,
                                               "metadata"?, "cpu_count"?, "memory_mb"?, "disk_size_mb"?,
                                               "cpu_used_pct"?, "mem_used_mb"?, "disk_used_mb"?, "timeout"?}
    GET  /_emulator/sandboxes/{id}             sandbox(): the detail, or {"sandbox_id", "state": null}
    PUT  /_emulator/sandboxes/{id}/cpu         set_cpu(): {"cpu_used_pct", "sample_age"?}
    POST /_emulator/sandboxes/{id}/pause       pause_outside()
    POST /_emulator/sandboxes/{id}/resume      resume_outside(): {"timeout"?} (default 300)
    POST /_emulator/sandboxes/{id}/kill        kill_outside(): {"sandbox_id", "state": null}
    GET  /_emulator/faults                     the faults in force
    PUT  /_emulator/faults                     some fields of Faults, e.g. {"op_latency": {"pause": 2}}
    POST /_emulator/reset                      reset(): forget the calls; body {"faults": true,
                                               "sandboxes": true} also clears those

The ``*_outside`` actions are what E2B's auto-resume, an app's connect() or
E2B's own ``on_timeout`` would do: they are not API calls and never appear
in the call log. Python callers also have ``state_of(id)`` and ``reset_calls()``.
"""

from e2b_emulator.calls import Call
from e2b_emulator.faults import Faults
from e2b_emulator.model import Sandbox
from e2b_emulator.server import Emulator, serve

__all__ = ["Call", "Emulator", "Faults", "Sandbox", "serve"]
