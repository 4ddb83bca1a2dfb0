"""RabbitMQ definitions for a deployment: the shipped file with each password hashed in from the environment.

``deploy/rabbitmq/definitions.json`` names, for every user, the environment
variable that holds its password (``password_env``) instead of a password or a
hash. This module writes the file RabbitMQ imports at boot, with
``password_hash`` (``rabbit_password_hashing_sha256``: base64 of a 4-byte salt
followed by SHA-256 of salt + password) in place of each ``password_env``::

    python -m consumer.rabbitmq_definitions TEMPLATE OUTPUT

Compose runs it as a one-shot service before RabbitMQ starts. A missing, short
or guessable password stops it with a message that names the variable, so the
broker never boots with a weak one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from consumer.errors import ConfigError

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
MIN_PASSWORD_LENGTH = 16
# passwords go into amqp:// URLs unescaped: keep to the characters a URL never needs to escape
_URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's salted SHA-256 password hash, as definitions files carry it."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password(user: str, variable: str, password: str | None) -> str:
    """The password, or ConfigError naming the variable when it is missing or weak."""
    if not password:
        raise ConfigError(f"{variable} is not set: the password of RabbitMQ user {user!r}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"{variable}: at least {MIN_PASSWORD_LENGTH} characters (openssl rand -hex 32)")
    if not _URL_SAFE.match(password):
        raise ConfigError(f"{variable}: use only A-Z a-z 0-9 . _ ~ - (it goes into amqp:// URLs)")
    if user.lower() in password.lower():
        raise ConfigError(f"{variable}: the password must not contain the user name")
    return password


def render(template: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The definitions with every ``password_env`` replaced by the hash of that variable's value."""
    rendered = dict(template)
    users = []
    problems = []
    for entry in template.get("users", []):
        user = {key: value for key, value in entry.items() if key != "password_env"}
        variable = entry.get("password_env")
        if variable is None:
            if "password_hash" not in entry:
                problems.append(f"user {entry['name']!r} has neither password_env nor password_hash")
            users.append(user)
            continue
        try:
            password = check_password(entry["name"], variable, env.get(variable))
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        user["password_hash"] = password_hash(password)
        user["hashing_algorithm"] = HASHING_ALGORITHM
        users.append(user)
    if problems:
        raise ConfigError("; ".join(problems))
    rendered["users"] = users
    return rendered


def write(template_path: Path, output_path: Path, env: Mapping[str, str]) -> int:
    """Render ``template_path`` into ``output_path`` (atomically, readable by the broker); return users."""
    rendered = render(json.loads(template_path.read_text()), env)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    partial.write_text(json.dumps(rendered, indent=2) + "\n")
    # salted hashes of long random passwords; the broker runs as another user and must read them
    partial.chmod(0o644)
    partial.replace(output_path)
    return len(rendered["users"])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print("usage: python -m consumer.rabbitmq_definitions TEMPLATE OUTPUT", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    try:
        count = write(Path(args[0]), Path(args[1]), os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args[1]}: {count} users, passwords from the environment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
