"""The control API under ``/_emulator``: the Emulator's Python methods over HTTP, no API key.

Each handler parses, calls the Emulator method of the same job and renders
its answer; errors come in E2B's Error body (400 for a bad body, 404 for an
unknown sandbox). Routes are listed in the package docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from e2b_emulator.wire import error, json_body, json_response

if TYPE_CHECKING:
    from e2b_emulator.model import Sandbox
    from e2b_emulator.server import Emulator

logger = logging.getLogger(__name__)

PREFIX = "/_emulator"
# The fields of POST /_emulator/sandboxes: add_sandbox's keywords, and the id.
_ADD_FIELDS = frozenset(
    {
        "sandbox_id",
        "state",
        "template",
        "metadata",
        "cpu_count",
        "memory_mb",
        "disk_size_mb",
        "cpu_used_pct",
        "mem_used_mb",
        "disk_used_mb",
        "timeout",
    }
)


def routes(emulator: Emulator) -> list[web.RouteDef]:
    ctl = _Control(emulator)
    one = f"{PREFIX}/sandboxes/{{sandbox_id}}"
    return [
        web.get(f"{PREFIX}/calls", ctl.calls),
        web.get(f"{PREFIX}/peak-rate", ctl.peak_rate),
        web.post(f"{PREFIX}/sandboxes", ctl.add),
        web.get(one, ctl.detail),
        web.put(f"{one}/cpu", ctl.cpu),
        web.post(f"{one}/pause", ctl.pause),
        web.post(f"{one}/resume", ctl.resume),
        web.post(f"{one}/kill", ctl.kill),
        web.get(f"{PREFIX}/faults", ctl.faults),
        web.put(f"{PREFIX}/faults", ctl.faults),
        web.post(f"{PREFIX}/reset", ctl.reset),
    ]


class _Control:
    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator

    async def calls(self, request: web.Request) -> web.Response:
        calls = self._emu.calls(request.query.get("op"), request.query.get("sandbox_id"))
        return json_response(200, [asdict(call) for call in calls])

    async def peak_rate(self, request: web.Request) -> web.Response:
        try:
            window = float(request.query.get("window", "1"))
        except ValueError:
            return error(400, "window must be a number of seconds")
        return json_response(200, {"peak": self._emu.peak_rate(request.query.get("op"), window)})

    async def add(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if not body or not isinstance(body.get("sandbox_id"), str) or not body["sandbox_id"]:
            return error(400, "sandbox_id is required")
        problem = _unknown(body, _ADD_FIELDS) or _strings(body)
        if problem:
            return error(400, problem)
        fields = dict(body)
        try:
            sandbox = self._emu.add_sandbox(fields.pop("sandbox_id"), **fields)
        except ValueError as exc:
            return error(400, str(exc))
        return json_response(201, sandbox.to_json())

    async def detail(self, request: web.Request) -> web.Response:
        sandbox_id = request.match_info["sandbox_id"]
        sandbox = self._emu.sandbox(sandbox_id)
        if sandbox is None:
            return json_response(200, {"sandbox_id": sandbox_id, "state": None})
        return json_response(200, sandbox.to_json())

    async def cpu(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if not body or "cpu_used_pct" not in body:
            return error(400, "cpu_used_pct is required")
        problem = _unknown(body, {"cpu_used_pct", "sample_age"})
        if problem:
            return error(400, problem)
        sandbox_id = request.match_info["sandbox_id"]
        return self._act(
            lambda: self._emu.set_cpu(sandbox_id, body["cpu_used_pct"], sample_age=body.get("sample_age"))
        )

    async def pause(self, request: web.Request) -> web.Response:
        sandbox_id = request.match_info["sandbox_id"]
        return self._act(lambda: self._emu.pause_outside(sandbox_id))

    async def resume(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        if body is None:
            return error(400, "body must be a JSON object")
        problem = _unknown(body, {"timeout"})
        if problem:
            return error(400, problem)
        sandbox_id = request.match_info["sandbox_id"]
        if "timeout" in body:
            return self._act(lambda: self._emu.resume_outside(sandbox_id, body["timeout"]))
        return self._act(lambda: self._emu.resume_outside(sandbox_id))

    async def kill(self, request: web.Request) -> web.Response:
        sandbox_id = request.match_info["sandbox_id"]
        try:
            self._emu.kill_outside(sandbox_id)
        except LookupError as exc:
            return error(404, str(exc))
        return json_response(200, {"sandbox_id": sandbox_id, "state": None})

    async def faults(self, request: web.Request) -> web.Response:
        if request.method == "PUT":
            body = await json_body(request)
            if body is None:
                return error(400, "body must be a JSON object")
            try:
                self._emu.faults.update(body)
            except ValueError as exc:
                return error(400, str(exc))
            logger.info("faults changed", extra={"action": "emulator.faults", "changes": body})
        return json_response(200, self._emu.faults.to_json())

    async def reset(self, request: web.Request) -> web.Response:
        body = await json_body(request) or {}
        self._emu.reset(faults=bool(body.get("faults")), sandboxes=bool(body.get("sandboxes")))
        return json_response(200, {"reset": True})

    def _act(self, action: Callable[[], Sandbox]) -> web.Response:
        """Run an Emulator method that returns a Sandbox; its errors become 404 and 400."""
        try:
            sandbox = action()
        except LookupError as exc:
            return error(404, str(exc))
        except ValueError as exc:
            return error(400, str(exc))
        return json_response(200, sandbox.to_json())


def _unknown(body: dict[str, Any], known: frozenset[str] | set[str]) -> str | None:
    unknown = set(body) - known
    return f"unknown fields: {sorted(unknown)}" if unknown else None


def _strings(body: dict[str, Any]) -> str | None:
    """Type checks that add_sandbox leaves to its annotations."""
    for name in ("state", "template"):
        if name in body and (not isinstance(body[name], str) or not body[name]):
            return f"{name} must be a non-empty string"
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        return "metadata must map strings to strings"
    return None
