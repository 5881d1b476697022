"""Self-test of the fault-injecting TCP proxy (fault_proxy.py) that the replication tests put
between clusters: it must forward faithfully when healthy, and its faults must be exactly the
ones it claims (cut, heal, delay in order, reset after N bytes), with bounded buffers and
nothing left behind after close(). Runs against a local echo server; no broker involved.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from fault_proxy import FaultProxy
from helpers import wait_until


class EchoServer:
    """A threaded TCP server on a free loopback port.

    mode "echo" sends everything back; "stall" accepts and never reads. It records how each
    connection ended (`clean_closes`: FIN, `resets`: RST) and the bytes it received.
    """

    def __init__(self, mode: str = "echo"):
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.received = 0
        self.clean_closes = 0
        self.resets = 0
        self.halt = threading.Event()
        self.threads: list[threading.Thread] = []
        self.connections: list[socket.socket] = []
        self._spawn(self._accept_loop)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="echo-server")
        self.threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self.halt.is_set():
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            connection.settimeout(0.05)
            with self.lock:
                self.connections.append(connection)
            self._spawn(self._serve, connection)

    def _serve(self, connection: socket.socket) -> None:
        try:
            while not self.halt.is_set():
                if self.mode == "stall":
                    self.halt.wait(0.05)
                    continue
                try:
                    data = connection.recv(65536)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    with self.lock:
                        self.resets += 1
                    return
                if not data:
                    with self.lock:
                        self.clean_closes += 1
                    return
                with self.lock:
                    self.received += len(data)
                try:
                    connection.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    with self.lock:
                        self.resets += 1
                    return
        finally:
            connection.close()

    def close(self) -> None:
        self.halt.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)
        assert not any(thread.is_alive() for thread in self.threads), "echo server threads hang"


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy_factory():
    proxies: list[FaultProxy] = []

    def make(port: int) -> FaultProxy:
        proxy = FaultProxy(("127.0.0.1", port), name="selftest")
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the connection ends, and how it ended: "reset" or "fin"."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        if not chunk:
            return data, "fin"
        data += chunk


def test_forwards_both_ways_byte_exact_and_counts(echo, proxy_factory):
    """A healthy proxy is transparent: byte-exact both ways, counted, FIN passed on."""
    proxy = proxy_factory(echo.port)
    payload = os.urandom(300_000)
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join(10)
        assert proxy.bytes_to_target == len(payload)
        assert proxy.bytes_from_target == len(payload)
        assert proxy.bytes_forwarded == 2 * len(payload)
        assert proxy.connections_accepted == 1
        sock.shutdown(socket.SHUT_WR)
        # The echo server sees our FIN through the proxy, closes, and its FIN comes back.
        assert read_until_closed(sock) == (b"", "fin")
    wait_until(lambda: proxy.active_connections == 0, "the proxy forgot the closed connection", 10)
    assert echo.clean_closes == 1 and echo.resets == 0


def test_corrupt_flips_the_byte_after_the_marker_as_often_as_asked(echo, proxy_factory):
    """Toward the target only, the byte after each of the next `times` markers is flipped;
    everything else passes unchanged, and the rule clears itself."""
    proxy = proxy_factory(echo.port)
    flipped = b"MARK" + bytes([ord("-") ^ 0xFF])
    proxy.corrupt(b"MARK", times=2)
    with connect(proxy) as sock:
        # One marker per round trip, so each is in a chunk of its own.
        echoed = []
        for _ in range(3):
            sock.sendall(b"..MARK-..")
            echoed.append(recv_exactly(sock, 9))
        assert echoed == [b".." + flipped + b".."] * 2 + [b"..MARK-.."]
        assert proxy.corrupted == 2
    proxy.corrupt(b"MARK", times=None)
    with connect(proxy) as sock:
        sock.sendall(b"MARK-MARK-")
        assert recv_exactly(sock, 10) == flipped * 2
    proxy.corrupt(None)
    assert proxy.corrupted == 4


def test_cut_resets_open_connections_and_refuses_new_ones_until_heal(echo, proxy_factory):
    """cut() kills what is open (RST on both sides) and every new connection until heal()."""
    proxy = proxy_factory(echo.port)
    with connect(proxy) as sock:
        sock.sendall(b"before the cut")
        assert recv_exactly(sock, 14) == b"before the cut"
        proxy.cut()
        assert proxy.active_connections == 0
        assert read_until_closed(sock) == (b"", "reset")
    wait_until(lambda: echo.resets == 1, "the target saw its side reset", 10)

    # Accepted by the kernel, then reset by the proxy (the RST can beat connect()'s return).
    try:
        with connect(proxy) as sock:
            assert read_until_closed(sock) == (b"", "reset")
    except ConnectionResetError:
        pass
    assert proxy.connections_refused == 1
    assert proxy.connections_accepted == 1, "a connection made during the cut reached the target"

    proxy.heal()
    with connect(proxy) as sock:
        sock.sendall(b"after healing")
        assert recv_exactly(sock, 13) == b"after healing"
    assert proxy.connections_accepted == 2


def test_delay_holds_every_chunk_back_and_keeps_order(echo, proxy_factory):
    """set_delay(d) delays each chunk by d in each direction without reordering anything."""
    proxy = proxy_factory(echo.port)
    proxy.set_delay(0.2)
    with connect(proxy) as sock:
        pieces = [f"{index:04d},".encode() for index in range(50)]
        started = time.monotonic()
        for piece in pieces:
            sock.sendall(piece)
        echoed = recv_exactly(sock, sum(map(len, pieces)))
        elapsed = time.monotonic() - started
        assert echoed == b"".join(pieces)
        # There and back: at least two delays (a lower bound only; slowness never fails it).
        assert elapsed >= 0.4, f"round trip took {elapsed:.3f} s with 0.2 s each way"

        # A chunk sent right after the delay is lowered still waits behind the delayed one.
        proxy.set_delay(0.5)
        read_before = proxy.bytes_read
        sock.sendall(b"slow;")
        wait_until(lambda: proxy.bytes_read == read_before + 5, "the proxy read the slow chunk", 10)
        proxy.set_delay(0)
        sock.sendall(b"fast;")
        assert recv_exactly(sock, 10) == b"slow;fast;"


def test_reset_after_cuts_mid_stream_once(echo, proxy_factory):
    """reset_after(n) lets exactly n more bytes through, then RSTs; one-shot by default."""
    proxy = proxy_factory(echo.port)
    # Armed while a connection is open: it counts from now.
    with connect(proxy) as sock:
        sock.sendall(b"x" * 100)
        assert recv_exactly(sock, 100) == b"x" * 100
        before = proxy.bytes_forwarded
        proxy.reset_after(1_000)
        sender = threading.Thread(target=_send_ignoring_errors, args=(sock, b"y" * 50_000))
        sender.start()
        data, ending = read_until_closed(sock)
        sender.join(10)
        assert ending == "reset"
        assert proxy.bytes_forwarded - before == 1_000
        assert len(data) <= 1_000
    assert proxy.resets == 1
    wait_until(lambda: echo.resets == 1, "the target saw the reset", 10)
    assert echo.received - 100 <= 1_000

    # One-shot: the next connection is not reset.
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(b"z" * 50_000,))
        sender.start()
        assert recv_exactly(sock, 50_000) == b"z" * 50_000
        sender.join(10)
    assert proxy.resets == 1


def test_reset_after_until_cleared_resets_every_new_connection(echo, proxy_factory):
    """reset_after(n, connections=None) resets each connection after n bytes until cleared."""
    proxy = proxy_factory(echo.port)
    proxy.reset_after(300, connections=None)
    for attempt in range(3):
        with connect(proxy) as sock:
            sender = threading.Thread(target=_send_ignoring_errors, args=(sock, b"q" * 10_000))
            sender.start()
            data, ending = read_until_closed(sock)
            sender.join(10)
            assert ending == "reset", f"connection {attempt} was not reset"
            assert len(data) <= 300
    assert proxy.resets == 3
    proxy.reset_after(None)
    with connect(proxy) as sock:
        sock.sendall(b"q" * 10_000)
        assert recv_exactly(sock, 10_000) == b"q" * 10_000
    assert proxy.resets == 3


def test_reset_after_counted_connections(echo, proxy_factory):
    """reset_after(n, connections=2) resets two connections, then clears itself."""
    proxy = proxy_factory(echo.port)
    proxy.reset_after(10, connections=2)
    for attempt in range(2):
        with connect(proxy) as sock:
            sock.sendall(b"0123456789abcdef")
            data, ending = read_until_closed(sock)
            assert ending == "reset", f"connection {attempt} was not reset"
            assert len(data) <= 10
    assert proxy.resets == 2
    with connect(proxy) as sock:
        sock.sendall(b"0123456789abcdef")
        assert recv_exactly(sock, 16) == b"0123456789abcdef"
    assert proxy.resets == 2


def test_buffers_are_bounded_when_the_target_stops_reading(proxy_factory):
    """A target that never reads pushes back on the sender: the proxy does not buffer it all."""
    stalled = EchoServer(mode="stall")
    try:
        proxy = proxy_factory(stalled.port)
        with connect(proxy) as sock:
            sock.setblocking(False)
            chunk = b"b" * 65536
            sent = 0
            limit = 512 * 1024 * 1024
            while sent < limit:
                try:
                    sent += sock.send(chunk)
                    continue
                except BlockingIOError:
                    pass
                # Blocked: wait (bounded) for room; no room for 2 s means back-pressure holds.
                _, writable, _ = select.select([], [sock], [], 2.0)
                if not writable:
                    break
            assert sent < limit, "the proxy swallowed 512 MiB from a sender whose target stalls"
            # Kernel socket buffers on four sockets plus the proxy's own queue: well under this.
            assert sent < 64 * 1024 * 1024, f"{sent} bytes buffered"
            queued = proxy.bytes_to_target
            assert queued < sent  # the rest waits in buffers, not lost or forwarded twice
    finally:
        stalled.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_leaves_no_thread_or_socket_behind(echo):
    """close() resets every connection, stops listening and joins its thread; fds return."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    proxy = FaultProxy(("127.0.0.1", echo.port), name="closing")
    proxy_threads = set(threading.enumerate()) - threads_before
    assert len(proxy_threads) == 1
    idle, busy, delayed = connect(proxy), connect(proxy), connect(proxy)
    try:
        busy.sendall(b"ping")
        assert recv_exactly(busy, 4) == b"ping"
        proxy.set_delay(5)
        delayed.sendall(b"held in the proxy's queue")
        wait_until(lambda: proxy.active_connections == 3, "three connections open", 10)
        proxy.close()
        proxy.close()  # idempotent
        assert not any(thread.is_alive() for thread in proxy_threads)
        for sock in (idle, busy, delayed):
            assert read_until_closed(sock)[1] == "reset"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=5).close()
        with pytest.raises(RuntimeError):
            proxy.cut()
    finally:
        for sock in (idle, busy, delayed):
            sock.close()
    # The echo server closes its side of the reset connections on its own threads.
    wait_until(lambda: _open_fds() <= fds_before, "every descriptor closed again", 10)


def _send_ignoring_errors(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the reset under test
