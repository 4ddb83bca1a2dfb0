"""The container deployment, checked without a Docker engine.

The compose file is read as compose reads it (YAML merge keys, then variable
interpolation), every command it gives the image is put to the real CLI, every
environment it gives a service is put to the real settings, and the RabbitMQ
definitions are imported into a throwaway vhost of the local broker, where the
producer must be refused everything but publishing events and the service user
must run the whole pipeline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aiohttp
import aiormq
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from conftest import AMQP_URL, ago, event, wait_for
from pamqp.commands import Basic
from pydantic import SecretStr

from consumer import runner
from consumer.broker import PAUSE_ROUTING_KEY, Names, declare_topology, message
from consumer.health import Health, serve
from consumer.runner import check_e2b
from consumer.settings import Settings, load_settings
from e2b_emulator import Emulator
from schemas import EVENT_TYPES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEFINITIONS_FILE = ROOT / "deploy" / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"

SERVICES = {"rabbitmq", "postgres", "migrate", "ingest", "scheduler", "worker", "e2b-emulator", "generator"}
ROLES = ("ingest", "scheduler", "worker")
# the development passwords that docs/deploy.md and the compose file announce
DEV_PASSWORDS = {"autopause": "autopause", "producer": "producer", "admin": "admin"}
EMULATOR_URL = "http://e2b-emulator:3000"


# -- reading the files as compose does ------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", "-", ":+", "+", ":?", "?")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: $$, $NAME, ${NAME} and its -, +, ? forms, nested.

    As in compose, the word after an operator is expanded whether or not it is used.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        following = text[i + 1 : i + 2]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "{":
            end = _closing_brace(text, i)
            out.append(_expand(text[i + 2 : end], env))
            i = end + 1
        elif match := _NAME.match(text, i + 1):
            out.append(env.get(match.group(), ""))
            i = match.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def _expand(body: str, env: Mapping[str, str]) -> str:
    match = _NAME.match(body)
    if not match:
        raise ValueError(f"invalid interpolation ${{{body}}}")
    name, rest = match.group(), body[match.end() :]
    value = env.get(name)
    if not rest:
        return value or ""
    operator = next((op for op in _OPERATORS if rest.startswith(op)), None)
    if operator is None:
        raise ValueError(f"compose does not support ${{{body}}}")
    word = interpolate(rest[len(operator) :], env)
    present = value is not None and (value != "" or not operator.startswith(":"))
    if operator in (":-", "-"):
        return value if present and value is not None else word
    if operator in (":+", "+"):
        return word if present else ""
    if not present or value is None:
        raise LookupError(f"required variable {name} is missing a value: {word}")
    return value


def _resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    return node


@cache
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as compose sees it with ``env`` as the shell environment."""
    loaded = yaml.safe_load(compose_text())
    resolved: dict[str, Any] = _resolve(loaded, env or {})
    return resolved


def autopause_services() -> list[str]:
    """The services that run the autopause image."""
    return sorted(name for name, spec in compose()["services"].items() if "build" in spec)


def environment(service: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    return {key: str(value) for key, value in compose(env)["services"][service]["environment"].items()}


@cache
def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS_FILE.read_text())
    return loaded


def definition_user(name: str) -> dict[str, Any]:
    return next(user for user in definitions()["users"] if user["name"] == name)


def permission(user: str) -> dict[str, str]:
    return next(p for p in definitions()["permissions"] if p["user"] == user)


def password_matches(password_hash: str, password: str) -> bool:
    """rabbit_password_hashing_sha256: base64(salt, 4 bytes + SHA-256(salt + UTF-8 password))."""
    raw = base64.b64decode(password_hash)
    salt, digest = raw[:4], raw[4:]
    return hashlib.sha256(salt + password.encode()).digest() == digest


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    pairs = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


# -- the compose file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:+x}", {"A": ""}, ""),
        ("${A+x}", {"A": ""}, "x"),
        ("${A:+x}", {"A": "1"}, "x"),
        ("${A:-${B:-y}}", {}, "y"),
        ("a${A:+.b}c", {"A": "1"}, "a.bc"),
        ("$$A $A", {"A": "1"}, "$A 1"),
    ],
)
def test_the_interpolation_reads_templates_as_compose_does(
    template: str, env: dict[str, str], expected: str
) -> None:
    assert interpolate(template, env) == expected


def test_the_interpolation_stops_on_a_missing_required_variable() -> None:
    with pytest.raises(LookupError, match="A"):
        interpolate("${A:?set A}", {"A": ""})


def test_compose_file_has_every_service() -> None:
    assert set(compose()["services"]) == SERVICES
    assert set(autopause_services()) == SERVICES - {"rabbitmq", "postgres"}


def test_rabbitmq_has_the_management_ui_and_loads_the_definitions() -> None:
    rabbit = compose()["services"]["rabbitmq"]
    assert rabbit["image"] == "rabbitmq:3.13-management"
    assert {str(port).split(":")[-1] for port in rabbit["ports"]} == {"5672", "15672"}
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    mounts = {}
    for volume in rabbit["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    assert mounts["/etc/rabbitmq/rabbitmq.conf"] == ("./deploy/rabbitmq/rabbitmq.conf", ["ro"])
    assert mounts["/etc/rabbitmq/definitions.json"] == ("./deploy/rabbitmq/definitions.json", ["ro"])
    assert (ROOT / "deploy/rabbitmq/rabbitmq.conf").is_file()
    assert (ROOT / "deploy/rabbitmq/definitions.json").is_file()
    settings = [line.split("#")[0].strip() for line in RABBITMQ_CONF.read_text().splitlines()]
    assert "management.load_definitions = /etc/rabbitmq/definitions.json" in settings


def test_postgres_has_a_health_check_and_keeps_its_data_in_a_named_volume() -> None:
    spec = compose()
    postgres = spec["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    volume, target = postgres["volumes"][0].split(":")[:2]
    assert target == "/var/lib/postgresql/data"
    assert volume in spec["volumes"]
    assert {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"} <= set(postgres["environment"])


def test_roles_restart_wait_for_their_dependencies_and_are_probed() -> None:
    services = compose()["services"]
    for name in autopause_services():
        expected = "no" if name == "migrate" else "unless-stopped"
        assert services[name]["restart"] == expected, name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for role in ROLES:
        spec = services[role]
        assert spec["command"] == ["run", role]
        assert spec["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert spec["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        probe = " ".join(spec["healthcheck"]["test"])
        assert "http://127.0.0.1:9464/healthz" in probe
        assert "urllib" in probe
        assert spec["environment"]["AUTOPAUSE_METRICS_PORT"] == "9464"
    assert services["ingest"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == "1"
    for scaled in ("ingest", "worker"):
        assert "ports" not in services[scaled], f"{scaled} replicas would clash on a host port"


def test_host_ports_do_not_clash() -> None:
    published = [
        str(port).rsplit(":", 1)[0]
        for spec in compose()["services"].values()
        for port in spec.get("ports", [])
    ]
    assert len(published) == len(set(published)), published


def test_the_generator_is_a_demo_producer() -> None:
    generator = compose()["services"]["generator"]
    assert generator["profiles"] == ["demo"]
    assert generator["command"][:3] == ["generate", "--users", "50"]
    assert urlsplit(generator["environment"]["AUTOPAUSE_AMQP_URL"]).username == "producer"
    assert generator["depends_on"]["ingest"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", autopause_services())
def test_the_cli_accepts_each_service_command(service: str) -> None:
    # click parses every argument before it acts on --help: a wrong one exits 2
    command = compose()["services"][service]["command"]
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "consumer", *command, "--help"],
        env=clean,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"`autopause {shlex.join(command)}` was refused:\n{done.stderr}"


@pytest.mark.parametrize("service", autopause_services())
def test_each_service_environment_is_valid_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("AUTOPAUSE_", "E2B_")):
            monkeypatch.delenv(key)
    for key, value in environment(service).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.log_format == "json"
    assert settings.metrics_port == 9464
    if service == "worker":
        check_e2b(settings, {"worker"})  # the demo defaults must satisfy the worker's own check


@pytest.mark.parametrize("service", autopause_services())
def test_each_service_signs_in_as_its_least_privileged_user(service: str) -> None:
    env = environment(service)
    amqp = urlsplit(env["AUTOPAUSE_AMQP_URL"])
    assert amqp.hostname == "rabbitmq"
    assert amqp.username == ("producer" if service == "generator" else "autopause")
    assert amqp.password is not None
    assert password_matches(definition_user(amqp.username)["password_hash"], amqp.password)
    database = urlsplit(env["AUTOPAUSE_DATABASE_URL"])
    postgres = compose()["services"]["postgres"]["environment"]
    assert database.hostname == "postgres"
    assert (database.username, database.password, database.path) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        "/" + postgres["POSTGRES_DB"],
    )


@pytest.mark.parametrize(
    ("shell", "key", "url"),
    [
        ({}, "e2b_emulator", EMULATOR_URL),
        ({"E2B_API_KEY": "", "E2B_API_URL": ""}, "e2b_emulator", EMULATOR_URL),
        (
            {"E2B_API_KEY": "e2b_real", "E2B_API_URL": "https://api.e2b.app"},
            "e2b_real",
            "https://api.e2b.app",
        ),
        # a URL without a key: E2B refuses the placeholder key (401), loudly
        ({"E2B_API_URL": "https://api.e2b.app"}, "e2b_emulator", "https://api.e2b.app"),
        # the emulator on purpose
        ({"E2B_API_KEY": "e2b_x", "E2B_API_URL": EMULATOR_URL}, "e2b_x", EMULATOR_URL),
    ],
)
def test_pauses_go_where_the_e2b_variables_say(shell: dict[str, str], key: str, url: str) -> None:
    env = environment("worker", shell)
    assert (env["AUTOPAUSE_E2B_API_KEY"], env["AUTOPAUSE_E2B_API_URL"]) == (key, url)


def test_a_real_key_without_a_url_never_reaches_the_emulator() -> None:
    env = environment("worker", {"E2B_API_KEY": "e2b_0123456789abcdef"})
    target = urlsplit(env["AUTOPAUSE_E2B_API_URL"])
    assert env["AUTOPAUSE_E2B_API_KEY"] == "e2b_0123456789abcdef"
    assert target.hostname is not None
    assert target.hostname != "e2b-emulator"
    # RFC 2606 reserves .invalid: the name can never resolve, so every pause fails loudly
    assert target.hostname.endswith(".invalid")
    assert "0123456789abcdef" not in env["AUTOPAUSE_E2B_API_URL"]


def test_only_the_worker_gets_the_e2b_key_and_dry_run_reaches_it() -> None:
    shell = {"E2B_API_KEY": "e2b_real", "E2B_API_URL": "https://api.e2b.app", "AUTOPAUSE_DRY_RUN": "true"}
    holders = [name for name in autopause_services() if "AUTOPAUSE_E2B_API_KEY" in environment(name, shell)]
    assert holders == ["worker"]
    assert environment("worker", shell)["AUTOPAUSE_DRY_RUN"] == "true"


def test_one_variable_sets_the_worker_replicas_and_their_rate_share() -> None:
    spec = compose({"AUTOPAUSE_WORKER_REPLICAS": "3"})["services"]["worker"]
    assert spec["deploy"]["replicas"] == "3"
    assert spec["environment"]["AUTOPAUSE_WORKER_REPLICAS"] == "3"


async def test_the_health_probe_fails_when_a_loop_stalls() -> None:
    probe = compose()["services"]["scheduler"]["healthcheck"]["test"]
    assert probe[:2] == ["CMD", "python"]
    health = Health(stale_after=60)
    health.beat("loop")
    server = await serve(health, "127.0.0.1", 0)
    try:
        port = server.addresses[0][1]
        command = [sys.executable, *(arg.replace(":9464/", f":{port}/") for arg in probe[2:])]
        assert (await _run(command))[0] == 0
        health.beats["loop"] -= 120
        assert (await _run(command))[0] != 0
    finally:
        await server.cleanup()


async def _run(command: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, output.decode(errors="replace")


# -- the image ------------------------------------------------------------------------------


def test_the_image_installs_the_package_and_runs_autopause() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    assert any(re.search(r"\bpip install \.(\s|$)", args) for args in runs)
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    entrypoints = [args for instruction, args in instructions if instruction == "ENTRYPOINT"]
    assert [json.loads(args) for args in entrypoints] == [["autopause"]]
    assert ("EXPOSE", "9464") in instructions
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["autopause"] == "consumer.cli:main"


def test_the_image_gets_everything_pip_install_reads() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["setuptools"]["packages"]["find"]["include"])
    copied = set()
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            *sources, _target = args.split()
            copied |= {source.rstrip("/") for source in sources if not source.startswith("--")}
    wanted = {name.rstrip("*") for name in needed}
    assert wanted <= copied, f"not copied into the image: {wanted - copied}"
    missing = [name for name in sorted(wanted) if not (ROOT / name).exists()]
    assert not missing, f"`docker build` would fail, missing from the build context: {missing}"


# -- the RabbitMQ definitions, offline ----------------------------------------------------


def test_definitions_hold_the_users_and_no_topology() -> None:
    defs = definitions()
    assert [vhost["name"] for vhost in defs["vhosts"]] == ["/"]
    assert {user["name"] for user in defs["users"]} == set(DEV_PASSWORDS)
    for user in defs["users"]:
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert password_matches(user["password_hash"], DEV_PASSWORDS[user["name"]]), user["name"]
        assert user["tags"] == (["administrator"] if user["name"] == "admin" else []), user["name"]
    # the service declares its topology itself, with the arguments broker.py gives it
    for kind in ("queues", "exchanges", "bindings", "policies"):
        assert not defs.get(kind), kind


def test_the_service_user_is_confined_to_its_own_names() -> None:
    grant = permission("autopause")
    names = Names("")
    own = [*names.queues(), *names.exchanges()]
    foreign = [
        "",
        "amq.default",
        "amq.topic",
        "amq.gen-JzTY20BRgKO",
        "other",
        "sandbox.eventsX",
        "xautopause.pause",
    ]
    for kind in ("configure", "write", "read"):
        pattern = re.compile(grant[kind])
        assert all(pattern.search(name) for name in own), kind
        assert not any(pattern.search(name) for name in foreign), kind


def test_the_producer_may_only_write_to_the_events_exchange() -> None:
    grant = permission("producer")
    assert (grant["configure"], grant["read"]) == ("^$", "^$")
    write = re.compile(grant["write"])
    names = Names("")
    assert [n for n in [*names.queues(), *names.exchanges(), "amq.default"] if write.search(n)] == [
        names.events_exchange
    ]
    (topic,) = [p for p in definitions()["topic_permissions"] if p["user"] == "producer"]
    assert topic["exchange"] == names.events_exchange
    keys = re.compile(topic["write"])
    assert all(keys.search(kind) for kind in EVENT_TYPES)
    assert not any(keys.search(key) for key in ("sandbox.pause", "sandbox.bogus", "#", ""))


# -- the RabbitMQ definitions, on the local broker ----------------------------------------


@dataclass(frozen=True)
class Imported:
    """The definitions' users and permissions, imported into a vhost of their own."""

    vhost: str
    users: dict[str, str]  # name in the definitions -> name on the broker

    def url(self, user: str) -> str:
        parsed = urlsplit(AMQP_URL)
        login = f"{self.users[user]}:{DEV_PASSWORDS[user]}"
        return f"amqp://{login}@{parsed.hostname}:{parsed.port or 5672}/{quote(self.vhost, safe='')}"


@pytest.fixture
async def imported() -> AsyncIterator[Imported]:
    parsed = urlsplit(AMQP_URL)
    api = f"http://{parsed.hostname}:15672/api"
    login = aiohttp.encode_basic_auth(parsed.username or "guest", parsed.password or "guest")
    async with aiohttp.ClientSession(
        headers={"Authorization": login}, timeout=aiohttp.ClientTimeout(total=15)
    ) as http:
        try:
            async with http.get(f"{api}/overview") as response:
                reachable = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            reachable = False
        if not reachable:
            pytest.skip(
                f"RabbitMQ management API unreachable at {api} "
                "(enable it: rabbitmq-plugins enable rabbitmq_management)"
            )
        seed = uuid.uuid4().hex[:10]
        vhost = f"autopause-test-{seed}"
        made = Imported(vhost, {})
        try:
            await _put(http, f"{api}/vhosts/{quote(vhost, safe='')}", {})
            for user in definitions()["users"]:
                if "administrator" in user["tags"]:
                    continue  # an administrator would reach every vhost of the shared broker
                made.users[user["name"]] = f"{user['name']}-{seed}"
                await _put(
                    http,
                    f"{api}/users/{made.users[user['name']]}",
                    {
                        "password_hash": user["password_hash"],
                        "hashing_algorithm": user["hashing_algorithm"],
                        "tags": ",".join(user["tags"]),
                    },
                )
            target = f"{quote(vhost, safe='')}"
            for grant in definitions()["permissions"]:
                if grant["user"] in made.users:
                    assert grant["vhost"] == "/"
                    await _put(
                        http,
                        f"{api}/permissions/{target}/{made.users[grant['user']]}",
                        {kind: grant[kind] for kind in ("configure", "write", "read")},
                    )
            for grant in definitions().get("topic_permissions", []):
                if grant["user"] in made.users:
                    await _put(
                        http,
                        f"{api}/topic-permissions/{target}/{made.users[grant['user']]}",
                        {kind: grant[kind] for kind in ("exchange", "write", "read")},
                    )
            yield made
        finally:
            async with http.delete(f"{api}/vhosts/{quote(vhost, safe='')}"):
                pass
            for name in made.users.values():
                async with http.delete(f"{api}/users/{name}"):
                    pass


async def _put(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with http.put(url, json=body) as response:
        assert response.status in (201, 204), f"PUT {url}: {response.status} {await response.text()}"


def _topology_settings(imported: Imported) -> Settings:
    return load_settings(amqp_url=imported.url("autopause"), topology_prefix="")


async def _refused(
    connection: aio_pika.abc.AbstractConnection,
    action: Callable[[AbstractChannel], Awaitable[Any]],
    resource: str,
) -> None:
    """``action`` closes its channel with ACCESS_REFUSED, and the refusal names ``resource``."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refusal:
        await action(channel)
    assert resource in str(refusal.value)


async def _ignore(_: AbstractIncomingMessage) -> None:
    return None


async def test_the_producer_publishes_events_and_nothing_else(imported: Imported) -> None:
    service = await aio_pika.connect(imported.url("autopause"))
    producer = await aio_pika.connect(imported.url("producer"))
    async with service, producer:
        await declare_topology(await service.channel(), _topology_settings(imported))
        names = Names("")

        channel = await producer.channel(publisher_confirms=True)
        events = await channel.get_exchange(names.events_exchange, ensure=False)
        body = orjson.dumps(event("activity", "sbx-compose-0001"))
        confirmed = await events.publish(message(body), routing_key="sandbox.activity")
        assert isinstance(confirmed, Basic.Ack)
        queue = await (await service.channel()).get_queue(names.events_queue)
        delivered = await wait_for(
            lambda: queue.get(no_ack=True, fail=False), timeout=10, what="the event in its queue"
        )
        assert delivered.body == body

        def publish_to(exchange: str, key: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
            async def act(ch: AbstractChannel) -> Any:
                target = await ch.get_exchange(exchange, ensure=False) if exchange else ch.default_exchange
                return await target.publish(message(body), routing_key=key)

            return act

        async def consume(ch: AbstractChannel) -> Any:
            events_queue = await ch.get_queue(names.events_queue, ensure=False)
            return await events_queue.consume(_ignore)

        async def fetch(ch: AbstractChannel) -> Any:
            events_queue = await ch.get_queue(names.events_queue, ensure=False)
            return await events_queue.get(fail=False)

        refusals: list[tuple[Callable[[AbstractChannel], Awaitable[Any]], str]] = [
            (publish_to(names.commands_exchange, PAUSE_ROUTING_KEY), "exchange 'autopause.commands'"),
            (publish_to(names.lifecycle_exchange, "sandbox.paused"), "exchange 'sandbox.lifecycle'"),
            (publish_to(names.dead_letter_exchange, "events"), "exchange 'autopause.dlx'"),
            # an event type the producer does not own, on the right exchange
            (publish_to(names.events_exchange, PAUSE_ROUTING_KEY), "topic 'sandbox.pause'"),
            # straight into the queue through the default exchange
            (publish_to("", names.events_queue), "exchange 'amq.default'"),
            (
                lambda ch: ch.declare_exchange(names.events_exchange, aio_pika.ExchangeType.TOPIC),
                "exchange 'sandbox.events'",
            ),
            (lambda ch: ch.declare_queue("producer.inbox", durable=True), "queue 'producer.inbox'"),
            (lambda ch: ch.declare_queue(exclusive=True), "queue 'amq.gen-"),
            (consume, "queue 'autopause.events'"),
            (fetch, "queue 'autopause.events'"),
        ]
        for action, resource in refusals:
            await _refused(producer, action, resource)


async def test_the_service_user_stays_inside_its_names(imported: Imported) -> None:
    service = await aio_pika.connect(imported.url("autopause"))
    async with service:
        await _refused(service, lambda ch: ch.declare_queue("other.queue"), "queue 'other.queue'")
        await _refused(service, lambda ch: ch.declare_queue(exclusive=True), "queue 'amq.gen-")
        await _refused(
            service,
            lambda ch: ch.declare_exchange("other.exchange", aio_pika.ExchangeType.TOPIC),
            "exchange 'other.exchange'",
        )
        await _refused(
            service,
            lambda ch: ch.default_exchange.publish(message(b"{}"), routing_key="autopause.pause"),
            "exchange 'amq.default'",
        )


async def test_the_service_user_runs_every_role(imported: Imported, settings: Settings) -> None:
    """declare_topology, then ingest, a tick and a worker, all as the service user."""
    async with Emulator(api_key="e2b_emulator") as emulator:
        service_settings = settings.model_copy(
            update={
                "amqp_url": SecretStr(imported.url("autopause")),
                "topology_prefix": "",
                "e2b_api_url": emulator.url,
                "e2b_api_key": SecretStr("e2b_emulator"),
                "retry_base_delay": 0.01,
                "retry_max_delay": 0.05,
                "e2b_request_timeout": 5.0,
                "claim_max_share": 1.0,
            }
        )
        service = await aio_pika.connect(imported.url("autopause"))
        producer = await aio_pika.connect(imported.url("producer"))
        async with service, producer:
            channel = await service.channel()
            await declare_topology(channel, service_settings)
            await declare_topology(channel, service_settings)  # every replica, every start

            sandbox = f"sbx-{uuid.uuid4().hex[:12]}"
            emulator.add_sandbox(sandbox)
            sending = await producer.channel(publisher_confirms=True)
            events = await sending.get_exchange(Names("").events_exchange, ensure=False)
            created = event("created", sandbox, at=ago(3600))
            await events.publish(message(orjson.dumps(created)), routing_key="sandbox.created")
            await events.publish(message(b"not json"), routing_key="sandbox.activity")

            assert await runner.run(service_settings, {"ingest"}, burst=True) == 0
            assert await runner.run(service_settings, {"scheduler"}, once=True) == 0
            assert await runner.run(service_settings, {"worker"}, burst=True) == 0

            assert emulator.state_of(sandbox) == "paused"
            dlq = await channel.get_queue(Names("").events_dlq)
            rejected = await wait_for(
                lambda: dlq.get(no_ack=True, fail=False), timeout=10, what="the dead-lettered event"
            )
            assert rejected.body == b"not json"
