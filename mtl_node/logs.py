"""Logging for both command lines: a validated level, and text or JSON lines (``--log-format``).

JSON lines carry what log collectors index (time in UTC ISO 8601, level, logger, message, and the
exception's type and traceback text when there is one), one object per line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from mtl_node.core.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger; a level or format that does not exist is a ConfigError."""
    if level.lower() not in LEVELS:
        raise ConfigError("--log-level", f"{level!r} is not a log level", f"use one of: {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ConfigError("--log-format", f"{fmt!r} is not a log format", f"use one of: {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
