"""What every command of the CLI shares: options bound to settings, argument parsers, errors, output.

Errors leave a command as one line on stderr and an exit code: 2 for a
setting or argument that cannot work, 1 for a service that is not there.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import typer

from consumer.errors import AutopauseError, ConfigError
from consumer.settings import ENV_PREFIX, Settings, env_name, load_settings
from consumer.timing import parse_duration

T = TypeVar("T")


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


def as_duration(text: str) -> timedelta:
    """The parser of duration arguments: ``90`` or ``90s``, ``15m``, ``2h``, ``7d``, ``1h30m``."""
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def settings_or_exit(ctx: typer.Context, **overrides: Any) -> Settings:
    """Settings from the environment, the global options and this command's; exit 2 if they cannot work."""
    merged = dict(ctx.obj or {})
    merged.update(overrides)
    try:
        settings = load_settings(**merged)
    except ConfigError as exc:
        typer.echo(f"autopause: {exc}", err=True)
        raise typer.Exit(2) from None
    from consumer import logs

    logs.configure(settings)
    return settings


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
    finally:
        # The e2b SDK's HTTP client leaves objects in reference cycles after a failed
        # connection; collected at interpreter exit, once its runtime is gone, they abort
        # the process (SIGABRT) about every other time. Collected here, they go quietly.
        gc.collect()


def show_json(data: Any) -> None:
    from consumer.text import safe_json

    typer.echo(safe_json(data))
