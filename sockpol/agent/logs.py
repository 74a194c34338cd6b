"""Structured logs: one JSON object per line, one line per action (load, reload, unload, ...).

Fields: `time` (UTC, ISO 8601), `level`, `msg`, and whatever the caller passes as `extra=`
(action, policy key, load name, cgroup, pod, result, error, ms). A log collector (Fluent Bit,
Vector, Loki's promtail) parses them without a custom pattern.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The kubernetes client logs every request at DEBUG through urllib3, and each of its
    # retries at WARNING (three lines per failed request); the informer logs one line per
    # failure, with what it does next. Keep urllib3's out.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
