"""``JsonFormatter``: one log record as one JSON object, on one line.

What ``python -m dig_service run --log-format json`` puts on every handler of
the root logger. The object has ``time`` (ISO 8601, UTC), ``level``,
``logger``, ``message`` (the formatted message), ``exc_info`` (the formatted
traceback, when there is one) and every extra attribute the record was given
(``logger.info(..., extra={"report": report.to_dict()})``) as structured
data: the runner's shutdown report arrives as an object, not as text. A value
``json`` cannot encode is written as its ``repr``; a line break inside a
string is escaped, so a record is always exactly one line.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["JsonFormatter"]

_STANDARD: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}
"""The attributes every ``LogRecord`` has: anything else on a record is an extra."""


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON (see the module doc for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in data:
                data[key] = value
        return json.dumps(data, default=repr, ensure_ascii=False)
