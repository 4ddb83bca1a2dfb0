"""Write the JSON Schema and AsyncAPI documents from the models: ``python -m schemas.generate``.

``--check`` writes nothing and exits 1 when a committed document differs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from schemas.events import (
    SANDBOX_ID_PATTERN,
    Outcome,
    PauseCommand,
    SandboxActivity,
    SandboxCreated,
    SandboxKilled,
)

HERE = Path(__file__).parent
JSON_DIR = HERE / "json"

MODELS: dict[str, type[BaseModel]] = {
    "sandbox.created": SandboxCreated,
    "sandbox.activity": SandboxActivity,
    "sandbox.killed": SandboxKilled,
    "sandbox.pause": PauseCommand,
    "sandbox.outcome": Outcome,
}


def json_schema(name: str, model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://autopause.dev/schemas/{name}.schema.json"
    return schema


def _channel(address: str, description: str, messages: list[str]) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "messages": {
            m.replace(".", "_"): {"$ref": f"#/components/messages/{m.replace('.', '_')}"} for m in messages
        },
    }


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0: what app services publish to autopause and what they may hear back."""
    messages = {}
    for name, model in MODELS.items():
        key = name.replace(".", "_")
        messages[key] = {
            "name": name,
            "contentType": "application/json",
            "summary": (model.__doc__ or "").strip().splitlines()[0],
            "payload": {"$ref": f"./json/{name}.schema.json"},
        }
    events = ["sandbox.created", "sandbox.activity", "sandbox.killed"]
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "autopause",
            "version": "1.0.0",
            "description": (
                "Events that app services publish so that autopause can pause idle E2B sandboxes, "
                "and the outcomes it announces. One UTF-8 JSON object per message; the routing key "
                f"is the message type; sandbox ids match {SANDBOX_ID_PATTERN}."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"rabbitmq": {"host": "rabbitmq:5672", "protocol": "amqp", "protocolVersion": "0-9-1"}},
        "channels": {
            "sandboxEvents": _channel("sandbox.events", "Topic exchange; routing key = type.", events),
            "pauseCommands": _channel(
                "autopause.commands", "Internal: scheduler to workers.", ["sandbox.pause"]
            ),
            "lifecycle": _channel(
                "sandbox.lifecycle",
                "Topic exchange; routing key sandbox.paused, sandbox.pause_failed or sandbox.gone.",
                ["sandbox.outcome"],
            ),
        },
        "operations": {
            "publishEvents": {
                "action": "send",
                "channel": {"$ref": "#/channels/sandboxEvents"},
                "messages": [
                    {"$ref": f"#/channels/sandboxEvents/messages/{m.replace('.', '_')}"} for m in events
                ],
            },
            "receiveOutcomes": {
                "action": "receive",
                "channel": {"$ref": "#/channels/lifecycle"},
                "messages": [{"$ref": "#/channels/lifecycle/messages/sandbox_outcome"}],
            },
        },
        "components": {"messages": messages},
    }


def documents() -> dict[Path, bytes]:
    """Every generated file and its exact content."""
    options = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
    files = {
        JSON_DIR / f"{name}.schema.json": orjson.dumps(json_schema(name, model), option=options)
        for name, model in MODELS.items()
    }
    files[HERE / "asyncapi.json"] = orjson.dumps(asyncapi(), option=options)
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, content in documents().items():
        if path.exists() and path.read_bytes() == content:
            continue
        stale.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    for path in stale:
        print(f"{'stale' if check else 'wrote'}: {path.relative_to(HERE.parent)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
