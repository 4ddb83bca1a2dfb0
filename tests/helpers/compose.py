"""The compose files as YAML (PyYAML resolves the merge keys), and their two forms of variables.

The files use ``${NAME:-default}`` for settings and ``${NAME:?message}`` for
secrets, nothing else (a unit test holds them to it). ``with_values`` puts a
value in each: the default, or what ``env`` gives; a required one that ``env``
lacks is refused by name, as compose refuses to start. ``docker compose
config`` itself runs in the ``docker`` test, where an engine exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import yaml

from .config import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
E2B_FILE = ROOT / "docker-compose.e2b.yml"

VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<form>:-|:\?)(?P<word>[^}]*)\}")
ANY_VARIABLE = re.compile(r"\$\{?[A-Za-z_]")


@cache
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@cache
def e2b_text() -> str:
    return E2B_FILE.read_text()


def compose_file() -> dict[str, Any]:
    """docker-compose.yml as YAML, variables as written."""
    loaded: dict[str, Any] = yaml.safe_load(compose_text())
    return loaded


def e2b_file() -> dict[str, Any]:
    """docker-compose.e2b.yml as YAML, variables as written."""
    loaded: dict[str, Any] = yaml.safe_load(e2b_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose_file()["services"]
    return found


def required_variables(text: str) -> dict[str, str]:
    """NAME -> message of every ``${NAME:?message}`` in ``text``, in order of appearance."""
    return {m["name"]: m["word"] for m in VARIABLE.finditer(text) if m["form"] == ":?"}


def with_values(node: Any, env: Mapping[str, str]) -> Any:
    """``node`` with every variable given its value from ``env``, or its default."""
    if isinstance(node, str):
        return VARIABLE.sub(lambda m: _value(m, env), node)
    if isinstance(node, list):
        return [with_values(item, env) for item in node]
    if isinstance(node, dict):
        return {key: with_values(value, env) for key, value in node.items()}
    return node


def _value(match: re.Match[str], env: Mapping[str, str]) -> str:
    value = env.get(match["name"], "")
    if match["form"] == ":-":
        return value or match["word"]
    if not value:
        raise LookupError(f"required variable {match['name']} is missing a value: {match['word']}")
    return value


def environment(spec: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """A service's environment with values, as strings."""
    return {key: str(value) for key, value in with_values(spec.get("environment", {}), env).items()}
