"""Hostile review of cluster mode's object-store log (issue 17): failures found by attacking
its promises, each kept as a test that failed before its fix.

Runs on the fixtures of `test_cluster_mode.py` (a real etcd, a real SeaweedFS, three
`meridian broker --storage s3://...` processes of cluster c2), imported, not copied; this
module gets its own instances of them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.parse

import pulsar
import pytest

from helpers import receive_n, wait_until
from test_cluster_mode import (  # noqa: F401  (fixtures are used by name)
    paused_weed,
    etcd,
    http,
    new_client,
    object_cluster,
    owner_of,
    stored_cursor,
    topic_owned_by,
)

@pytest.fixture(scope="module")
def weed(paused_weed):
    return paused_weed


@pytest.fixture(scope="module")
def object_store(weed):
    """`test_cluster_mode`'s brokers use this module's SeaweedFS."""
    return weed[1]


# A poisoned local log reports itself (ERROR) where the broker handles it.
POISON_LINES = ("poisoned", "write failed", "Operation not permitted")


def backlog(broker, topic: str, subscription: str):
    """The subscription's backlog as the topic's owner reports it (a non-owner redirects)."""
    status, _, body = http("GET", f"{broker.web_url}/admin/v2/{topic.replace('://', '/')}/stats")
    if status != 200:
        return None
    return json.loads(body)["subscriptions"].get(subscription, {}).get("msgBacklog")


def test_acknowledgements_with_message_ids_from_before_an_unload_are_applied(
    object_cluster, tmp_path
):
    # Models a consumer that received messages from the owner, then its bundle moved (an
    # unload: the next owner, even the same broker, rebuilds the topic's local copy in a new
    # ledger), and only then acknowledges those messages with the message ids it was given (as
    # Pulsar clients do for messages already handed to the application). The new owner must
    # apply them: the same entries under the new ledger. Before the fix they were ignored (no
    # such ledger here), so the messages came again after a reconnect.
    running = [broker for broker in object_cluster if broker.is_running()]
    owner = running[0]
    namespace, topic = topic_owned_by(owner, running, owner, "moved-ids")
    client = new_client(owner, tmp_path, "client")
    try:
        consumer = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared)
        producer = client.create_producer(
            topic, send_timeout_millis=60_000, batching_enabled=False
        )
        before = [f"before/{index}".encode() for index in range(5)]
        for payload in before:
            producer.send(payload)
        received = receive_n(consumer, len(before))
        assert [message.data() for message in received] == before

        status, _, body = http("PUT", f"{owner.web_url}/admin/v2/namespaces/{namespace}/unload")
        assert status in (200, 204), (status, body)
        # The clients moved (to whichever broker took the bundle): a new message arrives.
        producer.send(b"after")
        while consumer.receive(timeout_millis=30_000).data() != b"after":
            pass  # the unacknowledged messages come again first, with new message ids

        for message in received:
            consumer.acknowledge(message)  # message ids of the old copy
        wait_until(
            lambda: backlog(running[-1], topic, "s") == 1,
            "the new owner applied the five acknowledgements (only 'after' is left)",
        )
        consumer.close()
        again = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared)
        assert again.receive(timeout_millis=30_000).data() == b"after"
    finally:
        client.close()


def test_an_acknowledgement_with_a_message_id_from_before_a_move_keeps_the_cursor_in_etcd(
    object_cluster, etcd, tmp_path
):
    # Models a consumer that acknowledges cumulatively, after its topic moved (owner killed),
    # a message it received from the old owner: its message id names the old owner's ledger,
    # which the new owner's copy does not have. The new owner must apply it (the same entry in
    # its copy) and keep persisting the subscription; before the first fix it deleted the
    # cursor from etcd (a mark-delete it could not express), so after a second move the
    # subscription was created anew at the latest entry and the messages it had never
    # acknowledged were never delivered; before the second, it ignored the acknowledgement.
    first, second, third = object_cluster
    _, topic = topic_owned_by(first, object_cluster, second, "review")

    client = new_client(second, tmp_path, "client")
    try:
        # The subscription exists before anything is published; nothing is acknowledged yet.
        consumer = client.subscribe(topic, "s")
        wait_until(
            lambda: stored_cursor(etcd, topic, "s") is not None,
            "the owner persisted the new subscription to etcd",
        )
        producer = client.create_producer(
            topic, send_timeout_millis=60_000, batching_enabled=False
        )
        before = [f"before/{index}".encode() for index in range(5)]
        for payload in before:
            producer.send(payload)
        received = receive_n(consumer, len(before))
        assert [message.data() for message in received] == before

        # The owner dies; the client moves to a survivor (second or third).
        first.kill()
        producer.send(b"after")
        seen = []
        while b"after" not in [message.data() for message in seen]:
            seen.append(consumer.receive(timeout_millis=30_000))
        new_owner = owner_of([second, third], topic, via=second)
        assert new_owner is not None

        # The old-ledger cumulative acknowledgement, then one of the new owner's messages.
        consumer.acknowledge_cumulative(received[-1])
        after = [message for message in seen if message.data() == b"after"][0]
        consumer.acknowledge(after)
        wait_until(
            lambda: (stored_cursor(etcd, topic, "s") or {}).get("mark_delete") == 5,
            "the new owner persisted the subscription with every message acknowledged",
        )
        consumer.close()

        # The second move: the last broker serves the subscription as persisted (nothing
        # acknowledged comes again).
        last = third if new_owner is second else second
        new_owner.kill()
        resumed_client = new_client(last, tmp_path, "resumed")
        try:
            resumed = resumed_client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            resumed_client.create_producer(topic).send(b"last")
            assert resumed.receive(timeout_millis=30_000).data() == b"last"
        finally:
            resumed_client.close()
    finally:
        client.close()


def immutable(broker, names: list[str], on: bool) -> None:
    """Sets or clears the immutable attribute of the files (or directories) so named in the
    broker's data directory, wherever they are now (a reload moves a log's directory aside)."""
    paths = [str(path) for name in names for path in broker.data_dir.rglob(name)]
    if paths:
        subprocess.run(["chattr", "+i" if on else "-i", *paths], check=True)


def require_chattr(broker) -> None:
    probe = broker.data_dir / "immutable-probe"
    probe.write_bytes(b"")
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root, on ext4 or xfs) to make a segment file unwritable")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()


@pytest.mark.allow_broker_errors(*POISON_LINES)
def test_a_local_write_failure_on_the_owner_reloads_the_topic_from_the_object_store(
    object_cluster, etcd, tmp_path
):
    # Models the owner's local working copy failing a write (here its segment file made
    # immutable: EPERM, as a failing disk) while the object-store log is fine. The copy is
    # only a cache of the object-store log: once the fault is gone the topic must serve again,
    # with every acknowledged message. Before the fix the topic stayed poisoned on its owner
    # (every later send failed) until the broker restarted.
    first = next(broker for broker in object_cluster if broker.is_running())
    require_chattr(first)
    _, topic = topic_owned_by(first, [first], first, "review")
    directory = first.data_dir / "storage" / "logs" / urllib.parse.quote(topic, safe="")

    client = new_client(first, tmp_path, "client")
    segments = []
    try:
        consumer = client.subscribe(topic, "s")
        producer = client.create_producer(
            topic, send_timeout_millis=5_000, batching_enabled=False
        )
        before = [f"before/{index}".encode() for index in range(3)]
        for payload in before:
            producer.send(payload)

        segments = sorted(path.name for path in directory.glob("*.segment"))
        assert segments, list(directory.iterdir())
        immutable(first, segments, True)
        # Fails, or succeeds through the client's retry once the topic was reloaded.
        try:
            producer.send(b"during")
            acknowledged = before + [b"during"]
        except Exception:  # noqa: BLE001  (not acknowledged: either outcome is allowed)
            acknowledged = before
        immutable(first, segments, False)
        segments = []

        # The fault is gone: the topic serves again (a new producer: the first one may have
        # been closed by the unload), and a consumer gets every acknowledged message in order.
        def sent() -> bool:
            try:
                again = client.create_producer(topic, send_timeout_millis=5_000)
                again.send(b"after")
                again.close()
                return True
            except Exception:  # noqa: BLE001  (still poisoned: the next attempt tells)
                return False

        wait_until(sent, "a send after the local fault succeeds")
        seen = []
        while b"after" not in seen:
            seen.append(consumer.receive(timeout_millis=30_000).data())
        acknowledged.append(b"after")
        # First occurrences (the unload redelivers what was not acknowledged yet).
        first_seen = list(dict.fromkeys(payload for payload in seen if payload in acknowledged))
        assert first_seen == acknowledged, seen
    finally:
        immutable(first, segments, False)
        client.close()


@pytest.mark.allow_broker_errors(*POISON_LINES)
def test_a_reload_after_a_local_failure_does_not_race_the_failed_batchs_commit(
    object_cluster, weed, etcd, tmp_path
):
    # Models a local write failure on the owner while the object store is slow (paused): the
    # failed batch's remote commit is still in flight when the topic is reloaded. The reload
    # must not take the object-store log as it was before that commit lands: a new entry given
    # the same id would be acknowledged while etcd's index holds the old one (a second history
    # on the owner, and the acknowledged entry lost once the topic moves).
    first = next(broker for broker in object_cluster if broker.is_running())
    require_chattr(first)
    process, _ = weed
    _, topic = topic_owned_by(first, [first], first, "race")
    directory = first.data_dir / "storage" / "logs" / urllib.parse.quote(topic, safe="")
    client = new_client(first, tmp_path, "client")
    faulty = []
    try:
        failing = client.create_producer(topic, send_timeout_millis=1_000, batching_enabled=False)
        # The log's directory (so that the reload cannot move it aside before the fault is
        # gone) and its segment file (so that the write fails).
        faulty = [directory.name] + sorted(path.name for path in directory.glob("*.segment"))
        assert len(faulty) > 1, list(directory.iterdir())
        rebuilt = first.log_path.read_text().count("local copy rebuilt from the object store")
        process.send_signal(signal.SIGSTOP)
        immutable(first, faulty, True)
        # 1 MiB: the object-store log's flusher takes it at once (its size trigger), so its
        # commit is in flight to the paused store when the local write fails.
        first_try, other_try = b"A" * (1 << 20), b"B" * (1 << 20)
        with pytest.raises(Exception):
            failing.send(first_try)  # stays in flight to the paused store; never acknowledged
        immutable(first, faulty, False)
        faulty = []

        # Another message of the same size, on the reloaded topic, while that commit is pending.
        results = []
        producer = client.create_producer(topic, send_timeout_millis=30_000)
        producer.send_async(other_try, lambda result, _id: results.append(result))
        wait_until(
            lambda: first.log_path.read_text().count("local copy rebuilt from the object store")
            > rebuilt,
            "the topic was reloaded while the store is paused",
        )
        process.send_signal(signal.SIGCONT)
        wait_until(lambda: results, "the second send is answered")

        # What the object store holds, read by a fresh load of the topic.
        status, _, body = http("PUT", f"{first.web_url}/admin/v2/{topic.replace('://', '/')}/unload")
        assert status in (200, 204), (status, body)
        reader = client.create_reader(topic, pulsar.MessageId.earliest)
        history = []
        while reader.has_message_available():
            history.append(reader.read_next(timeout_millis=30_000).data())
        if results[0] == pulsar.Result.Ok:
            assert other_try in history, ([payload[:1] for payload in history], results)
    finally:
        process.send_signal(signal.SIGCONT)
        immutable(first, faulty, False)
        client.close()


def test_acknowledgements_with_message_ids_of_a_deleted_topic_do_not_acknowledge_its_successor(
    object_cluster, tmp_path
):
    # Models an application that keeps the message ids of messages it received and
    # acknowledges them later (Pulsar clients send any message id they are given), after the
    # topic was deleted and created again under the same name. Those ids name entries of a log
    # that no longer exists: the new topic's messages must stay unacknowledged, as they do in
    # standalone (whose new ledger ids differ from the old ones).
    running = [broker for broker in object_cluster if broker.is_running()]
    owner = running[0]
    _, topic = topic_owned_by(owner, running, owner, "old-life-ids")
    client = new_client(owner, tmp_path, "client")
    try:
        consumer = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared)
        producer = client.create_producer(topic, batching_enabled=False)
        old = [f"old/{index}".encode() for index in range(5)]
        for payload in old:
            producer.send(payload)
        received = receive_n(consumer, len(old))
        assert [message.data() for message in received] == old
        producer.close()
        consumer.close()
        path = "/admin/v2/persistent/" + topic.removeprefix("persistent://") + "?force=true"
        status, _, body = http("DELETE", owner.web_url + path)
        assert status in (200, 204), (status, body)

        consumer = client.subscribe(topic, "s", consumer_type=pulsar.ConsumerType.Shared,
                                    initial_position=pulsar.InitialPosition.Earliest)
        producer = client.create_producer(topic, batching_enabled=False)
        new = [f"new/{index}".encode() for index in range(5)]
        for payload in new:
            producer.send(payload)
        fresh = receive_n(consumer, len(new))
        assert [message.data() for message in fresh] == new
        for message in received:
            consumer.acknowledge(message.message_id())  # ids of the deleted topic
        consumer.acknowledge(fresh[0])
        wait_until(
            lambda: backlog(owner, topic, "s") == len(new) - 1,
            "only the new message acknowledged with its own id left the backlog",
        )
    finally:
        client.close()
