"""The ``autopause`` command line (twin: ``python -m consumer``): it parses and prints, nothing more.

The service's commands are here, the operator's in :mod:`consumer.cli_operator`;
what they do is in :mod:`consumer.runner` (the roles), :mod:`consumer.operations`
and :mod:`consumer.dead_letters`. Every flag has an environment twin, shown in
``--help``; flags win over the environment. Errors are one line on stderr and a
non-zero exit code: 2 for a setting or argument that cannot work, 1 for a
service that is not there.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

# typer vendors click (typer >= 0.29): these are the errors of a refused command line.
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from consumer import cli_operator
from consumer.cli_options import env_option, opt, run_async, settings_or_exit, show_json
from consumer.errors import AutopauseError

app = typer.Typer(
    help="autopause: pauses idle E2B sandboxes, never one in use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
    startup_patience: Annotated[float | None, opt("startup_patience")] = None,
) -> None:
    """Run a role (ingest, scheduler, worker) or all of them in one process.

    A worker checks its E2B key with one read at start: a refused key exits 2,
    an E2B API it cannot reach within the start-up patience exits 1.
    """
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
        startup_patience=startup_patience,
    )
    from consumer import runner

    roles = set(runner.ROLES) if role is Role.ALL else {role.value}
    code = run_async(runner.run(settings, roles, burst=burst, once=once))
    raise typer.Exit(code)


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Apply pending database migrations (safe to run from several replicas at once)."""
    settings = settings_or_exit(ctx)
    from consumer import operations

    applied = run_async(operations.migrate(settings))
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
        show_json(vars(outcome))
        raise typer.Exit(1 if outcome.error else 0)
    run_async(reconcile_forever(settings))


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


app.command()(cli_operator.status)
app.add_typer(cli_operator.sessions_app, name="sessions")
app.add_typer(cli_operator.dlq_app, name="dlq")


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
    from consumer import operations

    published = run_async(
        operations.generate(
            settings, users=users, duration=duration, idle_share=idle_share, idle_timeout=idle_timeout
        )
    )
    typer.echo(f"published {published} events")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: a refused command line is one line on stderr and exit 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="autopause", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "autopause"
        text = " ".join(exc.format_message().replace("Value error, ", "").split())
        print(f"{where}: {text} (see {where} --help)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("autopause: aborted", file=sys.stderr)
        sys.exit(1)
    except AutopauseError as exc:  # pragma: no cover - commands catch their own
        print(f"autopause: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
