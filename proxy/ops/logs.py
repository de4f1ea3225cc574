"""Log formats: text (the default) or one JSON object per line.

A JSON line carries the time (UTC, ISO 8601 with milliseconds), the level, the logger, the
message, the connection id and listener where the record has them, every other field the
record was given (``extra=``), and the exception's traceback as text. The audit stream's
records (``xoauth2_proxy.audit``) carry their fields in ``audit``: in JSON they become the
line's own fields, in text the message is their JSON, as before.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Final

__all__ = ["TEXT_FORMAT", "JsonFormatter", "configure"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has: not the record's own fields.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (non-ASCII characters escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        audit = getattr(record, "audit", None)
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": "audit" if isinstance(audit, dict) else record.getMessage(),
        }
        for name, value in vars(record).items():
            if name in _STANDARD or name == "audit" or name.startswith("_"):
                continue
            line[name] = value if isinstance(value, str | int | float | bool) else str(value)
        if isinstance(audit, dict):
            line.update(audit)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=True, default=str)


def configure(level: int, log_format: str) -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``).

    Like :func:`logging.basicConfig`, this does nothing when the root logger already has
    handlers of someone else's (a test harness, an embedding program); a handler it
    installed itself is replaced, so that ``serve`` can switch to the configured format.
    """
    global _installed
    root = logging.getLogger()
    if any(handler is not _installed for handler in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler


_installed: logging.Handler | None = None
