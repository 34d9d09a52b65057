"""Log output of ``p2pd`` and ``seed``: human lines by default, JSON lines for log shippers.

``--log-format json`` writes one JSON object per line (time, level, logger, message, and the
exception's traceback when there is one), so Fluent Bit, Vector or Promtail can ship the logs
of a DaemonSet without a parsing rule. Only the formatted message goes out, never the record's
arguments or extra attributes on their own: what a log call chose to say is all that is
written, so the rule that secrets are never put in a log message is the only rule needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging

__all__ = ["LOG_FORMATS", "JsonFormatter", "add_logging_arguments", "configure_logging"]

LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside the message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, str] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format``: the same on every command line."""
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="'json': one JSON object per line (time, level, logger, message, exception) "
                             "for log shippers")


def configure_logging(level: str, log_format: str) -> None:
    """Sends the root logger's records to stderr in ``log_format`` at ``level``.

    Like ``logging.basicConfig`` (which it calls) it does nothing when the root logger already
    has handlers: a program embedding the command keeps its own logging.

    Raises:
        ValueError: ``level`` is not a logging level name.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
