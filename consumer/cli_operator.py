"""The operator's commands: ``status``, ``sessions ...`` and ``dlq ...``; they parse and print.

``status``, ``sessions list``, ``sessions show`` and ``dlq list`` only read:
none of them migrates the database or declares a queue. The work is in
:mod:`consumer.operations` and :mod:`consumer.dead_letters`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from consumer.cli_options import as_duration, opt, run_async, settings_or_exit, show_json
from consumer.dead_letters import DeadLetterQueue
from consumer.settings import env_name
from consumer.state import State

sessions_app = typer.Typer(help="Inspect and steer sessions.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: look at them, replay them after a fix.", no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
Sandbox = Annotated[str, typer.Argument(help="sandbox id")]


def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Sessions by state, queues and consumers, the last tick, recent pauses, savings.

    Reads only: it never migrates the database nor declares a queue (a missing one shows as missing).
    """
    settings = settings_or_exit(ctx)
    from consumer import operations, views

    report = run_async(operations.status(settings))
    if as_json:
        show_json(report)
    else:
        typer.echo(views.status(report))


@sessions_app.command("list")
def sessions_list(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option(help="only this project")] = None,
    user: Annotated[str | None, typer.Option(help="only this user")] = None,
    state: Annotated[
        State | None, typer.Option(case_sensitive=False, help="only sessions in this state")
    ] = None,
    idle: Annotated[
        timedelta | None,
        typer.Option(parser=as_duration, metavar="DURATION", help="idle longer than this, e.g. 15m, 2h"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="most rows shown")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List sessions, least recently active first (reads only)."""
    settings = settings_or_exit(ctx)
    from consumer import operations, views

    rows = run_async(
        operations.list_sessions(
            settings, project=project, user=user, state=state, idle_longer_than=idle, limit=limit
        )
    )
    if as_json:
        show_json(rows)
    else:
        typer.echo(views.sessions(rows))


@sessions_app.command("show")
def sessions_show(ctx: typer.Context, sandbox: Sandbox, as_json: JsonFlag = False) -> None:
    """One session and its transition history (reads only)."""
    settings = settings_or_exit(ctx)
    from consumer import operations, views

    row, history = run_async(operations.show_session(settings, sandbox))
    if as_json:
        show_json({"session": row, "transitions": history})
    else:
        typer.echo(views.session(row, history))


@sessions_app.command("pause")
def sessions_pause(ctx: typer.Context, sandbox: Sandbox) -> None:
    """Make a RUNNING sandbox due now: the next tick claims and pauses it, through the freshness gate."""
    settings = settings_or_exit(ctx)
    from consumer import operations

    run_async(operations.pause_now(settings, sandbox))
    typer.echo(f"{sandbox} is due: the next tick claims it, once ingest vouches that it is idle")


@sessions_app.command("keep-alive")
def sessions_keep_alive(
    ctx: typer.Context,
    sandbox: Sandbox,
    duration: Annotated[
        timedelta,
        typer.Option("--for", parser=as_duration, metavar="DURATION", help="how long, e.g. 30m, 2h, 1d"),
    ],
) -> None:
    """Never pause this sandbox before now + DURATION (a pending pause is cancelled)."""
    settings = settings_or_exit(ctx)
    from consumer import operations

    state, at = run_async(operations.keep_alive(settings, sandbox, duration))
    typer.echo(f"{sandbox} ({state}) will not be paused before {at:%Y-%m-%d %H:%M:%S} UTC")


@sessions_app.command("resume")
def sessions_resume(
    ctx: typer.Context,
    sandbox: Sandbox,
    e2b_api_url: Annotated[str | None, opt("e2b_api_url")] = None,
    resume_timeout: Annotated[
        int | None, opt("resume_timeout", "seconds the resumed sandbox may live (60 to 86400)")
    ] = None,
    e2b_request_timeout: Annotated[float | None, opt("e2b_request_timeout")] = None,
) -> None:
    """Resume a PAUSED sandbox through E2B and record it: RUNNING again, with a fresh idle deadline.

    Needs the E2B key in AUTOPAUSE_E2B_API_KEY (or E2B_API_KEY), as the worker
    does. Refused unless the session is PAUSED. When E2B no longer has the
    sandbox, its session becomes KILLED (gone) and the command exits 1.
    """
    settings = settings_or_exit(
        ctx,
        e2b_api_url=e2b_api_url,
        resume_timeout=resume_timeout,
        e2b_request_timeout=e2b_request_timeout,
    )
    from consumer import operations

    done = run_async(operations.resume_session(settings, sandbox))
    if not done.recorded:
        typer.echo(f"{sandbox} was resumed in E2B; its session had moved to {done.state} meanwhile and stays")
        return
    due = f"{done.pause_due_at:%Y-%m-%d %H:%M:%S} UTC" if done.pause_due_at else "unknown"
    typer.echo(
        f"{sandbox} resumed for up to {done.lifetime_s} s: RUNNING, idle deadline {due} (resumed_by_operator)"
    )


Queue = Annotated[
    DeadLetterQueue,
    typer.Option(
        "--queue", case_sensitive=False, help="events (invalid events) or pause (dead pause commands)"
    ),
]


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    queue: Queue = DeadLetterQueue.EVENTS,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="most messages shown")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Show dead letters with their reasons; they stay in the queue.

    Control characters and other non-printables in bodies and headers are shown
    as escapes (\\x1b, \\u202e), in the table and in --json; --json also gives
    each body's exact bytes in body_base64.
    """
    settings = settings_or_exit(ctx)
    from consumer import dead_letters, views

    letters = run_async(dead_letters.peek(settings, queue, limit))
    if as_json:
        show_json([letter.as_json() for letter in letters])
    else:
        typer.echo(views.dead_letters(letters))


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    queue: Queue = DeadLetterQueue.EVENTS,
    limit: Annotated[int, typer.Option(min=1, help="most messages handled")] = 1_000_000,
) -> None:
    """Replay the events dead letters to sandbox.events after a fix; drop dead pause commands.

    Handles at most the messages in the queue when it starts: events that
    ingest rejects again go back to the dead-letter queue with their new reason
    and wait for the next run. With --queue pause the dead commands are
    acknowledged and dropped, not re-sent (operators may not publish pause
    commands): the scheduler sends a new command for every sandbox still
    PAUSING when its lease (AUTOPAUSE_PAUSE_LEASE) runs out.
    """
    settings = settings_or_exit(ctx)
    from consumer import dead_letters

    if queue is DeadLetterQueue.PAUSE:
        dropped = run_async(dead_letters.drop_pause_commands(settings, limit))
        typer.echo(
            f"dropped {dropped.dropped} dead pause command(s) from {dropped.queue}, none re-sent: the"
            f" scheduler sends a new command for any sandbox still PAUSING when its lease"
            f" ({env_name('pause_lease')} of the scheduler) runs out"
        )
        return
    done = run_async(dead_letters.replay_events(settings, limit))
    typer.echo(
        f"replayed {done.replayed} of the {done.found} message(s) in {done.queue} to sandbox.events;"
        " ingest dead-letters again, with its new reason, any it still rejects"
        + (f"; {done.skipped} without an event routing key stay in the queue" if done.skipped else "")
    )
