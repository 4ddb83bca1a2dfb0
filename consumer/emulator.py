"""A local E2B API emulator: a real HTTP server that the e2b SDK talks to.

It answers the sandbox endpoints the SDK calls (create, connect, resume, pause,
kill, get info, list) with the status codes and bodies of E2B's API
description, keeps each sandbox's state, and injects faults on demand. Demos
and benchmarks run the whole pipeline against it without an account; tests
assert on the calls it recorded.

Every API call needs an ``X-API-KEY`` header (any non-empty key, or exactly
``api_key`` when one is given). Faults are checked in this order: 429 when the
admitted calls of the last second reach ``rate_limit``; a hang; a random
500/502/503; the latency sleep; then the real answer. So 429 and 5xx answers
come without the added latency, like those of a gateway in front of an API.

Status 0 in the call log means no answer was given: a hung call is recorded
with status 0 when it starts hanging (after ``hang_seconds`` it answers 504),
and a call cancelled by its client going away is recorded with status 0 too.

Sandboxes never expire on their own. A killed sandbox is gone for good, even
with ``auto_create``, which only makes never-seen ids exist (running).

A control API for other processes, without API key::

    GET  /_emulator/calls?op=&sandbox_id=   the recorded calls, in answer order
    GET  /_emulator/peak-rate?op=&window=   {"peak": most calls within any window}
    GET  /_emulator/sandboxes/{id}          {"sandbox_id": ..., "state": "running"|"paused"|null}
    POST /_emulator/sandboxes               {"sandbox_id", "state"?, "template"?, "metadata"?}
    GET  /_emulator/faults                  the faults in force
    PUT  /_emulator/faults                  some fields of Faults, e.g. {"latency": 0.1}
    POST /_emulator/reset                   forget the calls; body {"faults": true,
                                            "sandboxes": true} also clears those
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, unquote

import orjson
from aiohttp import web

logger = logging.getLogger(__name__)

STATES = ("running", "paused")
ENVD_VERSION = "0.4.0"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_JSON = "application/json"

Answer = Callable[[web.Request, str | None], Awaitable[web.Response]]


@dataclass
class Faults:
    """Faults the emulator injects; change the fields at any time, all off by default."""

    latency: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    rate_limit: float = 0.0
    hang_seconds: float = 3600.0
    missing: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["missing"] = sorted(self.missing)
        return data

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update from JSON, or raise ValueError and change nothing."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        parsed: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "missing":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("missing must be a list of sandbox ids")
                parsed[name] = set(value)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
            if name in ("error_rate", "timeout_rate") and value > 1:
                raise ValueError(f"{name} must be between 0 and 1")
            parsed[name] = float(value)
        for name, value in parsed.items():
            setattr(self, name, value)


@dataclass(frozen=True, slots=True)
class Call:
    """One API call as the emulator saw it; ``at`` is its arrival (time.monotonic())."""

    method: str
    op: str
    sandbox_id: str | None
    status: int
    at: float


@dataclass(slots=True)
class _Sandbox:
    sandbox_id: str
    state: str
    template: str
    metadata: dict[str, str]
    started_at: datetime
    end_at: datetime
    seq: int
    pause_mode: str | None = None


class Emulator:
    """The E2B API on loopback, with sandbox states, faults and a call log."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        auto_create: bool = False,
        seed: int | None = None,
        *,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``api_key``: the only key accepted (default: any). ``clock``: arrival times."""
        self.faults = faults if faults is not None else Faults()
        self._host, self._port = host, port
        self._auto_create = auto_create
        self._api_key = api_key
        self._clock = clock
        self._rng = random.Random(seed)
        self._sandboxes: dict[str, _Sandbox] = {}
        self._killed: set[str] = set()
        self._seq = 0
        self._calls: list[Call] = []
        self._admitted: deque[float] = deque()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._url = ""

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> str:
        """Bind and serve; return the base URL, e.g. ``http://127.0.0.1:41234``."""
        if self._runner is not None:
            return self._url
        self._stopping.clear()
        # Cancelling a handler whose client went away frees hung calls at once.
        runner = web.AppRunner(
            self._make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, backlog=4096)
        await site.start()
        host, port = runner.addresses[0][:2]
        self._runner = runner
        self._url = f"http://{host}:{port}"
        return self._url

    async def stop(self) -> None:
        """Release hung calls, close every connection and unbind."""
        if self._runner is None:
            return
        self._stopping.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if not self._url:
            raise RuntimeError("the emulator has not been started")
        return self._url

    # -- inspection and set-up ---------------------------------------------

    def add_sandbox(
        self,
        sandbox_id: str,
        *,
        state: str = "running",
        template: str = "base",
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Make ``sandbox_id`` exist in ``state`` (replacing any earlier one of that id)."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}")
        self._killed.discard(sandbox_id)
        box = self._new(sandbox_id, template, dict(metadata or {}), 300)
        box.state = state
        if state == "paused":
            box.pause_mode = "full"

    def state_of(self, sandbox_id: str) -> str | None:
        """``"running"``, ``"paused"``, or None for an unknown or killed sandbox."""
        box = self._sandboxes.get(sandbox_id)
        return box.state if box else None

    def calls(self, op: str | None = None, sandbox_id: str | None = None) -> list[Call]:
        """The recorded calls in the order they were answered, filtered by op and sandbox."""
        return [
            c
            for c in self._calls
            if (op is None or c.op == op) and (sandbox_id is None or c.sandbox_id == sandbox_id)
        ]

    def peak_rate(self, op: str | None = None, window: float = 1.0) -> int:
        """The most calls (of ``op``) that arrived within any half-open ``window`` seconds."""
        times = sorted(c.at for c in self._calls if op is None or c.op == op)
        best = start = 0
        for end, at in enumerate(times):
            while at - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def reset_calls(self) -> None:
        self._calls.clear()

    # -- request plumbing --------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        api: list[tuple[str, str, str, Answer]] = [
            ("POST", "/sandboxes/{sandbox_id}/pause", "pause", self._pause),
            ("POST", "/v2/sandboxes/{sandbox_id}/connect", "connect", self._connect),
            ("POST", "/sandboxes/{sandbox_id}/connect", "connect", self._connect),
            ("POST", "/sandboxes/{sandbox_id}/resume", "resume", self._resume),
            ("DELETE", "/sandboxes/{sandbox_id}", "kill", self._kill),
            ("GET", "/sandboxes/{sandbox_id}", "info", self._info),
            ("GET", "/v2/sandboxes", "list", self._list),
            ("POST", "/v2/sandboxes", "create", self._create),
            ("POST", "/sandboxes", "create", self._create),
        ]
        for method, path, op, answer in api:
            app.router.add_route(method, path, self._endpoint(op, answer))
        ctl = "/_emulator"
        app.router.add_get(f"{ctl}/calls", self._ctl_calls)
        app.router.add_get(f"{ctl}/peak-rate", self._ctl_peak_rate)
        app.router.add_get(f"{ctl}/sandboxes/{{sandbox_id}}", self._ctl_state)
        app.router.add_post(f"{ctl}/sandboxes", self._ctl_add)
        app.router.add_get(f"{ctl}/faults", self._ctl_faults)
        app.router.add_put(f"{ctl}/faults", self._ctl_faults)
        app.router.add_post(f"{ctl}/reset", self._ctl_reset)
        return app

    def _endpoint(self, op: str, answer: Answer) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            arrived = self._clock()
            sandbox_id = request.match_info.get("sandbox_id")
            recorded = False
            try:
                key = request.headers.get("X-API-KEY")
                faults = self.faults
                if not key or (self._api_key is not None and key != self._api_key):
                    response = _error(401, "Invalid API key")
                elif not self._admit(arrived, faults.rate_limit):
                    response = _error(429, "Rate limit exceeded", retry_after="1")
                elif faults.timeout_rate and self._rng.random() < faults.timeout_rate:
                    self._calls.append(Call(request.method, op, sandbox_id, 0, arrived))
                    recorded = True
                    await self._hang(faults.hang_seconds)
                    return _error(504, "Upstream request timed out")
                elif faults.error_rate and self._rng.random() < faults.error_rate:
                    response = _error(self._rng.choice((500, 502, 503)), "Injected failure")
                else:
                    if faults.latency > 0:
                        await asyncio.sleep(faults.latency)
                    response = await answer(request, sandbox_id)
                    if op == "create" and response.status == 201:
                        sandbox_id = response.headers["Location"].rsplit("/", 1)[1]
            except asyncio.CancelledError:
                if not recorded:  # the client went away before an answer
                    self._calls.append(Call(request.method, op, sandbox_id, 0, arrived))
                raise
            self._calls.append(Call(request.method, op, sandbox_id, response.status, arrived))
            return response

        return handle

    async def _hang(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _admit(self, now: float, limit: float) -> bool:
        """Sliding one-second window over the admitted calls; rejected ones do not count."""
        window = self._admitted
        while window and window[0] <= now - 1.0:
            window.popleft()
        if limit and len(window) >= limit:
            return False
        window.append(now)
        return True

    # -- the E2B API -------------------------------------------------------

    def _new(self, sandbox_id: str, template: str, metadata: dict[str, str], timeout: int) -> _Sandbox:
        now = datetime.now(UTC)
        self._seq += 1
        box = _Sandbox(
            sandbox_id,
            "running",
            template,
            metadata,
            now,
            now + timedelta(seconds=timeout),
            self._seq,
        )
        self._sandboxes[sandbox_id] = box
        return box

    def _find(self, sandbox_id: str | None) -> _Sandbox | None:
        if sandbox_id is None or sandbox_id in self.faults.missing:
            return None
        box = self._sandboxes.get(sandbox_id)
        if box is None and self._auto_create and sandbox_id not in self._killed:
            box = self._new(sandbox_id, "base", {}, 300)
        return box

    async def _pause(self, request: web.Request, sandbox_id: str | None) -> web.Response:
        body = await _json_body(request)
        if body is None:
            return _error(400, "Request body must be a JSON object")
        box = self._find(sandbox_id)
        if box is None:
            return _not_found(sandbox_id)
        if box.state == "paused":
            return _error(409, f"Sandbox {sandbox_id} is already paused")
        box.state = "paused"
        box.pause_mode = "filesystem" if body.get("memory") is False else "full"
        return web.Response(status=204)

    async def _connect(self, request: web.Request, sandbox_id: str | None) -> web.Response:
        """Connect answers 200 for a running sandbox and 201 when it had to resume it."""
        body = await _json_body(request)
        if body is None:
            return _error(400, "Request body must be a JSON object")
        box = self._find(sandbox_id)
        if box is None:
            return _not_found(sandbox_id)
        status = 201 if box.state == "paused" else 200
        self._run(box, body)
        return _json(status, _sandbox(box))

    async def _resume(self, request: web.Request, sandbox_id: str | None) -> web.Response:
        body = await _json_body(request)
        if body is None:
            return _error(400, "Request body must be a JSON object")
        box = self._find(sandbox_id)
        if box is None:
            return _not_found(sandbox_id)
        if box.state == "running":
            return _error(409, f"Sandbox {sandbox_id} is already running")
        self._run(box, body)
        return _json(201, _sandbox(box))

    def _run(self, box: _Sandbox, body: dict[str, Any]) -> None:
        timeout = body.get("timeout")
        seconds = timeout if isinstance(timeout, int) and timeout >= 0 else 300
        box.state, box.pause_mode = "running", None
        box.end_at = max(box.end_at, datetime.now(UTC) + timedelta(seconds=seconds))

    async def _kill(self, request: web.Request, sandbox_id: str | None) -> web.Response:
        box = self._find(sandbox_id)
        if box is None:
            return _not_found(sandbox_id)
        del self._sandboxes[box.sandbox_id]
        self._killed.add(box.sandbox_id)
        return web.Response(status=204)

    async def _info(self, request: web.Request, sandbox_id: str | None) -> web.Response:
        box = self._find(sandbox_id)
        if box is None:
            return _not_found(sandbox_id)
        detail = _listed(box)
        if box.pause_mode is not None:
            detail["pauseMode"] = box.pause_mode
        return _json(200, detail)

    async def _create(self, request: web.Request, sandbox_id: str | None) -> web.Response:
        body = await _json_body(request)
        template = body.get("templateID") if body else None
        metadata = (body or {}).get("metadata", {})
        timeout = (body or {}).get("timeout", 15)
        if not isinstance(template, str) or not template:
            return _error(400, "templateID is required")
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            return _error(400, "metadata must map strings to strings")
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            return _error(400, "timeout must be a non-negative integer")
        new_id = "i" + "".join(self._rng.choices(_ID_ALPHABET, k=19))
        while new_id in self._sandboxes or new_id in self._killed:
            new_id = "i" + "".join(self._rng.choices(_ID_ALPHABET, k=19))
        box = self._new(new_id, template, metadata, timeout)
        return _json(201, _sandbox(box), {"Location": f"/sandboxes/{new_id}"})

    async def _list(self, request: web.Request, sandbox_id: str | None) -> web.Response:
        """GET /v2/sandboxes: filters, newest first by default, cursor pagination."""
        query = request.query
        try:
            states = _parse_states(query.get("state"))
            wanted = _parse_metadata(query.get("metadata"))
            after = _parse_time(query.get("startedAfter"))
            limit = int(query.get("limit", "100"))
            cursor = _decode_token(query.get("nextToken"))
        except ValueError as exc:
            return _error(400, str(exc))
        order = query.get("order", "desc")
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            return _error(400, "order must be asc or desc, limit between 1 and 100")
        template = query.get("template")
        matches = [
            box
            for box in self._sandboxes.values()
            if box.state in states
            and box.sandbox_id not in self.faults.missing
            and (template is None or box.template == template)
            and (after is None or box.started_at >= after)
            and all(box.metadata.get(k) == v for k, v in wanted.items())
        ]
        matches.sort(key=lambda box: box.seq, reverse=order == "desc")
        headers = {}
        if "running" in states:  # counted before pagination, as the spec says
            headers["X-Total-Running"] = str(sum(box.state == "running" for box in matches))
        if cursor is not None:
            matches = [box for box in matches if (box.seq < cursor if order == "desc" else box.seq > cursor)]
        page = matches[:limit]
        if len(matches) > limit:
            headers["X-Next-Token"] = _encode_token(page[-1].seq)
        return _json(200, [_listed(box) for box in page], headers)

    # -- the control API ---------------------------------------------------

    async def _ctl_calls(self, request: web.Request) -> web.Response:
        calls = self.calls(request.query.get("op"), request.query.get("sandbox_id"))
        return _json(200, [asdict(call) for call in calls])

    async def _ctl_peak_rate(self, request: web.Request) -> web.Response:
        try:
            window = float(request.query.get("window", "1"))
        except ValueError:
            return _error(400, "window must be a number of seconds")
        return _json(200, {"peak": self.peak_rate(request.query.get("op"), window)})

    async def _ctl_state(self, request: web.Request) -> web.Response:
        sandbox_id = request.match_info["sandbox_id"]
        return _json(200, {"sandbox_id": sandbox_id, "state": self.state_of(sandbox_id)})

    async def _ctl_add(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not body or not isinstance(body.get("sandbox_id"), str):
            return _error(400, "sandbox_id is required")
        metadata = body.get("metadata")
        try:
            self.add_sandbox(
                body["sandbox_id"],
                state=str(body.get("state", "running")),
                template=str(body.get("template", "base")),
                metadata=metadata if isinstance(metadata, dict) else None,
            )
        except ValueError as exc:
            return _error(400, str(exc))
        return _json(201, {"sandbox_id": body["sandbox_id"], "state": body.get("state", "running")})

    async def _ctl_faults(self, request: web.Request) -> web.Response:
        if request.method == "PUT":
            body = await _json_body(request)
            if body is None:
                return _error(400, "body must be a JSON object")
            try:
                self.faults.update(body)
            except ValueError as exc:
                return _error(400, str(exc))
        return _json(200, self.faults.to_json())

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        body = await _json_body(request) or {}
        self.reset_calls()
        if body.get("faults"):
            self.faults.update(Faults().to_json())
        if body.get("sandboxes"):
            self._sandboxes.clear()
            self._killed.clear()
        return _json(200, {"reset": True})


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON, headers=headers)


def _error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    """An answer with E2B's Error body, which the SDK maps to its exceptions."""
    headers = {"Retry-After": retry_after} if retry_after else None
    return _json(status, {"code": status, "message": message}, headers)


def _not_found(sandbox_id: str | None) -> web.Response:
    return _error(404, f"Sandbox {sandbox_id} not found")


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    """The JSON object in the body, {} for an empty body, None for anything else."""
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _sandbox(box: _Sandbox) -> dict[str, Any]:
    """The ``Sandbox`` schema: what create, connect and resume answer."""
    return {
        "templateID": box.template,
        "sandboxID": box.sandbox_id,
        "clientID": "emulator",
        "envdVersion": ENVD_VERSION,
    }


def _listed(box: _Sandbox) -> dict[str, Any]:
    """The ``ListedSandbox`` schema; ``SandboxDetail`` has the same required fields."""
    return {
        "templateID": box.template,
        "sandboxID": box.sandbox_id,
        "clientID": "emulator",
        "startedAt": box.started_at.isoformat(),
        "endAt": box.end_at.isoformat(),
        "cpuCount": 2,
        "memoryMB": 512,
        "diskSizeMB": 10240,
        "metadata": box.metadata,
        "state": box.state,
        "envdVersion": ENVD_VERSION,
    }


def _parse_states(text: str | None) -> tuple[str, ...]:
    if not text:
        return STATES
    states = tuple(text.split(","))
    if not set(states) <= set(STATES):
        raise ValueError(f"state must be a comma-separated subset of {','.join(STATES)}")
    return states


def _parse_metadata(text: str | None) -> dict[str, str]:
    """The SDK sends ``urlencode({quote(k): quote(v)})`` as one query value; past
    aiohttp's decoding, parse_qsl undoes urlencode and unquote the quoting."""
    if not text:
        return {}
    return {unquote(k): unquote(v) for k, v in parse_qsl(text, keep_blank_values=True)}


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.astimezone()


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def _decode_token(token: str | None) -> int | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("invalid nextToken") from None
    if not text.startswith("seq:") or not text[4:].isdigit():
        raise ValueError("invalid nextToken")
    return int(text[4:])


async def serve(host: str, port: int, faults: Faults, auto_create: bool) -> None:
    """Run an emulator until cancelled (the ``autopause emulator`` command)."""
    emulator = Emulator(host, port, faults=faults, auto_create=auto_create)
    url = await emulator.start()
    logger.info("emulator.listening url=%s auto_create=%s", url, auto_create)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
