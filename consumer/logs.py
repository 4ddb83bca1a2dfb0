"""Logging set-up: text or JSON lines, a stable ``action`` per record, secrets scrubbed."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from consumer.settings import LogFormat, Settings, secret_values

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class Redactor(logging.Filter):
    """Replaces every secret with ``***`` in the message and its extras, whatever the logger."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        record.msg = self._scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self._scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, self._scrub(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "action": getattr(record, "action", record.name),
            "message": record.getMessage(),
        }
        payload.update({k: v for k, v in _extras(record).items() if k != "action"})
        if record.exc_text:
            payload["exception"] = record.exc_text
        elif record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        action = extras.pop("action", record.name)
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        line = f"{self.formatTime(record)} {record.levelname:<7} {action} {record.getMessage()}"
        if fields:
            line += f" {fields}"
        if record.exc_text:
            line += "\n" + record.exc_text
        elif record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(settings: Settings) -> None:
    """Install one handler on the root logger (stderr), replacing any earlier one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format is LogFormat.JSON else TextFormatter())
    handler.addFilter(Redactor(secret_values(settings)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # the SDK's and drivers' chatter stays out unless asked for
    for noisy in ("aiormq", "aio_pika", "httpx", "e2b", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
