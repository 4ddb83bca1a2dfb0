"""The container deployment, read without a Docker engine.

The compose files are parsed as YAML; every variable in them is either a
setting with a default or a secret that compose refuses to start without.
Every command a service gives the image is put to the real CLI, every
environment to the real settings; each service signs in as its own user with
the password that the rendered RabbitMQ definitions hash, and every file it
mounts exists. What the users may do on a real broker is tested in
integration/test_rabbitmq_users.py; ``docker compose config`` runs in the
``docker`` test, deselected unless ``-m docker`` asks for it (it needs an engine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from consumer.runner import check_e2b
from consumer.settings import load_settings

from ..helpers.compose import (
    ANY_VARIABLE,
    COMPOSE_FILE,
    E2B_FILE,
    VARIABLE,
    compose_file,
    compose_text,
    e2b_file,
    e2b_text,
    environment,
    required_variables,
    services,
    with_values,
)
from ..helpers.config import ROOT
from ..helpers.management import password_matches
from ..helpers.processes import autopause, clean_env, run_sync

DOCKERFILE = ROOT / "Dockerfile"
DEFINITIONS_FILE = ROOT / "deploy" / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
ENV_EXAMPLE = ROOT / ".env.example"

AUTOPAUSE_SERVICES = {
    "rabbitmq-definitions",
    "migrate",
    "ingest",
    "scheduler",
    "worker",
    "e2b-emulator",
    "generator",
    "operator",
}
SERVICES = AUTOPAUSE_SERVICES | {
    "rabbitmq",
    "postgres",
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
SECRETS = {
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
PUBLISHED_PORT = re.compile(r"\$\{(?P<bind>\w+):-(?P<address>[^}]*)\}:(?P<host>\d+):(?P<container>\d+)")


@cache
def secret_values() -> dict[str, str]:
    """A value for every secret, as .env gives them (hex, like the documented generator)."""
    return {name: secrets.token_hex(24) for name in SECRETS}


def autopause_services() -> list[str]:
    """The services that run the autopause image."""
    return sorted(name for name, spec in services().items() if "build" in spec)


def cli_services() -> list[str]:
    """The services that run the autopause CLI (the image's entrypoint)."""
    return [name for name in autopause_services() if "entrypoint" not in services()[name]]


def env_of(service: str, shell: dict[str, str] | None = None, *, e2b: bool = False) -> dict[str, str]:
    """A service's environment with the secrets and ``shell`` as compose's environment;
    with ``e2b``, docker-compose.e2b.yml's environment of the service on top."""
    shell = secret_values() | (shell or {})
    env = environment(services()[service], shell)
    if e2b:
        env |= environment(e2b_file()["services"].get(service, {}), shell)
    return env


def holders(variable: str) -> set[str]:
    """The services whose definition reads ``variable``."""
    return {name for name, spec in services().items() if "${" + variable + ":" in json.dumps(spec)}


def mounts(service: str) -> dict[str, tuple[str, list[str]]]:
    found = {}
    for volume in services()[service].get("volumes", []):
        source, target, *mode = volume.split(":")
        found[target] = (source, mode)
    return found


def published() -> list[re.Match[str]]:
    """Every published port of every service (in any profile), as written."""
    ports = []
    for spec in services().values():
        for port in spec.get("ports", []):
            match = PUBLISHED_PORT.fullmatch(str(port))
            assert match, f"a published port that names no bind address: {port}"
            ports.append(match)
    return ports


# -- the files and their variables ---------------------------------------------------------


def test_the_files_use_only_defaulted_settings_and_required_secrets() -> None:
    for text in (compose_text(), e2b_text()):
        without = VARIABLE.sub("", text.replace("$$", ""))
        assert not ANY_VARIABLE.search(without), "a variable of another form: the tests read only two"


def test_compose_file_has_every_service() -> None:
    assert set(services()) == SERVICES
    assert set(autopause_services()) == AUTOPAUSE_SERVICES
    assert {name: spec["profiles"] for name, spec in services().items() if "profiles" in spec} == PROFILES
    assert set(e2b_file()["services"]) <= SERVICES


# -- secrets ----------------------------------------------------------------------------------


def test_every_secret_is_required_and_says_where_to_set_it() -> None:
    required = required_variables(compose_text())
    assert set(required) == SECRETS
    for name, message in required.items():
        assert message == f"set {name} in .env (see .env.example)", name
    for service in SERVICES:
        spec = services()[service]
        for name in SECRETS & {m["name"] for m in VARIABLE.finditer(json.dumps(spec))}:
            with pytest.raises(LookupError, match=name):
                with_values(spec, {k: v for k, v in secret_values().items() if k != name})


def test_no_secret_has_a_default_in_the_compose_file() -> None:
    text = compose_text()
    for match in VARIABLE.finditer(text):
        if re.search("PASSWORD|COOKIE|KEY", match["name"]):
            assert match["form"] == ":?", f"{match['name']} must be required, not defaulted"
    assert "guest:guest" not in text
    for user in ("admin", "autopause", "producer"):
        assert f"{user}:{user}@" not in text


def test_env_example_lists_every_secret_and_generates_strong_values(tmp_path: Path) -> None:
    listed = re.findall(r"^([A-Z][A-Z0-9_]*)=$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert set(listed) == SECRETS
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
    assert set(generated) == SECRETS
    assert len(set(generated.values())) == len(generated)
    for name, value in generated.items():
        assert re.fullmatch(r"[0-9a-f]{64}", value), name
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0, ".env must be readable by its owner only"


def test_the_database_password_reaches_only_the_services_that_use_the_database() -> None:
    assert holders("AUTOPAUSE_DB_PASSWORD") == DATABASE_USERS | {"postgres"}
    assert holders("POSTGRES_PASSWORD") == {"postgres"}, "only Postgres knows its superuser's password"


def test_each_amqp_password_reaches_only_its_own_service() -> None:
    for user in ("ingest", "scheduler", "worker", "producer", "operator", "admin"):
        expected = {name for name, amqp in AMQP_USERS.items() if amqp == user} | {"rabbitmq-definitions"}
        assert holders(f"RABBITMQ_{user.upper()}_PASSWORD") == expected, user


# -- ports ----------------------------------------------------------------------------------------


def test_published_ports_listen_on_loopback_unless_told_otherwise() -> None:
    ports = {f"{m['host']}->{m['container']}": (m["bind"], m["address"]) for m in published()}
    assert set(ports) == {
        "5672->5672",
        "15672->15672",
        "9464->9464",
        "3000->3000",
        "9090->9090",
        "9093->9093",
        "3001->3000",
    }
    assert {address for _, address in ports.values()} == {"127.0.0.1"}
    assert ports.pop("5672->5672")[0] == "AMQP_BIND_ADDRESS"
    assert {bind for bind, _ in ports.values()} == {"ADMIN_BIND_ADDRESS"}, (
        "only AMQP follows AMQP_BIND_ADDRESS"
    )


def test_host_ports_do_not_clash() -> None:
    hosts = [m["host"] for m in published()]
    assert len(hosts) == len(set(hosts)), hosts


# -- RabbitMQ ---------------------------------------------------------------------------------


def test_every_mounted_file_exists_and_every_volume_is_declared() -> None:
    volumes = set(compose_file()["volumes"])
    for name in services():
        for source, _mode in mounts(name).values():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in volumes, f"{name} uses an undeclared volume {source}"


def test_rabbitmq_loads_the_rendered_definitions_and_its_plugins() -> None:
    rabbit = services()["rabbitmq"]
    assert rabbit["image"] == "rabbitmq:3.13-management"
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert rabbit["depends_on"]["rabbitmq-definitions"]["condition"] == "service_completed_successfully"
    found = mounts("rabbitmq")
    assert found["/etc/rabbitmq/rabbitmq.conf"] == ("./deploy/rabbitmq/rabbitmq.conf", ["ro"])
    assert found["/etc/rabbitmq/enabled_plugins"] == ("./deploy/rabbitmq/enabled_plugins", ["ro"])
    assert found["/etc/rabbitmq/autopause"] == ("rabbitmq-definitions", ["ro"])
    output = services()["rabbitmq-definitions"]["command"][1]
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
    writer = services()["rabbitmq-definitions"]
    assert writer["entrypoint"] == ["python", "-m", "consumer.rabbitmq_definitions"]
    assert writer["restart"] == "no"
    template_target = writer["command"][0]
    assert mounts("rabbitmq-definitions")[template_target] == ("./deploy/rabbitmq/definitions.json", ["ro"])
    output = tmp_path / "out" / "definitions.json"
    env = clean_env(PYTHONPATH=str(ROOT), **env_of("rabbitmq-definitions"))
    command = [sys.executable, *writer["entrypoint"][1:], str(DEFINITIONS_FILE), str(output)]
    done = run_sync(command, env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert output.stat().st_mode & 0o777 == 0o644
    rendered = json.loads(output.read_text())
    hashes = {user["name"]: user["password_hash"] for user in rendered["users"]}
    for service, user in AMQP_USERS.items():
        amqp = urlsplit(env_of(service)["AUTOPAUSE_AMQP_URL"])
        assert (amqp.hostname, amqp.username) == ("rabbitmq", user), service
        assert amqp.password is not None
        assert password_matches(hashes[user], amqp.password), service
    # one variable missing: refused, by name, and nothing written
    del env["RABBITMQ_WORKER_PASSWORD"]
    output.unlink()
    done = run_sync(command, env, timeout=60)
    assert done.returncode == 2
    assert "RABBITMQ_WORKER_PASSWORD" in done.stderr
    assert not output.exists()


def test_the_cluster_nodes_share_the_cookie_and_find_each_other() -> None:
    nodes = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")
    assert {env_of(node)["RABBITMQ_ERLANG_COOKIE"] for node in nodes} == {
        secret_values()["RABBITMQ_ERLANG_COOKIE"]
    }
    cluster_conf = (ROOT / "deploy/rabbitmq/cluster.conf").read_text()
    listed = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@(\S+)$", cluster_conf, re.M)
    assert listed == [services()[node]["hostname"] for node in nodes]
    for node in nodes[1:]:
        assert mounts(node)["/etc/rabbitmq/conf.d/20-cluster.conf"] == (
            "./deploy/rabbitmq/cluster.conf",
            ["ro"],
        )
        assert (
            mounts(node)["/etc/rabbitmq/rabbitmq.conf"] == mounts("rabbitmq")["/etc/rabbitmq/rabbitmq.conf"]
        )
        assert "ports" not in services()[node]
    grow = services()["rabbitmq-replicas"]["command"][0]
    assert "grow rabbit@rabbitmq-2 all" in grow and "grow rabbit@rabbitmq-3 all" in grow


# -- PostgreSQL -------------------------------------------------------------------------------


def test_postgres_makes_the_application_role_and_keeps_its_data_in_a_named_volume() -> None:
    postgres = services()["postgres"]
    assert postgres["image"] == "postgres:16"
    assert postgres["healthcheck"]["test"][:4] == ["CMD", "pg_isready", "-h", "127.0.0.1"]
    found = mounts("postgres")
    assert found["/var/lib/postgresql/data"][0] in compose_file()["volumes"]
    script = "/docker-entrypoint-initdb.d/10-autopause-role.sh"
    assert found[script] == ("./deploy/postgres/10-autopause-role.sh", ["ro"])
    assert os.access(ROOT / "deploy/postgres/10-autopause-role.sh", os.X_OK)
    env = env_of("postgres")
    assert env["AUTOPAUSE_DB_PASSWORD"] == secret_values()["AUTOPAUSE_DB_PASSWORD"]
    for service in DATABASE_USERS:
        database = urlsplit(env_of(service)["AUTOPAUSE_DATABASE_URL"])
        assert (database.hostname, database.username, database.path) == (
            "postgres",
            "autopause",
            "/autopause",
        )
        assert database.username != env["POSTGRES_USER"], "autopause never signs in as the superuser"
        assert database.password == env["AUTOPAUSE_DB_PASSWORD"]
        assert env_of(service)["AUTOPAUSE_DATABASE_SCHEMA"] == "autopause"


# -- the roles --------------------------------------------------------------------------------


def test_roles_restart_wait_for_their_dependencies_and_are_probed() -> None:
    for name in autopause_services():
        expected = "no" if name in ("migrate", "operator", "rabbitmq-definitions") else "unless-stopped"
        assert services()[name]["restart"] == expected, name
    assert services()["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for role in ROLES:
        spec = services()[role]
        assert spec["command"] == ["run", role]
        assert spec["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert spec["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        probe = " ".join(spec["healthcheck"]["test"])
        assert "http://127.0.0.1:9464/healthz" in probe
        assert "urllib" in probe
        assert spec["environment"]["AUTOPAUSE_METRICS_PORT"] == "9464"
    assert services()["ingest"]["deploy"]["replicas"] == 2
    assert with_values(services()["worker"]["deploy"]["replicas"], {}) == "1"
    for scaled in ("ingest", "worker"):
        assert "ports" not in services()[scaled], f"{scaled} replicas would clash on a host port"


def test_no_role_declares_the_topology() -> None:
    for service in (*ROLES, "operator"):
        assert env_of(service)["AUTOPAUSE_DECLARE_TOPOLOGY"] == "false", service


def test_the_generator_is_a_demo_producer() -> None:
    generator = services()["generator"]
    assert generator["command"][:3] == ["generate", "--users", "50"]
    assert urlsplit(env_of("generator")["AUTOPAUSE_AMQP_URL"]).username == "producer"
    assert "AUTOPAUSE_DATABASE_URL" not in generator["environment"]
    assert generator["depends_on"]["ingest"]["condition"] == "service_healthy"


def test_the_emulator_gets_no_credentials() -> None:
    env = env_of("e2b-emulator")
    assert not {"AUTOPAUSE_DATABASE_URL", "AUTOPAUSE_AMQP_URL", "AUTOPAUSE_E2B_API_KEY"} & set(env)


@pytest.mark.parametrize("service", cli_services())
def test_the_cli_accepts_each_service_command(service: str) -> None:
    # click parses every argument before it acts on --help: a wrong one exits 2
    command = services()[service]["command"]
    done = run_sync(autopause(*command, "--help"), clean_env(PYTHONPATH=str(ROOT)), timeout=60)
    assert done.returncode == 0, f"`autopause {shlex.join(command)}` was refused:\n{done.stderr}"
    assert f"Usage: autopause {command[0]}" in done.stdout, done.stdout


@pytest.mark.parametrize("service", cli_services())
def test_each_service_environment_is_valid_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("AUTOPAUSE_", "E2B_")):
            monkeypatch.delenv(key)
    for key, value in env_of(service).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.log_format == "json"
    assert settings.metrics_port == 9464
    if service == "worker":
        check_e2b(settings, {"worker"})  # the demo defaults must satisfy the worker's own check


# -- E2B: the emulator by default, E2B itself only with docker-compose.e2b.yml ---------------------


@pytest.mark.parametrize(
    "shell",
    [
        {},
        {"E2B_API_KEY": REAL_KEY},
        {"E2B_API_URL": E2B_URL},
        {"E2B_API_KEY": REAL_KEY, "E2B_API_URL": E2B_URL},
    ],
)
def test_without_the_e2b_file_the_worker_pauses_through_the_emulator_with_its_key(
    shell: dict[str, str],
) -> None:
    env = env_of("worker", shell)
    assert (env["AUTOPAUSE_E2B_API_KEY"], env["AUTOPAUSE_E2B_API_URL"]) == (EMULATOR_KEY, EMULATOR_URL)
    assert REAL_KEY not in json.dumps(with_values(services(), secret_values() | shell))


def test_the_compose_file_never_reads_the_e2b_variables() -> None:
    # a real key in .env must not reach any service unless docker-compose.e2b.yml is chosen
    assert not re.search(r"\$\{?E2B_API_(KEY|URL)\b", compose_text())


@pytest.mark.parametrize(("url", "expected"), [(None, E2B_URL), ("https://api.eu.e2b.example", None)])
def test_the_e2b_file_sends_the_real_key_to_e2b_and_leaves_the_emulator_out(
    url: str | None, expected: str | None
) -> None:
    shell = {"E2B_API_KEY": REAL_KEY} | ({"E2B_API_URL": url} if url else {})
    env = env_of("worker", shell, e2b=True)
    assert env["AUTOPAUSE_E2B_API_KEY"] == REAL_KEY
    assert env["AUTOPAUSE_E2B_API_URL"] == (expected or url)
    assert urlsplit(env["AUTOPAUSE_E2B_API_URL"]).hostname != "e2b-emulator"
    overlay = e2b_file()["services"]
    assert overlay["e2b-emulator"].get("profiles"), "the emulator must not start beside a real key"
    assert "environment" not in overlay["e2b-emulator"]


def test_the_e2b_file_refuses_to_start_without_a_key() -> None:
    assert required_variables(e2b_text()) == {
        "E2B_API_KEY": "set E2B_API_KEY in .env to your E2B key (docs/deploy.md)"
    }
    for shell in ({}, {"E2B_API_KEY": ""}, {"E2B_API_URL": E2B_URL}):
        with pytest.raises(LookupError, match="E2B_API_KEY"):
            env_of("worker", shell, e2b=True)


@pytest.mark.parametrize("e2b", [False, True])
def test_the_worker_environment_passes_the_worker_check(e2b: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("AUTOPAUSE_", "E2B_")):
            monkeypatch.delenv(key)
    for key, value in env_of("worker", {"E2B_API_KEY": REAL_KEY}, e2b=e2b).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    check_e2b(settings, {"worker"})
    assert settings.e2b_key == (REAL_KEY if e2b else EMULATOR_KEY)
    assert not settings.emulator and not settings.dry_run


def test_only_the_worker_gets_the_e2b_key_and_dry_run_reaches_it() -> None:
    overlay = e2b_file()["services"]
    readers = {name for name, spec in overlay.items() if "${E2B_API_KEY:" in json.dumps(spec)}
    assert readers == {"worker"}
    keyed = {
        name for name, spec in services().items() if "AUTOPAUSE_E2B_API_KEY" in spec.get("environment", {})
    }
    assert keyed == {"worker"}
    assert (
        env_of("worker", {"E2B_API_KEY": REAL_KEY, "AUTOPAUSE_DRY_RUN": "true"}, e2b=True)[
            "AUTOPAUSE_DRY_RUN"
        ]
        == "true"
    )


def test_one_variable_sets_the_worker_replicas_and_their_rate_share() -> None:
    worker = with_values(services()["worker"], secret_values() | {"AUTOPAUSE_WORKER_REPLICAS": "3"})
    assert worker["deploy"]["replicas"] == "3"
    assert worker["environment"]["AUTOPAUSE_WORKER_REPLICAS"] == "3"


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
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *pyproject["project"].get("license-files", []),
    }
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


# -- with a Docker engine -------------------------------------------------------------------------


@pytest.mark.docker
def test_docker_compose_reads_the_files_as_these_tests_do() -> None:
    """``docker compose config``: the files resolve with the secrets, and each missing one is refused."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.fail("the docker test needs the docker CLI with its compose plugin")
    files = ["-f", str(COMPOSE_FILE), "-f", str(E2B_FILE)]
    shell = clean_env(**secret_values(), E2B_API_KEY=REAL_KEY)
    done = run_sync([docker, "compose", *files, "--profile", "*", "config", "--format", "json"], shell)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["services"]
    for name, spec in resolved.items():
        expected = env_of(name, {"E2B_API_KEY": REAL_KEY}, e2b=True)
        assert {k: v for k, v in (spec.get("environment") or {}).items() if k in expected} == expected, name
    for name in sorted(SECRETS):
        missing = {k: v for k, v in shell.items() if k != name}
        refused = run_sync([docker, "compose", *files, "config", "--quiet"], missing)
        assert refused.returncode != 0 and name in refused.stderr, name


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


def test_compose_reports_the_caps_the_broker_policies_set() -> None:
    definitions = json.loads(DEFINITIONS_FILE.read_text())
    caps = {p["name"]: p["definition"]["max-length"] for p in definitions["policies"]}
    env = compose_file()["x-role-env"]
    assert int(env["AUTOPAUSE_EVENTS_QUEUE_MAX_LENGTH"]) == caps["autopause-events-limit"]
    assert int(env["AUTOPAUSE_DEAD_LETTER_MAX_LENGTH"]) == caps["autopause-dead-letters-limit"]
