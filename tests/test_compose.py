"""The container deployment, checked without a Docker engine.

The compose file is read as compose reads it (YAML merge keys, then variable
interpolation): every secret must come from the environment, every command it
gives the image is put to the real CLI, every environment it gives a service is
put to the real settings, each service signs in as its own user with the
password that the rendered RabbitMQ definitions hash, and every file it mounts
exists. What the users may do on a real broker is tested in test_rabbitmq_users.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from consumer.health import Health, serve
from consumer.rabbitmq_definitions import password_matches
from consumer.runner import check_e2b
from consumer.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
E2B_FILE = ROOT / "docker-compose.e2b.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEFINITIONS_FILE = ROOT / "deploy" / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
ENV_EXAMPLE = ROOT / ".env.example"

SERVICES = {
    "rabbitmq-definitions",
    "rabbitmq",
    "postgres",
    "migrate",
    "ingest",
    "scheduler",
    "worker",
    "e2b-emulator",
    "generator",
    "operator",
    "prometheus",
    "alertmanager",
    "grafana",
    "rabbitmq-2",
    "rabbitmq-3",
    "rabbitmq-replicas",
}
PROFILES = {
    "generator": ["demo"],
    "operator": ["operator"],
    "prometheus": ["monitoring"],
    "alertmanager": ["monitoring"],
    "grafana": ["monitoring"],
    "rabbitmq-2": ["cluster"],
    "rabbitmq-3": ["cluster"],
    "rabbitmq-replicas": ["cluster"],
}
ROLES = ("ingest", "scheduler", "worker")
# the AMQP user of each service that talks to RabbitMQ
AMQP_USERS = {
    "ingest": "ingest",
    "scheduler": "scheduler",
    "worker": "worker",
    "generator": "producer",
    "operator": "operator",
}
DATABASE_USERS = {"migrate", "ingest", "scheduler", "worker", "operator"}
EMULATOR_URL = "http://e2b-emulator:3000"
EMULATOR_KEY = "e2b_emulator"
E2B_URL = "https://api.e2b.app"
REAL_KEY = "e2b_0123456789abcdef"


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


@cache
def required_variables() -> list[str]:
    """The variables compose refuses to start without (``${NAME:?...}``), in order of appearance."""
    found = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", compose_text())
    return list(dict.fromkeys(found))


@cache
def secrets_env() -> dict[str, str]:
    """A value for every required variable, as .env gives them (hex, like the documented generator)."""
    return {name: os.urandom(24).hex() for name in required_variables()}


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, as far as these files need it: mappings by key."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


def compose(
    env: Mapping[str, str] | None = None, *, with_secrets: bool = True, e2b: bool = False
) -> dict[str, Any]:
    """The compose file as compose sees it with ``env`` (and, unless told, the secrets) as environment;
    with ``e2b``, docker-compose.e2b.yml on top, as ``COMPOSE_FILE`` in .env makes it."""
    shell = {**(secrets_env() if with_secrets else {}), **(env or {})}
    loaded = yaml.safe_load(compose_text())
    if e2b:
        loaded = _merge(loaded, yaml.safe_load(E2B_FILE.read_text()))
    resolved: dict[str, Any] = _resolve(loaded, shell)
    return resolved


def autopause_services() -> list[str]:
    """The services that run the autopause image."""
    return sorted(name for name, spec in compose()["services"].items() if "build" in spec)


def cli_services() -> list[str]:
    """The services that run the autopause CLI (the image's entrypoint)."""
    return [name for name in autopause_services() if "entrypoint" not in compose()["services"][name]]


def environment(service: str, env: Mapping[str, str] | None = None, *, e2b: bool = False) -> dict[str, str]:
    spec = compose(env, e2b=e2b)["services"][service]
    return {key: str(value) for key, value in spec.get("environment", {}).items()}


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
    services = compose()["services"]
    assert set(services) == SERVICES
    assert set(autopause_services()) == {
        "rabbitmq-definitions",
        "migrate",
        "ingest",
        "scheduler",
        "worker",
        "e2b-emulator",
        "generator",
        "operator",
    }
    assert {name: spec["profiles"] for name, spec in services.items() if "profiles" in spec} == PROFILES


# -- secrets ----------------------------------------------------------------------------------


def test_compose_refuses_to_start_without_each_secret() -> None:
    assert set(required_variables()) == {
        "AUTOPAUSE_DB_PASSWORD",
        "POSTGRES_PASSWORD",
        "RABBITMQ_ERLANG_COOKIE",
        "RABBITMQ_INGEST_PASSWORD",
        "RABBITMQ_SCHEDULER_PASSWORD",
        "RABBITMQ_WORKER_PASSWORD",
        "RABBITMQ_PRODUCER_PASSWORD",
        "RABBITMQ_OPERATOR_PASSWORD",
        "RABBITMQ_ADMIN_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    }
    for name in required_variables():
        shell = {key: value for key, value in secrets_env().items() if key != name}
        with pytest.raises(LookupError, match=name) as refused:
            compose(shell, with_secrets=False)
        assert ".env.example" in str(refused.value), name


def test_no_secret_has_a_default_in_the_compose_file() -> None:
    text = compose_text()
    for word in ("PASSWORD", "COOKIE"):
        for match in re.finditer(rf"\$\{{(\w*{word}\w*)(:?[-+?])", text):
            assert match.group(2) == ":?", f"{match.group(1)} must be required, not defaulted"
    assert "guest:guest" not in text
    for user in ("admin", "autopause", "producer"):
        assert f"{user}:{user}@" not in text


def test_env_example_lists_every_secret_and_generates_strong_values(tmp_path: Path) -> None:
    listed = re.findall(r"^([A-Z][A-Z0-9_]*)=$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert set(listed) == set(required_variables())
    (generator,) = [
        line.removeprefix("#").strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "openssl rand" in line and "> .env" in line
    ]
    assert generator in (ROOT / "docs" / "deploy.md").read_text(), "the documented one-liner differs"
    (tmp_path / ".env.example").write_text(ENV_EXAMPLE.read_text())
    done = subprocess.run(["bash", "-c", generator], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    generated = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    assert set(generated) == set(required_variables())
    assert len(set(generated.values())) == len(generated)
    for name, value in generated.items():
        assert re.fullmatch(r"[0-9a-f]{64}", value), name
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0, ".env must be readable by its owner only"
    compose(generated, with_secrets=False)  # nothing missing


def test_the_database_password_reaches_only_the_services_that_use_the_database() -> None:
    secret = secrets_env()["AUTOPAUSE_DB_PASSWORD"]
    superuser = secrets_env()["POSTGRES_PASSWORD"]
    for name, spec in compose()["services"].items():
        text = json.dumps(spec)
        if name in DATABASE_USERS:
            assert secret in text, name
        elif name != "postgres":
            assert secret not in text, name
        if name != "postgres":
            assert superuser not in text, f"{name} must not know the Postgres superuser's password"


def test_each_amqp_password_reaches_only_its_own_service() -> None:
    for user in ("ingest", "scheduler", "worker", "producer", "operator", "admin"):
        secret = secrets_env()[f"RABBITMQ_{user.upper()}_PASSWORD"]
        holders = {name for name, spec in compose()["services"].items() if secret in json.dumps(spec)}
        expected = {name for name, amqp in AMQP_USERS.items() if amqp == user} | {"rabbitmq-definitions"}
        assert holders == expected, user


# -- ports ----------------------------------------------------------------------------------------


def published(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """container port -> host address of every published port (services in any profile)."""
    ports = {}
    for spec in compose(env)["services"].values():
        for port in spec.get("ports", []):
            address, host_port, container = str(port).split("#")[0].strip().rsplit(":", 2)
            ports[f"{host_port}->{container}"] = address
    return ports


def test_published_ports_listen_on_loopback_unless_told_otherwise() -> None:
    assert set(published()) == {
        "5672->5672",
        "15672->15672",
        "9464->9464",
        "3000->3000",
        "9090->9090",
        "9093->9093",
        "3001->3000",
    }
    assert set(published().values()) == {"127.0.0.1"}
    widened = published({"AMQP_BIND_ADDRESS": "0.0.0.0"})
    assert widened.pop("5672->5672") == "0.0.0.0"
    assert set(widened.values()) == {"127.0.0.1"}, "only AMQP follows AMQP_BIND_ADDRESS"
    admin = published({"ADMIN_BIND_ADDRESS": "10.0.0.5"})
    assert admin.pop("5672->5672") == "127.0.0.1"
    assert set(admin.values()) == {"10.0.0.5"}


def test_host_ports_do_not_clash() -> None:
    hosts = [key.split("->")[0] for key in published()]
    assert len(hosts) == len(set(hosts)), hosts


# -- RabbitMQ ---------------------------------------------------------------------------------


def mounts(service: str) -> dict[str, tuple[str, list[str]]]:
    found = {}
    for volume in compose()["services"][service].get("volumes", []):
        source, target, *mode = volume.split(":")
        found[target] = (source, mode)
    return found


def test_every_mounted_file_exists_and_every_volume_is_declared() -> None:
    spec = compose()
    for name in spec["services"]:
        for source, _mode in mounts(name).values():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in spec["volumes"], f"{name} uses an undeclared volume {source}"


def test_rabbitmq_loads_the_rendered_definitions_and_its_plugins() -> None:
    rabbit = compose()["services"]["rabbitmq"]
    assert rabbit["image"] == "rabbitmq:3.13-management"
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert rabbit["depends_on"]["rabbitmq-definitions"]["condition"] == "service_completed_successfully"
    found = mounts("rabbitmq")
    assert found["/etc/rabbitmq/rabbitmq.conf"] == ("./deploy/rabbitmq/rabbitmq.conf", ["ro"])
    assert found["/etc/rabbitmq/enabled_plugins"] == ("./deploy/rabbitmq/enabled_plugins", ["ro"])
    assert found["/etc/rabbitmq/autopause"] == ("rabbitmq-definitions", ["ro"])
    writer = compose()["services"]["rabbitmq-definitions"]
    output = writer["command"][1]
    (volume_target,) = [
        t for t, (s, _) in mounts("rabbitmq-definitions").items() if s == "rabbitmq-definitions"
    ]
    assert output.startswith(volume_target + "/")
    # a fresh named volume takes the owner of the image's directory: the image user must own it
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    assert f"install -d -o autopause -g autopause {volume_target}" in runs
    settings = [line.split("#")[0].strip() for line in RABBITMQ_CONF.read_text().splitlines()]
    loaded = "/etc/rabbitmq/autopause/" + output.removeprefix(volume_target + "/")
    assert f"load_definitions = {loaded}" in settings
    plugins = (ROOT / "deploy/rabbitmq/enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins and "rabbitmq_management" in plugins


def test_the_definitions_writer_runs_the_package_module(tmp_path: Path) -> None:
    writer = compose()["services"]["rabbitmq-definitions"]
    assert writer["entrypoint"] == ["python", "-m", "consumer.rabbitmq_definitions"]
    assert writer["restart"] == "no"
    template_target = writer["command"][0]
    assert mounts("rabbitmq-definitions")[template_target] == ("./deploy/rabbitmq/definitions.json", ["ro"])
    output = tmp_path / "out" / "definitions.json"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), **writer["environment"]}
    command = [sys.executable, *writer["entrypoint"][1:], str(DEFINITIONS_FILE), str(output)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert output.stat().st_mode & 0o777 == 0o644
    rendered = json.loads(output.read_text())
    hashes = {user["name"]: user["password_hash"] for user in rendered["users"]}
    for service, user in AMQP_USERS.items():
        amqp = urlsplit(environment(service)["AUTOPAUSE_AMQP_URL"])
        assert (amqp.hostname, amqp.username) == ("rabbitmq", user), service
        assert amqp.password is not None
        assert password_matches(hashes[user], amqp.password), service
    # one variable missing: refused, by name, and nothing written
    del env["RABBITMQ_WORKER_PASSWORD"]
    output.unlink()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "RABBITMQ_WORKER_PASSWORD" in done.stderr
    assert not output.exists()


def test_the_cluster_nodes_share_the_cookie_and_find_each_other() -> None:
    services = compose()["services"]
    nodes = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
    cookies = {services[node]["environment"]["RABBITMQ_ERLANG_COOKIE"] for node in nodes}
    assert cookies == {secrets_env()["RABBITMQ_ERLANG_COOKIE"]}
    cluster_conf = (ROOT / "deploy/rabbitmq/cluster.conf").read_text()
    listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@(\S+)$", cluster_conf, re.M)
    assert listed == [services[node]["hostname"] for node in nodes]
    for node in nodes[1:]:
        assert mounts(node)["/etc/rabbitmq/conf.d/20-cluster.conf"] == (
            "./deploy/rabbitmq/cluster.conf",
            ["ro"],
        )
        assert (
            mounts(node)["/etc/rabbitmq/rabbitmq.conf"] == mounts("rabbitmq")["/etc/rabbitmq/rabbitmq.conf"]
        )
        assert "ports" not in services[node]
    grow = services["rabbitmq-replicas"]["command"][0]
    assert "grow rabbit@rabbitmq-2 all" in grow and "grow rabbit@rabbitmq-3 all" in grow


# -- PostgreSQL -------------------------------------------------------------------------------


def test_postgres_makes_the_application_role_and_keeps_its_data_in_a_named_volume() -> None:
    spec = compose()
    postgres = spec["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert postgres["healthcheck"]["test"][:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"]
    found = mounts("postgres")
    assert found["/var/lib/postgresql/data"][0] in spec["volumes"]
    script = "/docker-entrypoint-initdb.d/10-autopause-role.sh"
    assert found[script] == ("./deploy/postgres/10-autopause-role.sh", ["ro"])
    assert os.access(ROOT / "deploy/postgres/10-autopause-role.sh", os.X_OK)
    env = postgres["environment"]
    assert env["AUTOPAUSE_DB_PASSWORD"] == secrets_env()["AUTOPAUSE_DB_PASSWORD"]
    for service in DATABASE_USERS:
        database = urlsplit(environment(service)["AUTOPAUSE_DATABASE_URL"])
        assert (database.hostname, database.username, database.path) == (
            "postgres",
            "autopause",
            "/autopause",
        )
        assert database.username != env["POSTGRES_USER"], "autopause never signs in as the superuser"
        assert database.password == env["AUTOPAUSE_DB_PASSWORD"]
        assert environment(service)["AUTOPAUSE_DATABASE_SCHEMA"] == "autopause"


# -- the roles --------------------------------------------------------------------------------


def test_roles_restart_wait_for_their_dependencies_and_are_probed() -> None:
    services = compose()["services"]
    for name in autopause_services():
        expected = "no" if name in ("migrate", "operator", "rabbitmq-definitions") else "unless-stopped"
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


def test_no_role_declares_the_topology() -> None:
    for service in (*ROLES, "operator"):
        assert environment(service)["AUTOPAUSE_DECLARE_TOPOLOGY"] == "false", service


def test_the_generator_is_a_demo_producer() -> None:
    generator = compose()["services"]["generator"]
    assert generator["command"][:3] == ["generate", "--users", "50"]
    assert urlsplit(generator["environment"]["AUTOPAUSE_AMQP_URL"]).username == "producer"
    assert "AUTOPAUSE_DATABASE_URL" not in generator["environment"]
    assert generator["depends_on"]["ingest"]["condition"] == "service_healthy"


def test_the_emulator_gets_no_credentials() -> None:
    env = environment("e2b-emulator")
    assert not {"AUTOPAUSE_DATABASE_URL", "AUTOPAUSE_AMQP_URL", "AUTOPAUSE_E2B_API_KEY"} & set(env)


@pytest.mark.parametrize("service", cli_services())
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


@pytest.mark.parametrize("service", cli_services())
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


SHELLS = [
    {},
    {"E2B_API_KEY": REAL_KEY},
    {"E2B_API_URL": E2B_URL},
    {"E2B_API_KEY": REAL_KEY, "E2B_API_URL": E2B_URL},
]


@pytest.mark.parametrize("shell", SHELLS)
def test_without_the_e2b_file_the_worker_pauses_through_the_emulator_with_its_key(
    shell: dict[str, str],
) -> None:
    env = environment("worker", shell)
    assert (env["AUTOPAUSE_E2B_API_KEY"], env["AUTOPAUSE_E2B_API_URL"]) == (EMULATOR_KEY, EMULATOR_URL)
    assert REAL_KEY not in json.dumps(compose(shell))


def test_the_compose_file_never_reads_the_e2b_variables() -> None:
    # a real key in .env must not reach any service unless docker-compose.e2b.yml is chosen
    assert not re.search(r"\$\{?E2B_API_(KEY|URL)\b", compose_text())


@pytest.mark.parametrize(("url", "expected"), [(None, E2B_URL), ("https://api.eu.e2b.example", None)])
def test_the_e2b_file_sends_the_real_key_to_e2b_and_leaves_the_emulator_out(
    url: str | None, expected: str | None
) -> None:
    shell = {"E2B_API_KEY": REAL_KEY} | ({"E2B_API_URL": url} if url else {})
    env = environment("worker", shell, e2b=True)
    assert env["AUTOPAUSE_E2B_API_KEY"] == REAL_KEY
    assert env["AUTOPAUSE_E2B_API_URL"] == (expected or url)
    assert urlsplit(env["AUTOPAUSE_E2B_API_URL"]).hostname != "e2b-emulator"
    services = compose(shell, e2b=True)["services"]
    assert services["e2b-emulator"].get("profiles"), "the emulator must not start beside a real key"
    assert REAL_KEY not in json.dumps(services["e2b-emulator"])
    assert set(yaml.safe_load(E2B_FILE.read_text())["services"]) <= SERVICES


def test_the_e2b_file_refuses_to_start_without_a_key() -> None:
    for shell in ({}, {"E2B_API_KEY": ""}, {"E2B_API_URL": E2B_URL}):
        with pytest.raises(LookupError, match="E2B_API_KEY"):
            compose(shell, e2b=True)


@pytest.mark.parametrize("e2b", [False, True])
def test_the_worker_environment_passes_the_worker_check(e2b: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("AUTOPAUSE_", "E2B_")):
            monkeypatch.delenv(key)
    for key, value in environment("worker", {"E2B_API_KEY": REAL_KEY}, e2b=e2b).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    check_e2b(settings, {"worker"})
    assert settings.e2b_key == (REAL_KEY if e2b else EMULATOR_KEY)
    assert not settings.emulator and not settings.dry_run


def test_only_the_worker_gets_the_e2b_key_and_dry_run_reaches_it() -> None:
    shell = {"E2B_API_KEY": REAL_KEY, "AUTOPAUSE_DRY_RUN": "true"}
    holders = [
        name
        for name, spec in compose(shell, e2b=True)["services"].items()
        if REAL_KEY in json.dumps(spec) or "AUTOPAUSE_E2B_API_KEY" in spec.get("environment", {})
    ]
    assert holders == ["worker"]
    assert environment("worker", shell, e2b=True)["AUTOPAUSE_DRY_RUN"] == "true"


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
