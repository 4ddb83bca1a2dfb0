"""The E2B endpoints that the SDK calls, each behind one shared preamble.

Every endpoint is recorded in the call log under its op name (see the package
docstring for the table). The preamble, in this order: the API key (401), the
rate limit (429), a hang, an injected error status, a failing listing, the
latency; only then the endpoint itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from e2b_emulator import model
from e2b_emulator.calls import Call, CallLog, RateWindow
from e2b_emulator.faults import Faults, plan
from e2b_emulator.fleet import Fleet
from e2b_emulator.model import CONNECT_TIMEOUT, CREATE_TIMEOUT, RESUME_TIMEOUT, Box, Sizes
from e2b_emulator.wire import (
    detail_json,
    encode_token,
    error,
    json_body,
    json_response,
    list_query,
    listed_json,
    metric_json,
    metrics_ids,
    not_found,
    sandbox_json,
    unix_seconds,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class InFlight:
    """One API call while it is being answered; ``recorded`` once it is in the call log."""

    method: str
    op: str
    sandbox_id: str | None
    at: float
    fault: str | None = None
    recorded: bool = False


Answer = Callable[[web.Request, InFlight], Awaitable[web.Response]]


class Api:
    """The E2B API over the emulator's sandboxes, faults and call log."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        faults: Callable[[], Faults],
        log: CallLog,
        rng: random.Random,
        clock: Callable[[], float],
        wall_clock: Callable[[], datetime],
        api_key: str | None,
        stopping: asyncio.Event,
    ) -> None:
        """``faults`` is read on every call, so the owner may replace its Faults at any time."""
        self._fleet = fleet
        self._faults = faults
        self._log = log
        self._rng = rng
        self._clock = clock
        self._now = wall_clock
        self._api_key = api_key
        self._stopping = stopping
        self._window = RateWindow()

    def routes(self) -> list[web.RouteDef]:
        # /sandboxes/metrics before /sandboxes/{sandbox_id}: the first match wins.
        table: list[tuple[str, str, str, Answer]] = [
            ("GET", "/sandboxes/metrics", "metrics", self._metrics),
            ("GET", "/sandboxes/{sandbox_id}/metrics", "sandbox_metrics", self._sandbox_metrics),
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
        return [web.route(method, path, self._endpoint(op, answer)) for method, path, op, answer in table]

    # -- the preamble ----------------------------------------------------------

    def _endpoint(self, op: str, answer: Answer) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            call = InFlight(request.method, op, request.match_info.get("sandbox_id"), self._clock())
            try:
                response = await self._preamble(request, call, answer)
            except asyncio.CancelledError:
                if not call.recorded:  # the client went away before an answer
                    self._record(call, 0)
                raise
            if not call.recorded:
                self._record(call, response.status)
            return response

        return handle

    async def _preamble(self, request: web.Request, call: InFlight, answer: Answer) -> web.Response:
        faults = self._faults()
        key = request.headers.get("X-API-KEY")
        if not key or (self._api_key is not None and key != self._api_key):
            return error(401, "Invalid API key")
        if not self._window.admit(call.at, faults.rate_limit):
            call.fault = "rate_limit"
            return error(429, "Rate limit exceeded", retry_after="1")
        drawn = plan(faults, call.op, self._rng)
        call.fault = drawn.fault
        if drawn.hang:
            self._record(call, 0)  # no answer yet, maybe never
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), faults.hang_seconds)
            return error(504, "Upstream request timed out")
        if drawn.status:
            return error(drawn.status, "Injected failure")
        if drawn.delay > 0:
            await asyncio.sleep(drawn.delay)
        response = await answer(request, call)
        if call.op == "list" and response.status == 200:
            faults.lists_answered += 1
        return response

    def _record(self, call: InFlight, status: int) -> None:
        call.recorded = True
        self._log.record(Call(call.method, call.op, call.sandbox_id, status, call.at))
        if not logger.isEnabledFor(logging.DEBUG):  # a benchmark makes thousands of calls a second
            return
        extra: dict[str, Any] = {
            "action": "emulator.call",
            "op": call.op,
            "sandbox_id": call.sandbox_id,
            "status": status,
        }
        if call.fault:
            extra["fault"] = call.fault
        logger.debug("call answered", extra=extra)

    def _find(self, sandbox_id: str | None) -> Box | None:
        return self._fleet.find(sandbox_id, self._faults().missing, self._now())

    # -- the endpoints ---------------------------------------------------------

    async def _pause(self, request: web.Request, call: InFlight) -> web.Response:
        body = await json_body(request)
        if body is None:
            return error(400, "Request body must be a JSON object")
        box = self._find(call.sandbox_id)
        if box is None:
            return not_found(call.sandbox_id)
        if box.state == "paused":
            return error(409, f"Sandbox {call.sandbox_id} is already paused")
        model.pause(box, self._now(), memory=body.get("memory") is not False)
        return web.Response(status=204)

    async def _connect(self, request: web.Request, call: InFlight) -> web.Response:
        """200 for a running sandbox, 201 when it had to resume it."""
        body, problem = await _timeout_body(request, CONNECT_TIMEOUT)
        if body is None:
            return error(400, problem)
        box = self._find(call.sandbox_id)
        if box is None:
            return not_found(call.sandbox_id)
        resumed = model.run(box, self._now(), body["timeout"])
        return json_response(201 if resumed else 200, sandbox_json(box))

    async def _resume(self, request: web.Request, call: InFlight) -> web.Response:
        body, problem = await _timeout_body(request, RESUME_TIMEOUT)
        if body is None:
            return error(400, problem)
        box = self._find(call.sandbox_id)
        if box is None:
            return not_found(call.sandbox_id)
        if box.state == "running":
            return error(409, f"Sandbox {call.sandbox_id} is already running")
        model.run(box, self._now(), body["timeout"])
        return json_response(201, sandbox_json(box))

    async def _kill(self, request: web.Request, call: InFlight) -> web.Response:
        box = self._find(call.sandbox_id)
        if box is None:
            return not_found(call.sandbox_id)
        self._fleet.kill(box)
        return web.Response(status=204)

    async def _info(self, request: web.Request, call: InFlight) -> web.Response:
        box = self._find(call.sandbox_id)
        if box is None:
            return not_found(call.sandbox_id)
        return json_response(200, detail_json(box))

    async def _create(self, request: web.Request, call: InFlight) -> web.Response:
        body, problem = await _timeout_body(request, CREATE_TIMEOUT)
        if body is None:
            return error(400, problem)
        template, metadata = body.get("templateID"), body.get("metadata", {})
        if not isinstance(template, str) or not template:
            return error(400, "templateID is required")
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            return error(400, "metadata must map strings to strings")
        call.sandbox_id = self._fleet.new_id()
        box = self._fleet.add(
            call.sandbox_id,
            self._now(),
            template=template,
            metadata=metadata,
            timeout=body["timeout"],
            sizes=Sizes(),
        )
        return json_response(201, sandbox_json(box), {"Location": f"/sandboxes/{box.sandbox_id}"})

    async def _list(self, request: web.Request, call: InFlight) -> web.Response:
        """GET /v2/sandboxes: filters, newest first by default, cursor pagination."""
        try:
            query = list_query(request.query)
        except ValueError as exc:
            return error(400, str(exc))
        page = self._fleet.page(query, self._faults().missing)
        headers = {}
        if "running" in query.states:
            headers["X-Total-Running"] = str(page.running)
        if page.next_seq is not None:
            headers["X-Next-Token"] = encode_token(page.next_seq)
        return json_response(200, [listed_json(box) for box in page.boxes], headers)

    async def _metrics(self, request: web.Request, call: InFlight) -> web.Response:
        """GET /sandboxes/metrics: the latest sample of each named sandbox that has one;
        unknown ids are left out, a paused sandbox shows its last sample from before the pause."""
        try:
            ids = metrics_ids(request.query.get("sandbox_ids"))
        except ValueError as exc:
            return error(400, str(exc))
        now = self._now()
        latest: dict[str, Any] = {}
        for sandbox_id in ids:
            box = self._find(sandbox_id)
            at = model.latest_sample_time(box, now) if box is not None else None
            if box is not None and at is not None:
                latest[sandbox_id] = metric_json(model.sample(box, at))
        return json_response(200, {"sandboxes": latest})

    async def _sandbox_metrics(self, request: web.Request, call: InFlight) -> web.Response:
        """GET /sandboxes/{id}/metrics: the samples of its latest run within start..end."""
        try:
            start = unix_seconds(request.query, "start")
            end = unix_seconds(request.query, "end")
        except ValueError as exc:
            return error(400, str(exc))
        if start is not None and end is not None and start > end:
            return error(400, "start must not be after end")
        box = self._find(call.sandbox_id)
        if box is None:
            return not_found(call.sandbox_id)
        samples = model.samples(box, self._now(), start, end)
        return json_response(200, [metric_json(sample) for sample in samples])


async def _timeout_body(request: web.Request, default: int) -> tuple[dict[str, Any] | None, str]:
    """The JSON body with ``timeout`` checked and defaulted, or None and the 400 message."""
    body = await json_body(request)
    if body is None:
        return None, "Request body must be a JSON object"
    try:
        body["timeout"] = model.check_timeout(body.get("timeout", default))
    except ValueError as exc:
        return None, str(exc)
    return body, ""
