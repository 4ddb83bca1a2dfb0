"""The ``autopause`` command line (twin: ``python -m consumer``).

Every flag has an environment twin, shown in ``--help``; flags win over the
environment. Errors are one line on stderr and a non-zero exit code: 2 for a
setting or argument that cannot work, 1 for a service that is not there.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer

from consumer.errors import AutopauseError, ConfigError
from consumer.settings import ENV_PREFIX, Settings, env_name, load_settings

T = TypeVar("T")

app = typer.Typer(
    help="autopause: pauses idle E2B sandboxes, never one in use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def opt(field: str, help_text: str | None = None, **extra: Any) -> Any:
    """A typer option bound to a setting: its environment twin and its help come from Settings."""
    info = Settings.model_fields[field]
    return typer.Option(
        envvar=env_name(field),
        show_envvar=True,
        help=help_text or info.description,
        show_default=False,
        **extra,
    )


def env_option(name: str, help_text: str, *decls: str, **extra: Any) -> Any:
    """An option outside Settings, still with its AUTOPAUSE_ environment twin."""
    return typer.Option(*decls, envvar=ENV_PREFIX + name, show_envvar=True, help=help_text, **extra)


def settings_from(ctx: typer.Context, **overrides: Any) -> Settings:
    """Settings from the environment, the global options and this command's options."""
    merged = dict(ctx.obj or {})
    merged.update(overrides)
    return load_settings(**merged)


def run_async(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; an autopause error becomes one line and an exit code."""
    try:
        return asyncio.run(work)
    except ConfigError as exc:
        typer.echo(f"autopause: {exc}", err=True)
        raise typer.Exit(2) from None
    except AutopauseError as exc:
        typer.echo(f"autopause: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def settings_or_exit(ctx: typer.Context, **overrides: Any) -> Settings:
    try:
        settings = settings_from(ctx, **overrides)
    except ConfigError as exc:
        typer.echo(f"autopause: {exc}", err=True)
        raise typer.Exit(2) from None
    from consumer import logs

    logs.configure(settings)
    return settings


@app.callback()
def global_options(
    ctx: typer.Context,
    amqp_url: Annotated[str | None, opt("amqp_url")] = None,
    database_url: Annotated[str | None, opt("database_url")] = None,
    database_schema: Annotated[str | None, opt("database_schema")] = None,
    topology_prefix: Annotated[str | None, opt("topology_prefix")] = None,
    log_format: Annotated[str | None, opt("log_format")] = None,
    log_level: Annotated[str | None, opt("log_level")] = None,
) -> None:
    """autopause: pauses idle E2B sandboxes, never one in use.

    Start with `autopause demo` (no E2B account needed), or run the service
    with `autopause run` against your RabbitMQ and PostgreSQL.
    """
    ctx.obj = {
        "amqp_url": amqp_url,
        "database_url": database_url,
        "database_schema": database_schema,
        "topology_prefix": topology_prefix,
        "log_format": log_format,
        "log_level": log_level,
    }


class Role(StrEnum):
    ALL = "all"
    INGEST = "ingest"
    SCHEDULER = "scheduler"
    WORKER = "worker"


@app.command()
def run(
    ctx: typer.Context,
    role: Annotated[Role, typer.Argument(help="which role this process plays")] = Role.ALL,
    burst: Annotated[
        bool, typer.Option("--burst", help="ingest/worker: drain the queue, then exit 0")
    ] = False,
    once: Annotated[bool, typer.Option("--once", help="scheduler: one tick, then exit")] = False,
    emulator: Annotated[
        bool | None, opt("emulator", "worker: pause through the built-in E2B emulator")
    ] = None,
    dry_run: Annotated[bool | None, opt("dry_run")] = None,
    auto_pause_enabled: Annotated[bool | None, opt("auto_pause_enabled")] = None,
    tick_cron: Annotated[str | None, opt("tick_cron")] = None,
    default_idle_timeout: Annotated[float | None, opt("default_idle_timeout")] = None,
    batch_size: Annotated[int | None, opt("batch_size")] = None,
    flush_interval: Annotated[float | None, opt("flush_interval")] = None,
    prefetch: Annotated[int | None, opt("prefetch")] = None,
    worker_concurrency: Annotated[int | None, opt("worker_concurrency")] = None,
    worker_replicas: Annotated[int | None, opt("worker_replicas")] = None,
    e2b_rate_limit: Annotated[float | None, opt("e2b_rate_limit")] = None,
    e2b_api_url: Annotated[str | None, opt("e2b_api_url")] = None,
    pause_mode: Annotated[str | None, opt("pause_mode")] = None,
    metrics_port: Annotated[int | None, opt("metrics_port")] = None,
) -> None:
    """Run a role (ingest, scheduler, worker) or all of them in one process."""
    settings = settings_or_exit(
        ctx,
        emulator=emulator,
        dry_run=dry_run,
        auto_pause_enabled=auto_pause_enabled,
        tick_cron=tick_cron,
        default_idle_timeout=default_idle_timeout,
        batch_size=batch_size,
        flush_interval=flush_interval,
        prefetch=prefetch,
        worker_concurrency=worker_concurrency,
        worker_replicas=worker_replicas,
        e2b_rate_limit=e2b_rate_limit,
        e2b_api_url=e2b_api_url,
        pause_mode=pause_mode,
        metrics_port=metrics_port,
    )
    from consumer import runner

    roles = set(runner.ROLES) if role is Role.ALL else {role.value}
    code = run_async(runner.run(settings, roles, burst=burst, once=once))
    raise typer.Exit(code)


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Apply pending database migrations (safe to run from several replicas at once)."""
    settings = settings_or_exit(ctx)

    async def work() -> list[int]:
        from consumer.store import Store

        store = await Store.connect(settings.database_url.get_secret_value(), settings.database_schema)
        try:
            return await store.migrate()
        finally:
            await store.close()

    applied = run_async(work())
    typer.echo(f"applied migrations: {', '.join(map(str, applied))}" if applied else "database is up to date")


@app.command()
def reconcile(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="one run now, print what it did, exit")] = False,
    report_only: Annotated[
        bool, typer.Option("--dry-run", help="list and compare, print what would change, change nothing")
    ] = False,
) -> None:
    """Compare the table with E2B's own list of sandboxes and repair it (see the README).

    Without --once it runs on AUTOPAUSE_RECONCILE_CRON until stopped, as every worker does.
    """
    settings = settings_or_exit(ctx)
    from consumer.reconcile import reconcile_forever, reconcile_once

    if once or report_only:
        outcome = run_async(reconcile_once(settings, dry_run=report_only))
        typer.echo(_json(vars(outcome)))
        raise typer.Exit(1 if outcome.error else 0)
    raise typer.Exit(run_async(reconcile_forever(settings)))


@app.command()
def emulator(
    ctx: typer.Context,
    host: Annotated[str, env_option("EMULATOR_HOST", "address to bind")] = "127.0.0.1",
    port: Annotated[int, env_option("EMULATOR_PORT", "port to bind")] = 3000,
    latency: Annotated[float, env_option("EMULATOR_LATENCY", "seconds added to each answer")] = 0.0,
    error_rate: Annotated[float, env_option("EMULATOR_ERROR_RATE", "share of calls answered 5xx")] = 0.0,
    timeout_rate: Annotated[float, env_option("EMULATOR_TIMEOUT_RATE", "share of calls that hang")] = 0.0,
    rate_limit: Annotated[
        float, env_option("EMULATOR_RATE_LIMIT", "requests/s above which calls get 429 (0: off)")
    ] = 0.0,
    strict: Annotated[
        bool,
        env_option(
            "EMULATOR_STRICT",
            "unknown sandbox ids answer 404, or are created running",
            "--strict/--auto-create",
        ),
    ] = False,
) -> None:
    """Serve the E2B API emulator (for demos and tests; point AUTOPAUSE_E2B_API_URL at it)."""
    settings_or_exit(ctx)
    from e2b_emulator import Faults, serve

    faults = Faults(latency=latency, error_rate=error_rate, timeout_rate=timeout_rate, rate_limit=rate_limit)
    try:
        run_async(serve(host, port, faults, auto_create=not strict))
    except OSError as exc:
        typer.echo(f"autopause: cannot serve on {host}:{port}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except AutopauseError as exc:  # pragma: no cover - commands catch their own
        print(f"autopause: {exc}", file=sys.stderr)
        sys.exit(1)


# operator commands ---------------------------------------------------------

sessions_app = typer.Typer(help="Inspect and steer sessions.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: look at them, replay them after a fix.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")
app.add_typer(dlq_app, name="dlq")

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def _json(data: Any) -> str:
    import orjson

    return orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2).decode()


@app.command()
def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Sessions by state, queues and consumers, the last tick, recent pauses, savings."""
    settings = settings_or_exit(ctx)
    from consumer import operations, views

    report = run_async(operations.status(settings))
    typer.echo(_json(report) if as_json else views.status(report))


@sessions_app.command("list")
def sessions_list(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option(help="only this project")] = None,
    user: Annotated[str | None, typer.Option(help="only this user")] = None,
    state: Annotated[str | None, typer.Option(help="RUNNING, PAUSING, PAUSED, KILLED or EXPIRED")] = None,
    idle: Annotated[str | None, typer.Option(help="idle longer than, e.g. 15m, 2h")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="most rows shown")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List sessions, least recently active first."""
    settings = settings_or_exit(ctx)
    from consumer import operations, views
    from consumer.timing import parse_duration

    idle_for = _duration(idle, parse_duration) if idle else None
    rows = run_async(
        operations.list_sessions(
            settings,
            project=project,
            user=user,
            state=state,
            idle_longer_than=idle_for,
            limit=limit,
        )
    )
    typer.echo(_json(rows) if as_json else views.sessions(rows))


@sessions_app.command("show")
def sessions_show(
    ctx: typer.Context,
    sandbox: Annotated[str, typer.Argument(help="sandbox id")],
    as_json: JsonFlag = False,
) -> None:
    """One session and its transition history."""
    settings = settings_or_exit(ctx)
    from consumer import operations, views

    row, history = run_async(operations.show_session(settings, sandbox))
    typer.echo(_json({"session": row, "transitions": history}) if as_json else views.session(row, history))


@sessions_app.command("pause")
def sessions_pause(ctx: typer.Context, sandbox: Annotated[str, typer.Argument(help="sandbox id")]) -> None:
    """Make a RUNNING sandbox due now: the next tick claims and pauses it, through the freshness gate."""
    settings = settings_or_exit(ctx)
    from consumer import operations

    run_async(operations.pause_now(settings, sandbox))
    typer.echo(f"{sandbox} is due: the next tick claims it, once ingest vouches that it is idle")


@sessions_app.command("keep-alive")
def sessions_keep_alive(
    ctx: typer.Context,
    sandbox: Annotated[str, typer.Argument(help="sandbox id")],
    duration: Annotated[str, typer.Option("--for", help="how long, e.g. 30m, 2h, 1d")],
) -> None:
    """Never pause this sandbox before now + DURATION (a pending pause is cancelled)."""
    settings = settings_or_exit(ctx)
    from consumer import operations
    from consumer.timing import parse_duration

    state, until = run_async(operations.keep_alive(settings, sandbox, _duration(duration, parse_duration)))
    typer.echo(f"{sandbox} ({state}) will not be paused before {until:%Y-%m-%d %H:%M:%S} UTC")


def _duration(text: str, parse: Any) -> Any:
    try:
        return parse(text)
    except ConfigError as exc:
        typer.echo(f"autopause: {exc}", err=True)
        raise typer.Exit(2) from None


QueueOpt = Annotated[str, typer.Option("--queue", help="events or pause")]


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    queue: QueueOpt = "events",
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="most messages shown")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Show dead letters with their reasons; they stay in the queue."""
    settings = settings_or_exit(ctx)
    from consumer import operations, views

    letters = run_async(operations.dlq_list(settings, queue, limit))
    if as_json:
        typer.echo(
            _json([{**letter.__dict__, "body": letter.body.decode("utf-8", "replace")} for letter in letters])
        )
    else:
        typer.echo(views.dead_letters(letters))


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    queue: QueueOpt = "events",
    limit: Annotated[int, typer.Option(min=1, help="most messages replayed")] = 1_000_000,
) -> None:
    """Publish dead letters back where they came from, after the producer or the service was fixed."""
    settings = settings_or_exit(ctx)
    from consumer import operations

    count = run_async(operations.dlq_replay(settings, queue, limit))
    typer.echo(f"replayed {count} message(s) from the {queue} dead-letter queue")


@app.command()
def demo(
    ctx: typer.Context,
    duration: Annotated[float, env_option("DEMO_DURATION", "seconds of simulated traffic", min=10)] = 45,
    users: Annotated[
        int, env_option("DEMO_USERS", "simulated users, one sandbox each", min=1, max=2000)
    ] = 40,
    idle_timeout: Annotated[
        float, env_option("DEMO_IDLE_TIMEOUT", "seconds idle before a pause (short, for the demo)", min=2)
    ] = 6,
) -> None:
    """The whole pipeline on this machine with the built-in E2B emulator: no E2B account needed.

    Uses its own schema (autopause_demo) and queue names (demo.*), made anew on
    each run. Exits non-zero if an idle sandbox was not paused or a busy one was.
    """
    overrides = dict(ctx.obj or {})
    overrides["log_level"] = overrides.get("log_level") or "WARNING"
    ctx.obj = overrides
    settings = settings_or_exit(ctx)
    from consumer.demo import run_demo

    code = run_async(
        run_demo(settings, duration=duration, users=users, idle_timeout=idle_timeout, out=sys.stdout)
    )
    raise typer.Exit(code)


@app.command()
def generate(
    ctx: typer.Context,
    users: Annotated[int, env_option("GENERATE_USERS", "simulated users, one sandbox each", min=1)] = 50,
    duration: Annotated[
        float, env_option("GENERATE_DURATION", "seconds to run (0: until stopped)", min=0)
    ] = 0,
    idle_share: Annotated[
        float, env_option("GENERATE_IDLE_SHARE", "share of users who take long breaks", min=0, max=1)
    ] = 0.5,
    idle_timeout: Annotated[
        float, opt("default_idle_timeout", "the service's idle timeout, to shape the breaks")
    ] = 600,
) -> None:
    """Publish the events of simulated users to sandbox.events (needs only publish rights there)."""
    settings = settings_or_exit(ctx)
    from consumer.traffic import Plan, Traffic

    async def work() -> int:
        import signal

        from consumer import broker

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if duration:
            loop.call_later(duration, stop.set)
        connection = (await broker.Broker.connect(settings, "generator")).connection
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(
                broker.Names(settings.topology_prefix).events_exchange, ensure=False
            )
            traffic = Traffic(exchange, users, Plan(idle_timeout), idle_share=idle_share)
            await traffic.run(stop)
            return traffic.published

    published = run_async(work())
    typer.echo(f"published {published} events")
