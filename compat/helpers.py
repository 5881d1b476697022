"""Small helpers shared by the tests: unique names, receiving with deadlines, awaiting conditions.

Rules these helpers keep for the tests:
- an *expected* message is awaited with a generous timeout (RECEIVE_TIMEOUT_MS): a slow debug
  build makes the test slower, never wrong;
- the *absence* of a message can only be observed over a window (ABSENCE_WAIT_MS); the tests
  use it only after something positive has already been observed, so the window never decides
  whether a present message is found;
- conditions are awaited by polling with a deadline, never by a bare sleep.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import pulsar

RECEIVE_TIMEOUT_MS = 15_000
ABSENCE_WAIT_MS = 1_500
CONDITION_TIMEOUT_S = 30.0


def now_ms() -> int:
    return int(time.time() * 1000)


def unique(prefix: str) -> str:
    """A name nobody else uses: prefix plus 12 random hex digits."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", prefix).strip("-")[:60] or "t"
    return f"{safe}-{uuid.uuid4().hex[:12]}"


def unique_topic(prefix: str, namespace: str = "public/default") -> str:
    return f"persistent://{namespace}/{unique(prefix)}"


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout_s: float = CONDITION_TIMEOUT_S,
    interval_s: float = 0.05,
) -> None:
    """Poll `condition` until it holds; fail with `what` if the deadline passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting until {what}")
        time.sleep(interval_s)


def _next(receiver, timeout_ms: int):
    if hasattr(receiver, "read_next"):
        return receiver.read_next(timeout_millis=timeout_ms)
    return receiver.receive(timeout_millis=timeout_ms)


def receive_covering(consumer, expected: list[bytes], timeout_ms: int = 30_000) -> list[bytes]:
    """Receives (and acknowledges) until every payload of `expected` came; returns the payloads
    received, in order (repeats included: the caller decides what a repeat means)."""
    seen: list[bytes] = []
    while not set(expected) <= set(seen):
        message = consumer.receive(timeout_millis=timeout_ms)
        seen.append(message.data())
        consumer.acknowledge(message)
    return seen


def receive_n(receiver, n: int, timeout_ms: int = RECEIVE_TIMEOUT_MS) -> list:
    """Exactly the next `n` messages of a consumer or reader, each awaited up to `timeout_ms`."""
    messages = []
    for _ in range(n):
        try:
            messages.append(_next(receiver, timeout_ms))
        except pulsar.Timeout:
            got = [m.data() for m in messages]
            raise AssertionError(
                f"received {len(messages)} of {n} expected messages, then nothing for "
                f"{timeout_ms} ms; got {got[:20]!r}{' ...' if len(got) > 20 else ''}"
            ) from None
    return messages


def receive_one(receiver, timeout_ms: int = RECEIVE_TIMEOUT_MS):
    return receive_n(receiver, 1, timeout_ms)[0]


def assert_no_more(receiver, wait_ms: int = ABSENCE_WAIT_MS, what: str = "") -> None:
    """Fail if the consumer or reader delivers anything within `wait_ms`."""
    try:
        message = _next(receiver, wait_ms)
    except pulsar.Timeout:
        return
    raise AssertionError(
        f"expected no more messages{' (' + what + ')' if what else ''}, but got "
        f"{message.data()!r} id={message.message_id()} "
        f"redelivery_count={message.redelivery_count()}"
    )


def collect_from(
    consumers: Sequence,
    count: int,
    timeout_s: float = CONDITION_TIMEOUT_S,
    on_message: Optional[Callable[[int, object], None]] = None,
) -> list[list]:
    """Poll several consumers until `count` messages arrived in total.

    Returns one list of messages per consumer, in arrival order. Messages are not acked
    unless `on_message(consumer_index, message)` does it.
    """
    received: list[list] = [[] for _ in consumers]
    deadline = time.monotonic() + timeout_s
    while sum(len(r) for r in received) < count:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"received {sum(len(r) for r in received)} of {count} messages in "
                f"{timeout_s:.0f} s; per consumer: {[len(r) for r in received]}"
            )
        for index, consumer in enumerate(consumers):
            try:
                message = consumer.receive(timeout_millis=50)
            except pulsar.Timeout:
                continue
            received[index].append(message)
            if on_message is not None:
                on_message(index, message)
    return received


def payloads(messages: Iterable) -> list[bytes]:
    return [m.data() for m in messages]


def message_position(message_id) -> tuple[int, int, int]:
    """(ledger, entry, batch index) of a message id, for ordering and grouping."""
    return (message_id.ledger_id(), message_id.entry_id(), message_id.batch_index())


class SendTracker:
    """Collects the outcomes of `send_async` calls, keyed by an index chosen by the caller."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked: dict[int, object] = {}
        self.failed: dict[int, object] = {}

    def callback(self, index: int):
        def done(result, message_id):
            with self.lock:
                if result == pulsar.Result.Ok:
                    self.acked[index] = message_id
                else:
                    self.failed[index] = result

        return done

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def settled_count(self) -> int:
        with self.lock:
            return len(self.acked) + len(self.failed)


def send_all_async(producer, contents: Sequence[bytes], **send_kwargs) -> list:
    """Send every payload with `send_async`, flush, and return the message ids in send order.

    Fails if any send is not acknowledged by the broker.
    """
    tracker = SendTracker()
    for index, content in enumerate(contents):
        producer.send_async(content, tracker.callback(index), **send_kwargs)
    producer.flush()
    wait_until(
        lambda: tracker.settled_count() == len(contents),
        f"all {len(contents)} sends settled",
    )
    assert not tracker.failed, f"sends failed: {dict(list(tracker.failed.items())[:10])}"
    return [tracker.acked[index] for index in range(len(contents))]


def corrupt_segments(data_dir: Path, local_name: str) -> int:
    """Overwrites the magic of every segment of the topic's log (stop the broker first): the
    log cannot be opened. Returns how many segments it overwrote."""
    logs = data_dir / "storage" / "logs"
    corrupted = 0
    for directory in logs.iterdir():
        if local_name in directory.name:
            for segment in directory.glob("*.segment"):
                with open(segment, "r+b") as file:
                    file.write(b"GARBAGE!")
                corrupted += 1
    return corrupted
