"""One lock for the machine's RabbitMQ and PostgreSQL, across processes and test runs.

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
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
