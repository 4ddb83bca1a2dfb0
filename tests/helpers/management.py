"""RabbitMQ's management HTTP API, for tests that make throwaway vhosts and users on the shared broker.

The API must answer: a test that needs it fails (never skips) when it does not,
with the command that enables it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest

from .config import AMQP_URL, ROOT

MANAGEMENT_PORT = 15672
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"


class Management:
    """A thin client of ``/api`` with the broker's administrator login (guest on the test machine)."""

    def __init__(self, http: aiohttp.ClientSession, api: str) -> None:
        self.http = http
        self.api = api

    async def get(self, path: str) -> Any:
        async with self.http.get(self.api + path) as response:
            assert response.status == 200, f"GET {path}: {response.status} {await response.text()}"
            return await response.json()

    async def put(self, path: str, body: dict[str, Any]) -> None:
        async with self.http.put(self.api + path, json=body) as response:
            assert response.status in (201, 204), f"PUT {path}: {response.status} {await response.text()}"

    async def post(self, path: str, body: dict[str, Any]) -> None:
        async with self.http.post(self.api + path, json=body) as response:
            assert response.status in (200, 201, 204), (
                f"POST {path}: {response.status} {await response.text()}"
            )

    async def delete(self, path: str) -> None:
        async with self.http.delete(self.api + path):
            pass


def vhost_path(vhost: str) -> str:
    return quote(vhost, safe="")


def amqp_url(user: str, password: str, vhost: str, *, port: int | None = None) -> str:
    """A URL of the shared broker's host for ``user`` in ``vhost``."""
    parsed = urlsplit(AMQP_URL)
    return f"amqp://{user}:{password}@{parsed.hostname}:{port or parsed.port or 5672}/{vhost_path(vhost)}"


@asynccontextmanager
async def management(url: str = AMQP_URL, port: int = MANAGEMENT_PORT) -> AsyncIterator[Management]:
    """The management API of the broker behind ``url``; the test fails if it does not answer."""
    parsed = urlsplit(url)
    api = f"http://{parsed.hostname}:{port}/api"
    login = aiohttp.encode_basic_auth(parsed.username or "guest", parsed.password or "guest")
    async with aiohttp.ClientSession(
        headers={"Authorization": login}, timeout=aiohttp.ClientTimeout(total=15)
    ) as http:
        try:
            async with http.get(f"{api}/overview") as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            pytest.fail(
                f"RabbitMQ management API unreachable at {api} ({exc}); "
                "enable it: rabbitmq-plugins enable rabbitmq_management"
            )
        if status != 200:
            pytest.fail(f"RabbitMQ management API at {api} answered {status} to the administrator")
        yield Management(http, api)


@asynccontextmanager
async def throwaway_vhost(api: Management, label: str) -> AsyncIterator[str]:
    """A vhost of its own, where the administrator may do anything; deleted afterwards."""
    vhost = f"autopause-{label}-{uuid.uuid4().hex[:10]}"
    admin = urlsplit(AMQP_URL).username or "guest"
    await api.put(f"/vhosts/{vhost_path(vhost)}", {})
    try:
        await api.put(
            f"/permissions/{vhost_path(vhost)}/{admin}", {"configure": ".*", "write": ".*", "read": ".*"}
        )
        yield vhost
    finally:
        await api.delete(f"/vhosts/{vhost_path(vhost)}")


def template() -> dict[str, Any]:
    """The shipped definitions template (users name the variable of their password)."""
    loaded: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return loaded


def passwords_env(passwords: dict[str, str]) -> dict[str, str]:
    """The environment that gives each user of the template its password."""
    return {user["password_env"]: passwords[user["name"]] for user in template()["users"]}


def password_matches(hashed: str, password: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256, computed here on its own.

    The hash is base64(salt + sha256(salt + password)) with a 4-byte salt.
    """
    raw = base64.b64decode(hashed)
    salt, digest = raw[:4], raw[4:]
    return len(salt) == 4 and hashlib.sha256(salt + password.encode()).digest() == digest
