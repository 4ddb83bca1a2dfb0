"""The emulator's HTTP edge: E2B's JSON shapes out, query strings and bodies in."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
from aiohttp import web

from e2b_emulator.fleet import ListQuery
from e2b_emulator.model import ENVD_VERSION, STATES, Box, Sample

MAX_METRICS_IDS = 100
_JSON = "application/json"


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON, headers=headers)


def error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    """An answer with E2B's Error body, which the SDK maps to its exceptions."""
    headers = {"Retry-After": retry_after} if retry_after else None
    return json_response(status, {"code": status, "message": message}, headers)


def not_found(sandbox_id: str | None) -> web.Response:
    return error(404, f"Sandbox {sandbox_id} not found")


async def json_body(request: web.Request) -> dict[str, Any] | None:
    """The JSON object in the body, {} for an empty body, None for anything else."""
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


# -- E2B's schemas ---------------------------------------------------------


def sandbox_json(box: Box) -> dict[str, Any]:
    """The ``Sandbox`` schema: what create, connect and resume answer."""
    return {
        "templateID": box.template,
        "sandboxID": box.sandbox_id,
        "clientID": "emulator",
        "envdVersion": ENVD_VERSION,
    }


def listed_json(box: Box) -> dict[str, Any]:
    """The ``ListedSandbox`` schema; ``SandboxDetail`` has the same required fields."""
    return {
        "templateID": box.template,
        "sandboxID": box.sandbox_id,
        "clientID": "emulator",
        "startedAt": box.started_at.isoformat(),
        "endAt": box.end_at.isoformat(),
        "cpuCount": box.cpu_count,
        "memoryMB": box.memory_mb,
        "diskSizeMB": box.disk_size_mb,
        "metadata": box.metadata,
        "state": box.state,
        "envdVersion": ENVD_VERSION,
    }


def detail_json(box: Box) -> dict[str, Any]:
    """The ``SandboxDetail`` schema: what get-info answers."""
    detail = listed_json(box)
    if box.pause_mode is not None:
        detail["pauseMode"] = box.pause_mode
    return detail


def metric_json(sample: Sample) -> dict[str, Any]:
    """The ``SandboxMetric`` schema (memory and disk in bytes)."""
    return {
        "timestamp": datetime.fromtimestamp(sample.at, UTC).isoformat().replace("+00:00", "Z"),
        "timestampUnix": sample.at,
        "cpuCount": sample.cpu_count,
        "cpuUsedPct": sample.cpu_used_pct,
        "memUsed": sample.mem_used,
        "memTotal": sample.mem_total,
        "memCache": 0,
        "diskUsed": sample.disk_used,
        "diskTotal": sample.disk_total,
    }


# -- query strings -----------------------------------------------------------


def list_query(query: Mapping[str, str]) -> ListQuery:
    """``GET /v2/sandboxes`` parameters, or ValueError with the 400 message."""
    limit_text = query.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise ValueError("limit must be between 1 and 100")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ValueError("order must be asc or desc")
    return ListQuery(
        states=_states(query.get("state")),
        metadata=tuple(_metadata(query.get("metadata")).items()),
        template=query.get("template"),
        started_after=_time(query.get("startedAfter")),
        order=order,
        limit=int(limit_text),
        after_seq=decode_token(query.get("nextToken")),
    )


def metrics_ids(text: str | None) -> list[str]:
    """``sandbox_ids`` of ``GET /sandboxes/metrics``: 1 to 100 distinct ids, or ValueError."""
    ids = text.split(",") if text else []
    if not ids or not all(ids):
        raise ValueError("sandbox_ids must be a comma-separated list of sandbox ids")
    if len(ids) > MAX_METRICS_IDS:
        raise ValueError(f"sandbox_ids must name at most {MAX_METRICS_IDS} sandboxes")
    if len(set(ids)) != len(ids):
        raise ValueError("sandbox_ids must not repeat an id")
    return ids


def unix_seconds(query: Mapping[str, str], name: str) -> int | None:
    """An optional ``start``/``end`` parameter (Unix seconds), or ValueError."""
    text = query.get(name)
    if text is None:
        return None
    if not text.isdigit():
        raise ValueError(f"{name} must be a Unix time in seconds")
    return int(text)


def _states(text: str | None) -> tuple[str, ...]:
    if not text:
        return STATES
    states = tuple(text.split(","))
    if not set(states) <= set(STATES):
        raise ValueError(f"state must be a comma-separated subset of {','.join(STATES)}")
    return states


def _metadata(text: str | None) -> dict[str, str]:
    """The SDK sends ``urlencode({quote(k): quote(v)})`` as one query value; past
    aiohttp's decoding, parse_qsl undoes urlencode and unquote the quoting."""
    if not text:
        return {}
    return {unquote(k): unquote(v) for k, v in parse_qsl(text, keep_blank_values=True)}


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.astimezone()


def encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def decode_token(token: str | None) -> int | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("invalid nextToken") from None
    if not text.startswith("seq:") or not text[4:].isdigit():
        raise ValueError("invalid nextToken")
    return int(text[4:])
