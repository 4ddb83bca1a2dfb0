"""One lock for the machine's RabbitMQ and PostgreSQL, across processes and test runs; guards.

A test that uses the shared services holds it shared; a test that stops them
(marked ``outage``) holds it alone, so no other test, of this run's other
workers or of another run on the machine, meets its outage. A waiting outage
test goes first: new shared holders queue behind it (a turnstile), so it waits
only for the tests already running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from .config import AMQP_URL, DATABASE_URL

LOCK_DIR = Path(os.environ.get("AUTOPAUSE_TEST_LOCK_DIR", tempfile.gettempdir()))


def _open(name: str) -> int:
    return os.open(LOCK_DIR / f"autopause-tests.{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)


@contextlib.contextmanager
def services_lock(alone: bool) -> Iterator[None]:
    """Hold the services: ``alone`` for a test that stops them, shared for every other."""
    turnstile, services = _open("turnstile"), _open("services")
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(services, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield
    finally:
        os.close(services)  # closing releases the locks
        os.close(turnstile)


def shared_addresses() -> set[tuple[str, int]]:
    """(host, port) of the shared RabbitMQ and PostgreSQL."""
    found = set()
    for url, default in ((AMQP_URL, 5672), (DATABASE_URL, 5432)):
        parsed = urlsplit(url)
        found.add((parsed.hostname or "127.0.0.1", parsed.port or default))
    return found


def refuse_connections(
    monkeypatch: pytest.MonkeyPatch, why: str, only: set[tuple[str, int]] | None = None
) -> None:
    """This process's TCP connections fail the test: all of them, or those to the ``only`` addresses."""

    def refusing(real: Callable[[socket.socket, Any], Any]) -> Callable[[socket.socket, Any], Any]:
        def connect(self: socket.socket, address: Any) -> Any:
            inet = self.family in (socket.AF_INET, socket.AF_INET6)
            if inet and (only is None or tuple(address[:2]) in only):
                raise AssertionError(f"connected to {address}: {why}")
            return real(self, address)

        return connect

    monkeypatch.setattr(socket.socket, "connect", refusing(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", refusing(socket.socket.connect_ex))
