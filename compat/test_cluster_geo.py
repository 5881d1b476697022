"""Geo-replication between a cluster-mode cluster and a standalone one (issue 17: replicators run
on the bundle owner, and follow the bundle when the owner dies).

Cluster c2: two `meridian broker` processes on a real etcd and a real SeaweedFS. Cluster west:
one `meridian standalone`. The official Python client on both sides.
"""

from __future__ import annotations

import json
import ssl
from http.client import HTTPSConnection

import pulsar

from broker_process import free_port
from helpers import assert_no_more, receive_covering, unique, wait_until
from test_cluster_mode import (  # noqa: F401  (fixtures are used by name)
    CURSOR_PERSIST_INTERVAL_MS,
    OBJECT_CLUSTER,
    etcd,
    http,
    new_client,
    object_brokers,
    object_store,
    owner_of,
    topic_owned_by,
)
from test_security_tls import make_ca, make_server_cert


def admin(web_url: str, method: str, path: str, body=None) -> None:
    status, _, reply = http(method, web_url + path,
                            body=None if body is None else json.dumps(body).encode())
    assert 200 <= status < 300, (method, web_url + path, status, reply)


def create(web_url: str, path: str, body=None) -> None:
    """PUT that creates a resource, which may already exist (409)."""
    status, _, reply = http("PUT", web_url + path,
                            body=None if body is None else json.dumps(body).encode())
    assert 200 <= status < 300 or status == 409, (web_url + path, status, reply)


def register(on, name: str, broker) -> None:
    """Registers cluster `name`, reached through `broker`, in `on`'s registry (created, or
    updated when an earlier test of the module registered it)."""
    data = {"serviceUrl": broker.web_url, "brokerServiceUrl": broker.service_url}
    status, _, _ = http("PUT", f"{on.web_url}/admin/v2/clusters/{name}",
                        body=json.dumps(data).encode())
    if status == 409:
        admin(on.web_url, "POST", f"/admin/v2/clusters/{name}", data)
    else:
        assert 200 <= status < 300, status


def replicate_namespace(entry, west) -> str:
    """Registers each cluster in the other (c2 through `entry`) and creates a namespace
    replicated between them; returns it."""
    register(entry, "west", west)
    register(west, OBJECT_CLUSTER, entry)
    tenant = unique("geo")
    namespace = f"{tenant}/ns"
    for side in (entry, west):
        # The first side's replication settings reach the second one by themselves (Pulsar's
        # configure-once) and may create the tenant and namespace there first: 409 is fine.
        create(side.web_url, f"/admin/v2/tenants/{tenant}",
               {"adminRoles": [], "allowedClusters": [OBJECT_CLUSTER, "west"]})
        create(side.web_url, f"/admin/v2/namespaces/{namespace}")
        admin(side.web_url, "POST", f"/admin/v2/namespaces/{namespace}/replication",
              [OBJECT_CLUSTER, "west"])
    return namespace


def test_replication_both_ways_follows_the_bundle_when_the_owner_dies(
    etcd, object_store, broker_factory, meridian_bin, tmp_path_factory, tmp_path
):
    # Models a user replicating a namespace between a cluster-mode cluster and another cluster:
    # messages flow both ways through whichever broker owns the topic, and when that broker is
    # killed the next owner replicates what is left (its replication cursor comes from etcd),
    # so the other cluster receives every acknowledged message, in order (first occurrences).
    west = broker_factory.start(config={"cluster_name": "west"})
    # Cursors persisted only at close: the next owner's replicator starts from the beginning
    # and resends what the other cluster already has.
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "geo-broker", 2,
                        600_000) as brokers:
        entry, owner = brokers
        namespace = replicate_namespace(entry, west)
        topic = f"persistent://{namespace}/t"
        # The second broker owns the topic; the clients of c2 come in through the first.
        assert owner_of(brokers, topic, via=owner) is owner

        c2_client = new_client(entry, tmp_path, "c2-client")
        west_client = pulsar.Client(west.service_url, operation_timeout_seconds=30)
        try:
            on_west = west_client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            on_c2 = c2_client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            c2_producer = c2_client.create_producer(
                topic, send_timeout_millis=60_000, batching_enabled=False
            )
            west_producer = west_client.create_producer(topic, batching_enabled=False)

            first = [f"c2/{index}".encode() for index in range(30)]
            for payload in first:
                c2_producer.send(payload)
            from_west = [f"west/{index}".encode() for index in range(30)]
            for payload in from_west:
                west_producer.send(payload)
            seen_west = receive_covering(on_west, first + from_west)
            seen_c2 = receive_covering(on_c2, first + from_west)

            # The owner dies; the bundle moves to the other broker with the producer, and
            # replication goes on from there in both directions.
            owner.kill()
            second = [f"c2/{index}".encode() for index in range(30, 60)]
            for payload in second:
                c2_producer.send(payload)
            more_west = [f"west/{index}".encode() for index in range(30, 60)]
            for payload in more_west:
                west_producer.send(payload)
            seen_west += receive_covering(on_west, second + more_west)
            seen_c2 += receive_covering(on_c2, second + more_west)
            assert owner_of([entry], topic, via=entry) is entry

            for seen in (seen_west, seen_c2):
                firsts = list(dict.fromkeys(seen))
                assert [p for p in firsts if p.startswith(b"c2/")] == first + second
                assert [p for p in firsts if p.startswith(b"west/")] == from_west + more_west
        finally:
            c2_client.close()
            west_client.close()


def backlog(broker, topic: str, subscription: str):
    """The subscription's backlog as `broker`'s cluster reports it (through a redirect to the
    owner in cluster mode); None while it is not known."""
    path = f"/admin/v2/persistent/{topic.removeprefix('persistent://')}/stats"
    status, _, body = http("GET", broker.web_url + path)
    if status != 200:
        return None
    return json.loads(body)["subscriptions"].get(subscription, {}).get("msgBacklog")


def switch(topic: str, producer, from_client, to_client, to_broker, prefix: str) -> None:
    """A replicated subscription's graceful switch: 20 messages sent, 14 of them acknowledged
    (out of order) by a consumer of `from_client`'s cluster, which closes; once the other
    cluster (`to_broker`'s) has the state, a consumer of the same subscription there receives
    exactly the other 6."""
    sent = [f"{prefix}/{index}".encode() for index in range(20)]
    for payload in sent:
        producer.send(payload)
    consumer = from_client.subscribe(
        topic, "r", consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
        replicate_subscription_state_enabled=True,
    )
    received = {}
    while set(received) != set(sent):
        message = consumer.receive(timeout_millis=30_000)
        received[message.data()] = message
    acknowledged = set(sent[::2] + sent[1:8:2])
    for payload in reversed(sent):
        if payload in acknowledged:
            consumer.acknowledge(received[payload])
    consumer.close()
    left = [payload for payload in sent if payload not in acknowledged]
    # The switch waits for the state to reach the other cluster, as a user waits one interval.
    wait_until(lambda: backlog(to_broker, topic, "r") == len(left),
               "the other cluster applied the subscription's state")
    moved = to_client.subscribe(
        topic, "r", consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
        replicate_subscription_state_enabled=True,
    )
    got = []
    while not set(left) <= set(got):
        message = moved.receive(timeout_millis=30_000)
        got.append(message.data())
        moved.acknowledge(message)
    assert sorted(got) == sorted(left), got
    assert_no_more(moved, what="acknowledged in the other cluster")
    moved.close()


def test_a_replicated_subscription_switches_between_cluster_mode_and_standalone(
    etcd, object_store, broker_factory, meridian_bin, tmp_path_factory, tmp_path
):
    # Models consumers of a replicated subscription moving from a cluster-mode cluster, where a
    # non-owner is their entry point, to another cluster and back: each side receives exactly
    # what the other did not acknowledge (the state travels to and from the owner).
    west = broker_factory.start(config={"cluster_name": "west"})
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "rsub-broker", 2,
                        CURSOR_PERSIST_INTERVAL_MS) as brokers:
        entry, owner = brokers
        namespace = replicate_namespace(entry, west)
        topic = f"persistent://{namespace}/t"
        assert owner_of(brokers, topic, via=owner) is owner
        c2_client = new_client(entry, tmp_path, "c2-client")
        west_client = pulsar.Client(west.service_url, operation_timeout_seconds=30)
        try:
            # The subscription exists on both sides before anything is sent.
            for client in (c2_client, west_client):
                client.subscribe(topic, "r", consumer_type=pulsar.ConsumerType.Shared,
                                 replicate_subscription_state_enabled=True).close()
            producer = c2_client.create_producer(topic, batching_enabled=False)
            switch(topic, producer, c2_client, west_client, west, "to-west")
            switch(topic, producer, west_client, c2_client, entry, "to-c2")
        finally:
            c2_client.close()
            west_client.close()


def test_a_topic_deleted_and_created_again_in_cluster_mode_still_replicates(
    etcd, object_store, broker_factory, meridian_bin, tmp_path_factory, tmp_path
):
    # Models a user who deletes a replicated topic in the cluster-mode cluster and uses its name
    # again: the new topic's messages reach the other cluster too. (Entry ids of the new
    # object-store log start at 0 again, while the other cluster still remembers the old life's
    # origin positions: they must not be taken for the old life's entries.)
    west = broker_factory.start(config={"cluster_name": "west"})
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "recreate-broker", 1,
                        CURSOR_PERSIST_INTERVAL_MS) as brokers:
        (entry,) = brokers
        namespace = replicate_namespace(entry, west)
        topic = f"persistent://{namespace}/t"
        west_client = pulsar.Client(west.service_url, operation_timeout_seconds=30)
        try:
            on_west = west_client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            c2_client = new_client(entry, tmp_path, "c2-old")
            producer = c2_client.create_producer(topic, batching_enabled=False)
            old = [f"old/{index}".encode() for index in range(5)]
            for payload in old:
                producer.send(payload)
            assert receive_covering(on_west, old) == old
            c2_client.close()
            admin(entry.web_url, "DELETE",
                  f"/admin/v2/persistent/{topic.removeprefix('persistent://')}?force=true")

            c2_client = new_client(entry, tmp_path, "c2-new")
            producer = c2_client.create_producer(topic, batching_enabled=False)
            new = [f"new/{index}".encode() for index in range(5)]
            for payload in new:
                producer.send(payload)
            assert receive_covering(on_west, new) == new
            c2_client.close()
        finally:
            west_client.close()


def test_a_redirect_to_the_owner_keeps_https(
    etcd, object_store, meridian_bin, tmp_path_factory, tmp_path
):
    # Models an admin client (or another cluster's replicator, which sends its token along)
    # calling a topic's admin API over HTTPS on a broker that does not own the topic: the
    # redirect sends it to the owner's HTTPS port, never to its plain HTTP one, where the
    # request (and its credentials) would travel in the clear.
    certs = tmp_path_factory.mktemp("certs")
    make_ca(certs)
    make_server_cert(certs, "server", "meridian-server")
    ports = [free_port(), free_port()]
    settings = [{
        "web_port_tls": port,
        "tls_certificate_file_path": json.dumps(str(certs / "server.pem")),
        "tls_key_file_path": json.dumps(str(certs / "server.key")),
    } for port in ports]
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "https-broker", 2,
                        CURSOR_PERSIST_INTERVAL_MS, settings) as brokers:
        entry, owner = brokers
        _, topic = topic_owned_by(owner, brokers, entry, "https")
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        path = f"/admin/v2/persistent/{topic.removeprefix('persistent://')}/stats"
        connection = HTTPSConnection("127.0.0.1", ports[0], context=context, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        assert response.status == 307, response.status
        assert response.getheader("Location") == f"https://127.0.0.1:{ports[1]}{path}"


def test_a_replicated_subscription_keeps_syncing_after_the_owner_dies(
    etcd, object_store, broker_factory, meridian_bin, tmp_path_factory, tmp_path
):
    # Models a replicated subscription consumed in a cluster-mode cluster whose topic owner is
    # killed: the next owner (its copy names the same entries with a new ledger id) goes on
    # sending the subscription's state, so the other cluster ends up with exactly what the
    # consumers did not acknowledge, before and after the move.
    west = broker_factory.start(config={"cluster_name": "west"})
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "rsub-kill-broker",
                        2, CURSOR_PERSIST_INTERVAL_MS) as brokers:
        entry, owner = brokers
        namespace = replicate_namespace(entry, west)
        topic = f"persistent://{namespace}/t"
        assert owner_of(brokers, topic, via=owner) is owner
        c2_client = new_client(entry, tmp_path, "c2-client")
        west_client = pulsar.Client(west.service_url, operation_timeout_seconds=30)
        try:
            west_client.subscribe(topic, "r", consumer_type=pulsar.ConsumerType.Shared,
                                  replicate_subscription_state_enabled=True).close()
            consumer = c2_client.subscribe(
                topic, "r", consumer_type=pulsar.ConsumerType.Shared,
                initial_position=pulsar.InitialPosition.Earliest,
                replicate_subscription_state_enabled=True,
            )
            producer = c2_client.create_producer(topic, batching_enabled=False)
            sent = [f"m/{index}".encode() for index in range(20)]
            for payload in sent:
                producer.send(payload)
            received = {}
            while set(received) != set(sent):
                message = consumer.receive(timeout_millis=30_000)
                received[message.data()] = message
            before = set(sent[::2] + sent[1:8:2])  # 14, out of order
            for payload in reversed(sent):
                if payload in before:
                    consumer.acknowledge(received[payload])
            wait_until(lambda: backlog(west, topic, "r") == 6, "west applied the first state")

            owner.kill()
            # The consumer reconnects to the next owner, which redelivers the unacknowledged
            # messages; half of them are acknowledged there.
            left = [payload for payload in sent if payload not in before]
            redelivered = {}
            while not set(left) <= set(redelivered):
                message = consumer.receive(timeout_millis=30_000)
                redelivered[message.data()] = message
            after = set(left[::2])
            for payload in after:
                consumer.acknowledge(redelivered[payload])
            consumer.close()
            remaining = [payload for payload in left if payload not in after]
            wait_until(lambda: backlog(west, topic, "r") == len(remaining),
                       "west applied the state the next owner sent")
            moved = west_client.subscribe(
                topic, "r", consumer_type=pulsar.ConsumerType.Shared,
                initial_position=pulsar.InitialPosition.Earliest,
                replicate_subscription_state_enabled=True,
            )
            got = receive_covering(moved, remaining)
            assert sorted(got) == sorted(remaining), got
            assert_no_more(moved, what="acknowledged in c2, before or after its owner died")
        finally:
            c2_client.close()
            west_client.close()
