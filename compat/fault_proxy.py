"""A fault-injecting TCP proxy for the replication tests: cut, heal, delay, reset mid-stream.

`FaultProxy(("127.0.0.1", port))` listens on a free loopback port (`proxy.port`, `proxy.url`)
and forwards every connection it accepts to the target, byte for byte, in both directions. The
test thread steers it:

- `cut()`: every open connection is closed abruptly (RST on both sides), and connections
  arriving until `heal()` are accepted and reset at once, so a client sees its connection
  fail immediately, as across a network partition that a router reports. `heal()` ends it.
- `set_delay(seconds)`: every chunk is forwarded that long after it was read, in each
  direction, in order (a chunk never overtakes an earlier one). 0 turns it off.
- `reset_after(n_bytes, connections=1)`: the connections open now and those opened later each
  forward `n_bytes` more (both directions together; the chunk that crosses the limit is cut
  there), then are reset on both sides (SO_LINGER 0: an RST, no FIN). After `connections`
  resets the rule is cleared by itself; `connections=None` keeps resetting every connection
  until `reset_after(None)`.
- `corrupt(marker, times=1)`: in data going to the target, the byte right after the next
  `times` occurrences of `marker` (each found within one chunk) is flipped, as a bad link or
  NIC would; `times=None` corrupts every occurrence until `corrupt(None)`. Put the marker in
  a message payload, followed by payload bytes, so that only that payload is damaged and the
  broker sees a checksum mismatch. `corrupted` counts the bytes flipped.
- `close()`: stops listening, resets what is open, stops and joins the proxy's thread. It is
  idempotent; nothing (thread, socket) is left behind afterwards.

Counters (readable from any thread): `bytes_read` (taken in from either side),
`bytes_to_target`, `bytes_from_target`, `bytes_forwarded` (their sum), `connections_accepted`,
`connections_refused` (reset while cut, or the target did not accept), `resets` (done by
`reset_after`), `active_connections`.

All of it runs on one asyncio event loop in one background thread; the control calls hand their
work to that loop and return when it is done, so after `cut()` returns every connection that
was open is gone. Buffers are bounded: per connection and direction at most `max_queued_chunks`
chunks of up to `chunk_size` bytes wait to be forwarded (plus the transport's small write
buffer); beyond that the proxy stops reading from the sender, and TCP flow control pushes back.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Optional

CONTROL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
_EOF = object()


def _rst_and_close(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST (SO_LINGER 0) instead of a FIN."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone
    transport.abort()


class _Link:
    """One proxied connection: the client side and the target side."""

    def __init__(self, number: int, client: asyncio.StreamWriter, target: asyncio.StreamWriter):
        self.number = number
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task] = []
        self.forwarded = 0
        # Bytes this link may still forward before it is reset (None: no limit).
        self.reset_budget: Optional[int] = None
        self.closed = False
        self.eof_count = 0


class FaultProxy:
    """A TCP proxy from a free loopback port to `target`, with injectable faults."""

    def __init__(
        self,
        target: tuple[str, int],
        name: str = "proxy",
        chunk_size: int = 64 * 1024,
        max_queued_chunks: int = 16,
    ):
        self.target = (target[0], int(target[1]))
        self.name = name
        self.chunk_size = chunk_size
        self.max_queued_chunks = max_queued_chunks
        self.bytes_read = 0
        self.bytes_to_target = 0
        self.bytes_from_target = 0
        self.connections_accepted = 0
        self.connections_refused = 0
        self.resets = 0
        self.corrupted = 0
        # (marker, occurrences left to corrupt or None for "until cleared")
        self._corrupt_rule: Optional[tuple[bytes, Optional[int]]] = None
        self._links: dict[int, _Link] = {}
        # Every task the proxy runs, until it ends: close() cancels and awaits what is left.
        self._tasks: set[asyncio.Task] = set()
        self._cut = False
        self._delay = 0.0
        # (bytes per connection, connections left to reset or None for "until cleared")
        self._reset_rule: Optional[tuple[int, Optional[int]]] = None
        self._closed = False
        self._server: Optional[asyncio.base_events.Server] = None

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self.port: int = listener.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"fault-proxy-{name}-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._start_server(listener))
        except BaseException:
            listener.close()
            self._stop_loop()
            raise

    # ------------------------------------------------------------------ addresses and counters

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        """`pulsar://127.0.0.1:<port>` (the proxy speaks whatever the target speaks)."""
        return f"pulsar://127.0.0.1:{self.port}"

    @property
    def bytes_forwarded(self) -> int:
        return self.bytes_to_target + self.bytes_from_target

    @property
    def active_connections(self) -> int:
        return len(self._links)

    @property
    def is_cut(self) -> bool:
        return self._cut

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.name} :{self.port} -> {self.target[0]}:{self.target[1]}, "
            f"cut={self._cut}, delay={self._delay}, open={self.active_connections}, "
            f"forwarded={self.bytes_forwarded}, resets={self.resets})"
        )

    # ------------------------------------------------------------------ controls (any thread)

    def cut(self) -> None:
        """Reset every open connection; reset new ones until `heal()`."""
        self._call(self._do_cut())

    def heal(self) -> None:
        """Accept and forward connections again."""
        self._call(self._set(lambda: setattr(self, "_cut", False)))

    def set_delay(self, seconds: float) -> None:
        """Forward each chunk read from now on `seconds` later (each direction, in order)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._call(self._set(lambda: setattr(self, "_delay", float(seconds))))

    def reset_after(self, n_bytes: Optional[int], connections: Optional[int] = 1) -> None:
        """Reset connections after `n_bytes` more forwarded bytes each (None: clear the rule).

        Applies to the connections open now (counting from now) and to those opened later.
        `connections` resets clear the rule (one-shot by default); None: until cleared.
        """
        if n_bytes is not None and n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        if connections is not None and connections < 1:
            raise ValueError("connections must be >= 1 or None")
        self._call(self._do_reset_after(n_bytes, connections))

    def corrupt(self, marker: Optional[bytes], times: Optional[int] = 1) -> None:
        """Flip the byte after the next `times` occurrences of `marker` sent to the target."""
        if marker is not None and not marker:
            raise ValueError("marker must not be empty")
        rule = None if marker is None else (bytes(marker), times)
        self._call(self._set(lambda: setattr(self, "_corrupt_rule", rule)))

    def close(self) -> None:
        """Stop listening, reset every connection, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ loop plumbing

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coroutine):
        if not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError(f"{self.name}: the proxy is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(CONTROL_TIMEOUT_S)

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"{self.name}: the proxy thread did not stop")
        if not self._loop.is_closed():
            self._loop.close()

    async def _set(self, change) -> None:
        change()

    async def _start_server(self, listener: socket.socket) -> None:
        self._server = await asyncio.start_server(
            self._accepted, sock=listener, limit=self.chunk_size
        )

    async def _do_cut(self) -> None:
        self._cut = True
        for link in list(self._links.values()):
            self._reset_link(link)

    async def _do_reset_after(self, n_bytes: Optional[int], connections: Optional[int]) -> None:
        if n_bytes is None:
            self._reset_rule = None
            budget = None
        else:
            self._reset_rule = (n_bytes, connections)
            budget = n_bytes
        for link in self._links.values():
            link.reset_budget = budget
        if n_bytes == 0:
            for link in list(self._links.values()):
                self._reset_by_rule(link)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            self._reset_link(link)
        current = asyncio.current_task()
        while True:
            tasks = [task for task in self._tasks if task is not current and not task.done()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        # Let the aborted transports run their connection_lost callbacks, which close sockets.
        for _ in range(3):
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ connections

    async def _accepted(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter):
        self._track(asyncio.current_task())
        try:
            await self._serve(client_reader, client)
        except asyncio.CancelledError:  # close() while connecting to the target
            _rst_and_close(client)

    def _track(self, task: asyncio.Task) -> asyncio.Task:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter):
        if self._cut or self._closed:
            self.connections_refused += 1
            _rst_and_close(client)
            return
        try:
            target_reader, target = await asyncio.wait_for(
                asyncio.open_connection(*self.target, limit=self.chunk_size), CONNECT_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError):
            self.connections_refused += 1
            _rst_and_close(client)
            return
        if self._cut or self._closed:  # cut while connecting
            self.connections_refused += 1
            _rst_and_close(client)
            _rst_and_close(target)
            return
        self.connections_accepted += 1
        link = _Link(self.connections_accepted, client, target)
        if self._reset_rule is not None:
            link.reset_budget = self._reset_rule[0]
        for writer in (client, target):
            # A small write buffer: drain() returns only once data is (nearly) in the kernel.
            writer.transport.set_write_buffer_limits(high=self.chunk_size)
            sock = writer.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._links[link.number] = link
        upstream: asyncio.Queue = asyncio.Queue(self.max_queued_chunks)
        downstream: asyncio.Queue = asyncio.Queue(self.max_queued_chunks)
        link.tasks = [
            self._track(asyncio.create_task(self._read(link, client_reader, upstream))),
            self._track(asyncio.create_task(self._write(link, upstream, target, to_target=True))),
            self._track(asyncio.create_task(self._read(link, target_reader, downstream))),
            self._track(asyncio.create_task(self._write(link, downstream, client, to_target=False))),
        ]
        if link.reset_budget == 0:
            self._reset_by_rule(link)

    async def _read(self, link: _Link, reader: asyncio.StreamReader, queue: asyncio.Queue):
        try:
            while not link.closed:
                chunk = await reader.read(self.chunk_size)
                if not chunk:
                    await queue.put((0.0, _EOF))
                    return
                self.bytes_read += len(chunk)
                await queue.put((self._loop.time() + self._delay, chunk))
        except (OSError, asyncio.IncompleteReadError):
            self._reset_link(link)  # the peer reset: pass it on to the other side
        except asyncio.CancelledError:
            pass

    async def _write(self, link: _Link, queue: asyncio.Queue, writer, to_target: bool):
        try:
            while not link.closed:
                due, chunk = await queue.get()
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if link.closed:
                    return
                if chunk is _EOF:
                    # Half-close: pass the FIN on; the link ends when both directions ended.
                    if writer.can_write_eof():
                        writer.write_eof()
                    link.eof_count += 1
                    if link.eof_count == 2:
                        self._close_link(link)
                    return
                budget = link.reset_budget
                if budget is not None and len(chunk) >= budget:
                    chunk = chunk[:budget]
                    if chunk:
                        self._count(link, len(chunk), to_target)
                        writer.write(chunk)
                        await writer.drain()
                    self._reset_by_rule(link)
                    return
                if to_target and self._corrupt_rule is not None:
                    chunk = self._corrupted(chunk)
                # Counted first: the peer may see the bytes before this thread runs again.
                self._count(link, len(chunk), to_target)
                writer.write(chunk)
                if link.reset_budget is not None:
                    link.reset_budget -= len(chunk)
                await writer.drain()
        except (OSError, RuntimeError):
            self._reset_link(link)
        except asyncio.CancelledError:
            pass

    def _corrupted(self, chunk: bytes) -> bytes:
        marker, left = self._corrupt_rule
        damaged = bytearray(chunk)
        start = 0
        while left is None or left > 0:
            found = damaged.find(marker, start)
            flip = found + len(marker)
            if found < 0 or flip >= len(damaged):
                break
            damaged[flip] ^= 0xFF
            self.corrupted += 1
            start = flip + 1
            if left is not None:
                left -= 1
        self._corrupt_rule = None if left == 0 else (marker, left)
        return bytes(damaged)

    def _count(self, link: _Link, n: int, to_target: bool) -> None:
        link.forwarded += n
        if to_target:
            self.bytes_to_target += n
        else:
            self.bytes_from_target += n

    def _reset_by_rule(self, link: _Link) -> None:
        if link.closed:
            return
        self.resets += 1
        self._reset_link(link)
        if self._reset_rule is not None:
            n_bytes, left = self._reset_rule
            if left is not None:
                left -= 1
                if left <= 0:
                    self._reset_rule = None
                    for other in self._links.values():
                        other.reset_budget = None
                else:
                    self._reset_rule = (n_bytes, left)

    def _reset_link(self, link: _Link) -> None:
        """RST both sides and forget the link (its tasks end by themselves or are cancelled)."""
        if link.closed:
            return
        link.closed = True
        self._links.pop(link.number, None)
        for writer in (link.client, link.target):
            _rst_and_close(writer)
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()

    def _close_link(self, link: _Link) -> None:
        """Both directions ended with a FIN: close both sides normally."""
        if link.closed:
            return
        link.closed = True
        self._links.pop(link.number, None)
        for writer in (link.client, link.target):
            writer.close()
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
