"""One `meridian standalone` process under test: start, readiness, stop, restart, crash, log checks.

The harness owns the broker's whole life:

- it picks two free loopback ports and a fresh data directory, writes the optional TOML config,
  and starts `$MERIDIAN_BIN standalone --data-dir D --broker-port P --web-port W
  --bind-address 127.0.0.1 [--config FILE]` with stdout and stderr appended to `broker.log`
  in the broker's own temporary directory;
- it waits, against a deadline, until the binary port accepts TCP connections *and*
  `GET /admin/v2/brokers/health` answers 200 (never a fixed sleep);
- it stops the process by its pid: SIGTERM, then SIGKILL if it has not exited by a deadline;
- it reads the log incrementally so that each test can be failed for the ` ERROR ` lines (and
  Rust panics) that appeared while it ran (neon's rule: an unexpected error in the server log is
  a test failure, even when the client saw nothing wrong).

Every started process is registered in `LIVE_BROKERS` until it has been reaped, so that the
session can kill leftovers by pid whatever happened to the test that started them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Optional

# How long a broker may take to become ready, and to exit after SIGTERM. Generous because the
# suite runs a debug build on a 2-core machine; both are deadlines for awaited conditions,
# not sleeps.
START_TIMEOUT_S = float(os.environ.get("COMPAT_BROKER_START_TIMEOUT", "60"))
STOP_TIMEOUT_S = float(os.environ.get("COMPAT_BROKER_STOP_TIMEOUT", "20"))
POLL_INTERVAL_S = 0.05

HEALTH_PATH = "/admin/v2/brokers/health"

# A line is a problem if it is an ERROR event of the broker's tracing output or a Rust panic.
# tracing-subscriber pads levels to five characters, so an error line reads "<time> ERROR ...".
ERROR_MARK = " ERROR "
PANIC_MARK = "panicked at"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Brokers whose process may still be running, for the session-end safety net.
LIVE_BROKERS: list["BrokerProcess"] = []
# Brokers whose logs are checked after each test: every broker from creation until the fixture
# that created it has torn it down (running or not).
KNOWN_BROKERS: list["BrokerProcess"] = []


class BrokerError(Exception):
    """The broker could not be started, stopped or did something the harness forbids."""


def free_port() -> int:
    """A loopback TCP port that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def toml_value(value) -> str:
    """The TOML spelling of a scalar config value (the config is flat: key = scalar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise TypeError(f"unsupported TOML value {value!r}")


@dataclasses.dataclass
class LogProblem:
    """A log line that fails a test, with where it came from."""

    broker: str
    line: str

    def __str__(self) -> str:
        return f"[{self.broker}] {self.line}"


class BrokerProcess:
    """A `meridian standalone` process with fixed ports and data directory across restarts."""

    def __init__(self, binary: Path, base_dir: Path, name: str, config: Optional[dict] = None):
        self.binary = Path(binary)
        self.name = name
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "broker.log"
        self.config_path: Optional[Path] = None
        self.broker_port = free_port()
        self.web_port = free_port()
        while self.web_port == self.broker_port:
            self.web_port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if config:
            self.config_path = self.base_dir / "meridian.toml"
            self.config_path.write_text(
                "".join(f"{key} = {toml_value(value)}\n" for key, value in config.items())
            )
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0
        # True while the harness has stopped or killed the process on purpose.
        self.expected_down = True
        # Set once a test has been failed for this process dying by itself.
        self.crash_reported = False
        # Byte offset in the log up to which lines have been checked for problems.
        self._checked_offset = 0

    # ---------------------------------------------------------------- addresses

    @property
    def service_url(self) -> str:
        return f"pulsar://127.0.0.1:{self.broker_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        command = [
            str(self.binary),
            "standalone",
            "--data-dir",
            str(self.data_dir),
            "--broker-port",
            str(self.broker_port),
            "--web-port",
            str(self.web_port),
            "--bind-address",
            "127.0.0.1",
        ]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        return command

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Start the process and wait until it serves both ports."""
        if self.is_running():
            raise BrokerError(f"{self.name}: start() while pid {self.pid} is still running")
        # The broker reads MERIDIAN_* variables as configuration (MERIDIAN_BIN would become an
        # unknown key "bin"); the harness configures it only through flags and the TOML file.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MERIDIAN_")}
        env["NO_COLOR"] = "1"  # plain log lines, so that " ERROR " can be matched
        env.setdefault("RUST_BACKTRACE", "1")
        self._note(f"starting: {' '.join(self.command())}")
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base_dir,
            )
        finally:
            log.close()  # the child holds its own descriptor
        LIVE_BROKERS.append(self)
        self.expected_down = False
        self.crash_reported = False
        self.starts += 1
        self._await_ready()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        tcp_ready = False
        last_http_problem = "not tried yet"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self.expected_down = True
                self._reap()
                raise BrokerError(
                    f"{self.name} exited with code {code} before becoming ready\n"
                    f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
                )
            if not tcp_ready:
                tcp_ready = self._tcp_accepts()
            if tcp_ready:
                status, last_http_problem = self._health_status()
                if status == 200:
                    self._note(f"ready: pid {self.pid}, {self.service_url}, {self.web_url}")
                    return
            time.sleep(POLL_INTERVAL_S)
        self.kill()
        raise BrokerError(
            f"{self.name} was not ready within {START_TIMEOUT_S:.0f} s "
            f"(binary port accepting: {tcp_ready}; health: {last_http_problem})\n"
            f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
        )

    def _tcp_accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.broker_port), timeout=1):
                return True
        except OSError:
            return False

    def _health_status(self) -> tuple[Optional[int], str]:
        try:
            with urllib.request.urlopen(self.web_url + HEALTH_PATH, timeout=2) as response:
                return response.status, f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            return error.code, f"HTTP {error.code}"
        except (OSError, urllib.error.URLError) as error:
            return None, repr(error)

    def health_status(self) -> Optional[int]:
        """The HTTP status of the health endpoint right now (None if it did not answer)."""
        return self._health_status()[0]

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited_unexpectedly(self) -> Optional[int]:
        """The exit code if the process died without the harness stopping or killing it."""
        if self.expected_down or self.process is None:
            return None
        return self.process.poll()

    def stop(self) -> int:
        """SIGTERM, wait for exit; SIGKILL after the deadline. Returns the exit code.

        Raises BrokerError if the broker had to be killed, or if it crashed on the way out
        (any exit other than 0 or death by the SIGTERM itself).
        """
        if self.process is None:
            return 0
        if self.process.poll() is not None:
            code = self.process.returncode
            self._reap()
            if self.expected_down or self.crash_reported:
                return code  # stopped or killed by the harness, or already blamed on a test
            self.expected_down = True
            raise BrokerError(
                f"{self.name} had exited by itself with code {code} before stop()\n"
                f"--- log tail ---\n{self.log_tail()}"
            )
        self.expected_down = True
        self._note(f"stopping pid {self.pid} with SIGTERM")
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BrokerError(
                f"{self.name} (pid {self.pid}) did not exit within {STOP_TIMEOUT_S:.0f} s of "
                f"SIGTERM and was killed\n--- log tail ---\n{self.log_tail()}"
            )
        self._reap()
        self._note(f"exited with code {code}")
        if code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            raise BrokerError(
                f"{self.name} exited with code {code} after SIGTERM\n"
                f"--- log tail ---\n{self.log_tail()}"
            )
        return code

    def kill(self) -> None:
        """SIGKILL by pid and reap; a no-op if the process is not running."""
        if self.process is None:
            return
        self.expected_down = True
        if self.process.poll() is None:
            self._note(f"killing pid {self.pid} with SIGKILL")
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reap()

    def restart(self) -> None:
        """Graceful restart: SIGTERM, wait for a clean exit, start again (same ports and data)."""
        self.stop()
        self.start()

    def kill9_and_restart(self) -> None:
        """Crash restart: SIGKILL (no chance to flush anything), start again (same ports, data)."""
        if not self.is_running():
            raise BrokerError(f"{self.name}: kill9_and_restart() but the broker is not running")
        self.kill()
        self.start()

    def _reap(self) -> None:
        if self in LIVE_BROKERS and (self.process is None or self.process.poll() is not None):
            LIVE_BROKERS.remove(self)

    # ---------------------------------------------------------------- log

    def _note(self, text: str) -> None:
        """A harness line in the broker log, to make the log readable around restarts."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"--- compat harness [{time.strftime('%H:%M:%S')}] {text}\n")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def take_new_problems(self, allowed: Iterable[re.Pattern] | None) -> list[LogProblem]:
        """Problem lines logged since the last call, minus those the test declared expected.

        `allowed` None means every ERROR line is expected (the test opted out entirely);
        panics are never expected.
        """
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._checked_offset)
                chunk = log.read()
        except FileNotFoundError:
            return []
        # Only look at complete lines; a partial last line is checked next time.
        end = chunk.rfind(b"\n") + 1
        self._checked_offset += end
        problems = []
        for raw in chunk[:end].decode("utf-8", errors="replace").splitlines():
            line = _ANSI_ESCAPE.sub("", raw)
            if line.startswith("--- compat harness"):
                continue
            if PANIC_MARK in line:
                problems.append(LogProblem(self.name, line))
            elif ERROR_MARK in line:
                if allowed is None:
                    continue
                if any(pattern.search(line) for pattern in allowed):
                    continue
                problems.append(LogProblem(self.name, line))
        return problems


def kill_leftovers() -> None:
    """Session-end safety net: SIGKILL every broker that is still running, by pid."""
    for broker in list(LIVE_BROKERS):
        broker.kill()
