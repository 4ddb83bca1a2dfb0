"""The shipped RabbitMQ definitions, as a file: one user per role, no password in it, least rights."""

from __future__ import annotations

import secrets

import pytest

from consumer.broker import Names
from consumer.errors import ConfigError
from consumer.rabbitmq_definitions import check_password, render
from consumer.settings import load_settings

from ..helpers.management import password_matches, passwords_env, template

ROLES = ("ingest", "scheduler", "worker", "producer", "operator")
NAMES = Names("")


def test_no_password_or_hash_is_in_the_shipped_file() -> None:
    users = template()["users"]
    assert {user["name"] for user in users} == {*ROLES, "admin"}
    for user in users:
        assert "password_hash" not in user and "password" not in user, user["name"]
        assert user["password_env"] == f"RABBITMQ_{user['name'].upper()}_PASSWORD"
        assert user["tags"] == (["administrator"] if user["name"] == "admin" else []), user["name"]


def test_rendering_hashes_each_password_from_the_environment() -> None:
    passwords = {user["name"]: secrets.token_hex(16) for user in template()["users"]}
    rendered = render(template(), passwords_env(passwords))
    assert rendered["queues"] == template()["queues"]
    for user in rendered["users"]:
        assert "password_env" not in user
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert password_matches(user["password_hash"], passwords[user["name"]]), user["name"]
        assert not password_matches(user["password_hash"], user["name"])


@pytest.mark.parametrize(
    ("password", "complaint"),
    [
        (None, "is not set"),
        ("", "is not set"),
        ("short-but-random", None),
        ("too-short", "at least 16"),
        ("ingest-ingest-ingest", "user name"),
        ("has space in it 0123456789", "only A-Z"),
        ("has@and:in/it-0123456789", "only A-Z"),
    ],
)
def test_a_missing_or_weak_password_is_refused_by_name(password: str | None, complaint: str | None) -> None:
    if complaint is None:
        assert check_password("ingest", "RABBITMQ_INGEST_PASSWORD", password) == password
        return
    with pytest.raises(ConfigError, match=complaint) as refused:
        check_password("ingest", "RABBITMQ_INGEST_PASSWORD", password)
    assert "RABBITMQ_INGEST_PASSWORD" in str(refused.value)


def test_rendering_names_every_missing_variable_at_once() -> None:
    with pytest.raises(ConfigError) as refused:
        render(template(), {"RABBITMQ_INGEST_PASSWORD": secrets.token_hex(16)})
    for user in template()["users"]:
        if user["name"] != "ingest":
            assert user["password_env"] in str(refused.value)


def test_only_the_administrator_may_configure_anything() -> None:
    for grant in template()["permissions"]:
        if grant["user"] == "admin":
            continue
        assert grant["configure"] == "^$", grant["user"]
        for kind in ("write", "read"):
            assert grant[kind].startswith("^") and grant[kind].endswith("$"), (grant["user"], kind)


def test_the_shipped_queues_carry_the_limits_of_back_pressure() -> None:
    policies = {policy["name"]: policy for policy in template()["policies"]}
    events = policies["autopause-events-limit"]
    dead = policies["autopause-dead-letters-limit"]
    assert events["definition"]["overflow"] == dead["definition"]["overflow"] == "reject-publish"
    assert events["definition"]["max-length"] > load_settings().events_backlog_limit
    assert {name for name in NAMES.queues() if name.endswith(".dlq")} == {
        q["name"] for q in template()["queues"] if q["name"].endswith(".dlq")
    }
