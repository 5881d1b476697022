"""Hostile review of cluster mode's object-store log (issue 17): failures found by attacking
its promises, each kept as a test that failed before its fix.

Runs on the fixtures of `test_cluster_mode.py` (a real etcd, a real SeaweedFS, three
`meridian broker --storage s3://...` processes of cluster c2), imported, not copied; this
module gets its own instances of them.
"""

from __future__ import annotations

import pulsar

from helpers import receive_n, unique, wait_until
from test_cluster_mode import (  # noqa: F401  (fixtures are used by name)
    etcd,
    http,
    new_client,
    object_cluster,
    object_store,
    owner_of,
    stored_cursor,
)


def test_an_acknowledgement_with_a_message_id_from_before_a_move_keeps_the_cursor_in_etcd(
    object_cluster, etcd, tmp_path
):
    # Models a consumer that acknowledges, after its topic moved (owner killed), a message it
    # received from the old owner: its message id names the old owner's ledger, which the new
    # owner's copy does not have. The new owner must keep persisting the subscription; before
    # the fix it deleted the cursor from etcd (a mark-delete it could not express), so after a
    # second move the subscription was created anew at the latest entry and the messages it
    # had never acknowledged were never delivered.
    first, second, third = object_cluster
    namespace = f"public/{unique('review')}"
    status, _, body = http("PUT", f"{second.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    topic = f"persistent://{namespace}/t"
    assert owner_of(object_cluster, topic, via=first) is first

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
            lambda: (stored_cursor(etcd, topic, "s") or {}).get("acknowledged") == [[5, 5]],
            "the new owner persisted the subscription with the acknowledged message",
        )
        consumer.close()

        # The second move: the last broker serves the subscription as persisted (its five
        # unacknowledged messages come again, the acknowledged one does not).
        last = third if new_owner is second else second
        new_owner.kill()
        resumed_client = new_client(last, tmp_path, "resumed")
        try:
            resumed = resumed_client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Latest
            )
            again = receive_n(resumed, len(before))
            assert [message.data() for message in again] == before
        finally:
            resumed_client.close()
    finally:
        client.close()
