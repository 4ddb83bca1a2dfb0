"""The unit layer runs without RabbitMQ, PostgreSQL or any network: a guard refuses every connection."""

from __future__ import annotations

import pytest

from ..helpers.exclusive import refuse_connections


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_connections(monkeypatch, "a unit test belongs in a layer with services")
