"""Fixtures: real `meridian standalone` brokers, official-client clients, and the log rule.

Fixtures
- `broker` (module scope): one broker with the default configuration for the whole test module.
  A module that needs another configuration overrides it:

      @pytest.fixture(scope="module")
      def broker(module_brokers):
          return module_brokers.start(config={"deduplication_enabled": True})

- `broker_factory` (function scope): `broker_factory.start(config=None)` starts a broker that
  belongs to the current test, for tests that restart or kill it or provoke errors.
- `client_factory` (function scope): `client_factory(broker)` returns a `pulsar.Client` for that
  broker; every client is closed at teardown, before the test's own brokers are stopped.
- `client`: `client_factory(broker)`.
- `topic`: a fresh persistent topic name in public/default, unique to the test.

Every broker exposes `service_url`, `web_url`, `data_dir`, `restart()` and
`kill9_and_restart()` (same data directory and ports); see broker_process.py.

Cluster mode: with `COMPAT_CLUSTER_MODE=1` every broker these fixtures start is a
`meridian broker --storage` on one etcd and one SeaweedFS for the session (each broker its own
key prefix in etcd and in the bucket, so it is a cluster of its own, kept across its restarts):
the same tests prove that what works in standalone works in cluster mode.

The log rule (neon's): after each test, the ` ERROR ` lines and Rust panics that the brokers
logged while it ran fail the test, unless the test declares them expected with
`@pytest.mark.allow_broker_errors(*regexes)` (no regex: any ERROR line is expected). Panics are
never expected. A broker that exits without being told to also fails the test.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import re
import signal
import threading
from pathlib import Path
from typing import Optional

import pulsar
import pytest

import broker_process
from broker_process import BrokerError, BrokerProcess
from helpers import unique, unique_topic

REPO_ROOT = Path(__file__).resolve().parent.parent

# Client operation timeout (create producer/consumer, close, ...). Bounded so that a broker that
# never answers fails a test instead of hanging it; generous for a debug build.
CLIENT_OPERATION_TIMEOUT_S = 20
# A client's close waits for its producers and consumers to close, each within the operation
# timeout; past this the close is reported as stuck.
CLIENT_CLOSE_TIMEOUT_S = 2 * CLIENT_OPERATION_TIMEOUT_S + 10

atexit.register(broker_process.kill_leftovers)


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"received signal {signum}")


def pytest_configure(config):
    # A runner that stops the suite with SIGTERM gets the same orderly teardown as Ctrl-C:
    # every broker is stopped through its fixture instead of being left behind.
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


# pytest-timeout (signal method) interrupts a test's Python code once, and only while the main
# thread runs Python: a teardown that then blocks, or a wait no signal reaches, would hang the
# whole run. This watchdog bounds each test's setup, call and teardown together: past the test's
# timeout plus a grace period it prints every thread's stack, kills the brokers the run started
# (by pid) and ends the run. If even the watchdog thread cannot run, faulthandler ends it.
WATCHDOG_GRACE_S = 300


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    marker = item.get_closest_marker("timeout")
    timeout = marker.args[0] if marker and marker.args else item.config.getini("timeout")
    deadline = float(timeout or 120) + WATCHDOG_GRACE_S
    watchdog = threading.Timer(deadline, _watchdog_expired, args=(item, deadline))
    watchdog.daemon = True
    watchdog.start()
    faulthandler.dump_traceback_later(deadline + 30, exit=True)
    try:
        yield
    finally:
        watchdog.cancel()
        faulthandler.cancel_dump_traceback_later()


def _watchdog_expired(item, deadline: float) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    sys.stderr.write(f"\n== watchdog: {item.nodeid} still running after {deadline:.0f} s\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.write("== watchdog: ending the run\n")
    sys.stderr.flush()
    broker_process.kill_leftovers()
    os._exit(4)


def pytest_sessionfinish(session, exitstatus):
    broker_process.kill_leftovers()


# ------------------------------------------------------------------ the broker binary


@pytest.fixture(scope="session")
def meridian_bin() -> Path:
    default = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target")) / "debug" / "meridian"
    binary = Path(os.environ.get("MERIDIAN_BIN", default))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.exit(
            f"broker binary {binary} not found or not executable: build it with "
            "`cargo build -p meridian` or point MERIDIAN_BIN at it (compat/run.sh does both)",
            returncode=3,
        )
    return binary


# ------------------------------------------------------------------ brokers


def _allowed_errors(node) -> Optional[list[re.Pattern]]:
    """The test's allowance: None = any ERROR line allowed; a list = only those matching."""
    allowed: list[re.Pattern] = []
    for marker in node.iter_markers("allow_broker_errors"):
        if not marker.args:
            return None
        allowed += [re.compile(pattern) for pattern in marker.args]
    return allowed


CLUSTER_MODE = os.environ.get("COMPAT_CLUSTER_MODE") == "1"


class ClusterServers:
    """The session's etcd and SeaweedFS, for brokers in cluster mode."""

    def __init__(self, tmp_path_factory):
        import test_cluster_mode as cluster  # only in cluster mode: it needs etcd and weed

        self.cluster = cluster
        self.client_port, peer_port = broker_process.free_port(), broker_process.free_port()
        self.etcd = cluster.start_etcd(
            tmp_path_factory.mktemp("session-etcd"), self.client_port, peer_port
        )
        try:
            self.weed, self.endpoint, self.weed_ports = cluster.start_weed(
                tmp_path_factory.mktemp("session-weed")
            )
        except BaseException:
            self.etcd.send_signal(signal.SIGKILL)
            raise
        self.key_file = tmp_path_factory.mktemp("session-s3-key") / "s3.key"
        self.key_file.write_text(f"{cluster.S3_ACCESS_KEY}:{cluster.S3_SECRET_KEY}\n")

    def stop(self) -> None:
        self.cluster.stop_weed(self.weed, self.weed_ports)
        self.etcd.send_signal(signal.SIGKILL)
        self.etcd.wait()


class ClusterModeBroker(BrokerProcess):
    """A `meridian broker --storage` that is a cluster of its own on the session's servers: its
    etcd keys and objects under a prefix of its own, the same across its restarts."""

    def __init__(self, binary, base_dir, name, config, servers: ClusterServers):
        super().__init__(binary, base_dir, name, config)
        self.servers = servers
        self.prefix = unique("broker")

    def command(self) -> list[str]:
        command = super().command()
        command[1] = "broker"
        return command + [
            "--metadata-store", f"etcd://127.0.0.1:{self.servers.client_port}/{self.prefix}",
            "--storage", f"s3://{self.servers.cluster.S3_BUCKET}/{self.prefix}",
            "--s3-endpoint", self.servers.endpoint,
            "--s3-access-key-file", str(self.servers.key_file),
            "--etcd-lease-ttl-seconds", "3",
        ]


@pytest.fixture(scope="session")
def cluster_servers(tmp_path_factory):
    if not CLUSTER_MODE:
        yield None
        return
    servers = ClusterServers(tmp_path_factory)
    try:
        yield servers
    finally:
        servers.stop()


class BrokerFactory:
    """Starts brokers for one scope and stops every one of them when the scope ends."""

    def __init__(self, binary: Path, tmp_path_factory, label: str, allowed_errors,
                 servers: Optional[ClusterServers] = None):
        self.binary = binary
        self.tmp_path_factory = tmp_path_factory
        self.label = label
        self.allowed_errors = allowed_errors
        self.servers = servers
        self.brokers: list[BrokerProcess] = []

    def start(self, config: Optional[dict] = None) -> BrokerProcess:
        name = f"{self.label}#{len(self.brokers)}"
        base_dir = self.tmp_path_factory.mktemp(re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80])
        if self.servers is not None:
            broker = ClusterModeBroker(self.binary, base_dir, name, config, self.servers)
        else:
            broker = BrokerProcess(self.binary, base_dir, name, config)
        self.brokers.append(broker)
        broker_process.KNOWN_BROKERS.append(broker)
        failure = None
        try:
            broker.start()
        except BrokerError as error:
            failure = str(error)
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        return broker

    def stop_all(self) -> None:
        """Stop every broker; then fail if any stop went wrong or the logs broke the rule."""
        failures = []
        for broker in self.brokers:
            try:
                broker.stop()
            except BrokerError as error:
                failures.append(str(error))
            finally:
                broker.kill()  # no-op unless stop() left it running
            problems = broker.take_new_problems(self.allowed_errors)
            if problems:
                failures.append(
                    f"{broker.name} logged unexpected errors (after the last test that used it or "
                    f"while stopping); log: {broker.log_path}\n" + "\n".join(map(str, problems))
                )
            if broker in broker_process.KNOWN_BROKERS:
                broker_process.KNOWN_BROKERS.remove(broker)
        if failures:
            pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.fixture(scope="module")
def module_brokers(meridian_bin, tmp_path_factory, request, cluster_servers):
    factory = BrokerFactory(meridian_bin, tmp_path_factory, request.module.__name__,
                            allowed_errors=[], servers=cluster_servers)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def broker(module_brokers) -> BrokerProcess:
    return module_brokers.start()


@pytest.fixture
def broker_factory(meridian_bin, tmp_path_factory, request, cluster_servers):
    factory = BrokerFactory(
        meridian_bin, tmp_path_factory, request.node.name, _allowed_errors(request.node),
        servers=cluster_servers,
    )
    yield factory
    factory.stop_all()


# ------------------------------------------------------------------ clients


class ClientFactory:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.clients: list[pulsar.Client] = []
        self.log_paths: list[Path] = []

    def __call__(self, broker: BrokerProcess, **kwargs) -> pulsar.Client:
        if broker.exited_unexpectedly() is not None:
            pytest.fail(
                f"{broker.name} is not running (it exited earlier with code "
                f"{broker.exited_unexpectedly()}); log: {broker.log_path}",
                pytrace=False,
            )
        log_path = self.log_dir / f"pulsar-client-{len(self.clients)}.log"
        kwargs.setdefault("operation_timeout_seconds", CLIENT_OPERATION_TIMEOUT_S)
        kwargs.setdefault("logger", pulsar.FileLogger(pulsar.LoggerLevel.Info, str(log_path)))
        client = pulsar.Client(broker.service_url, **kwargs)
        self.clients.append(client)
        self.log_paths.append(log_path)
        return client

    def close_all(self) -> None:
        """Closes every client, each within CLIENT_CLOSE_TIMEOUT_S: a close that does not
        return fails the test (named) instead of hanging the run."""
        stuck = []
        for index, client in enumerate(self.clients):
            closer = threading.Thread(
                target=_close_quietly, args=(client,), daemon=True, name=f"close-client-{index}"
            )
            closer.start()
            closer.join(CLIENT_CLOSE_TIMEOUT_S)
            if closer.is_alive():
                stuck.append(f"client {index} (log: {self.log_paths[index]})")
        if stuck:
            pytest.fail(
                f"client.close() did not return within {CLIENT_CLOSE_TIMEOUT_S} s: "
                + ", ".join(stuck),
                pytrace=False,
            )


def _close_quietly(client: pulsar.Client) -> None:
    try:
        client.close()
    except pulsar.PulsarException:
        pass  # already closed, or the broker is gone: nothing left to release


@pytest.fixture
def client_factory(broker_factory, tmp_path, request):
    # Depends on broker_factory so that clients are closed before the test's brokers stop.
    factory = ClientFactory(tmp_path)
    request.node.compat_clients = factory
    yield factory
    factory.close_all()


@pytest.fixture
def client(broker, client_factory) -> pulsar.Client:
    return client_factory(broker)


@pytest.fixture
def topic(request) -> str:
    return unique_topic(request.node.name)


# ------------------------------------------------------------------ the log rule


def _tail(path: Path, lines: int = 40) -> str:
    """The end of a client log, without the client's "Receive timeout" noise."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    kept = [line for line in text.splitlines() if "Receive timeout after" not in line]
    return "\n".join(kept[-lines:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    allowed = _allowed_errors(item)
    try:
        result = yield
    except BaseException:
        # The test failed by itself: attach the logs, and consume the broker lines so that they
        # are not blamed on the next test.
        for broker in list(broker_process.KNOWN_BROKERS):
            broker.take_new_problems(allowed)
            item.add_report_section("call", f"broker log tail {broker.name}", broker.log_tail())
        clients = getattr(item, "compat_clients", None)
        if clients is not None:
            try:
                clients.close_all()  # the client's file logger writes its buffer out on close
            finally:
                # Attached even when a close does not return (or the test's timeout strikes
                # while closing): what the logger wrote by then is the client's side of it.
                for path in clients.log_paths:
                    item.add_report_section("call", f"client log tail {path.name}", _tail(path))
        raise
    failures = []
    for broker in list(broker_process.KNOWN_BROKERS):
        problems = broker.take_new_problems(allowed)
        if problems:
            failures.append(
                f"{broker.name} logged unexpected errors during the test (log: {broker.log_path}):\n"
                + "\n".join(map(str, problems))
            )
        code = broker.exited_unexpectedly()
        if code is not None and not broker.crash_reported:
            broker.crash_reported = True
            failures.append(
                f"{broker.name} exited unexpectedly with code {code} during the test\n"
                f"--- log tail ---\n{broker.log_tail()}"
            )
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
    return result
