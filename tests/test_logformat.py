"""``--log-format json``: one JSON object per line from ``p2pd`` and ``seed``, for log shippers."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

from p2pd.logformat import JsonFormatter
from tests.harness.tools import clean_env

STARTUP_TIMEOUT = 20.0


def test_record_with_exception_is_one_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("p2pd.fetcher", logging.ERROR, __file__, 1, "download of %s failed", ("x",),
                                   sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    document = json.loads(line)
    assert document["level"] == "ERROR"
    assert document["logger"] == "p2pd.fetcher"
    assert document["message"] == "download of x failed"
    assert document["time"].endswith("+00:00")
    assert document["exception"].startswith("Traceback") and "ValueError: bad\nvalue" in document["exception"]
    assert set(document) == {"time", "level", "logger", "message", "exception"}


def _serve_and_stop(argv: list[str], ready: str) -> list[dict[str, str]]:
    """Starts a server command, waits for its ready line on stdout, stops it with SIGTERM; its stderr as JSON."""
    with subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=clean_env(), cwd=Path(__file__).parents[1]) as process:
        watchdog = threading.Timer(STARTUP_TIMEOUT, process.kill)  # bounds the blocking readline
        watchdog.start()
        try:
            assert process.stdout is not None
            first = process.stdout.readline().decode()  # the command prints its URL once it listens
            assert ready in first, first
            process.send_signal(signal.SIGTERM)
            _out, err = process.communicate(timeout=STARTUP_TIMEOUT)
        finally:
            watchdog.cancel()
            process.kill()
    assert process.returncode == 0, err
    return [json.loads(line) for line in err.decode().splitlines()]  # every line is a JSON object


def test_p2pd_and_seed_log_json_lines(tmp_path: Path) -> None:
    p2pd_lines = _serve_and_stop(["-m", "p2pd", "--log-format", "json", "serve", "--listen", "127.0.0.1:0",
                                  "--data", str(tmp_path / "agent"), "--default-upstream", "http://127.0.0.1:9"],
                                 "p2pd listening on")
    messages = [line["message"] for line in p2pd_lines if line["logger"] == "p2pd"]
    assert any(message.startswith("p2pd listening on http://127.0.0.1:") for message in messages)
    assert "p2pd stopped" in messages
    assert all(line["level"] == "INFO" for line in p2pd_lines if line["logger"] == "p2pd")

    seed_lines = _serve_and_stop(["-m", "seed", "--log-format", "json", "serve", "--listen", "127.0.0.1:0",
                                  "--data", str(tmp_path / "seed")], "seed listening on")
    assert "seed stopped" in [line["message"] for line in seed_lines if line["logger"] == "seed"]
