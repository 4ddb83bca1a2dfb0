"""The contracts: generated documents in step with the models, limits that hold."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from schemas import EVENT_ADAPTER, SandboxCreated
from schemas.generate import documents

from ..helpers.config import ROOT


def test_committed_documents_match_the_models() -> None:
    for path, content in documents().items():
        assert path.exists(), f"{path.name} missing: run python -m schemas.generate"
        assert path.read_bytes() == content, f"{path.name} is stale: run python -m schemas.generate"


def created(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "event_id": str(uuid.uuid4()),
        "type": "sandbox.created",
        "occurred_at": datetime.now(UTC).isoformat(),
        "sandbox_id": "sbx-1",
        "project_id": "p",
        "user_id": "u",
        "template": "base",
    }
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "changes",
    [
        {"idle_timeout_s": 5},
        {"idle_timeout_s": 10**9},
        {"idle_timeout_s": "600"},
        {"sandbox_id": "x"},
        {"sandbox_id": "UPPER"},
        {"project_id": "a b"},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"metadata": {"bad key": "v"}},
        {"occurred_at": "2026-11-29T10:00:00"},
        {"event_id": "not-a-uuid"},
        {"unknown": True},
    ],
)
def test_created_limits(changes: dict[str, object]) -> None:
    import orjson

    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_json(orjson.dumps(created(**changes)))


def test_clock_skew_allowance_is_taken_from_the_context() -> None:
    import orjson

    now = datetime.now(UTC)
    body = orjson.dumps(created(occurred_at=(now + timedelta(seconds=60)).isoformat()))
    assert isinstance(EVENT_ADAPTER.validate_json(body, context={"now": now}), SandboxCreated)
    with pytest.raises(ValidationError, match="future"):
        EVENT_ADAPTER.validate_json(body, context={"now": now, "clock_skew": timedelta(seconds=30)})


def test_the_readme_documents_every_setting() -> None:
    from consumer.settings import Settings, env_name

    readme = (ROOT / "README.md").read_text()
    missing = [env_name(name) for name in Settings.model_fields if f"`{env_name(name)}`" not in readme]
    assert missing == []


def test_the_readme_examples_are_valid_events() -> None:
    import json
    import re

    readme = (ROOT / "README.md").read_text()
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", readme, re.S)]
    assert {e["type"] for e in examples} == {"sandbox.created", "sandbox.activity", "sandbox.killed"}
    for example in examples:
        at = datetime.fromisoformat(example["occurred_at"])
        EVENT_ADAPTER.validate_json(json.dumps(example), context={"now": at})
