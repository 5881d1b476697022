"""The lookup front door (`meridian lookup`, docs/lookup.md) with the official client: clients
that know only the front door's URL are sent to their tenant's home cluster.

Two `meridian standalone` clusters (replication_harness.py) and one or two front door processes
(started here, stopped by pid). Tenants are created on one cluster or the other by hand; the
front door learns everything else from the clusters' admin APIs.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pulsar
import pytest

import pulsar_frames as frames
from broker_process import free_port
from helpers import unique
from replication_harness import (
    REPLICATION_TIMEOUT_S,
    await_condition,
    clusters_factory,  # noqa: F401 (fixture)
)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
# Deadline for the front door to notice a tenant's new home (it re-checks every 100 ms here).
FOLLOW_TIMEOUT_S = 30.0
RECEIVE_TIMEOUT_MS = 20_000


class FrontDoor:
    """One `meridian lookup` process on two free loopback ports."""

    def __init__(self, binary: Path, log_path: Path, cluster_urls: list[str]):
        self.binary = binary
        self.log_path = log_path
        self.cluster_urls = cluster_urls
        self.port = free_port()
        self.web_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def service_url(self) -> str:
        return f"pulsar://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def exited_unexpectedly(self):
        """For ClientFactory: the exit code if the process is gone, else None."""
        return None if self.process is None else self.process.poll()

    def start(self) -> "FrontDoor":
        command = [
            str(self.binary), "lookup",
            "--clusters", ",".join(self.cluster_urls),
            "--listen", f"127.0.0.1:{self.port}",
            "--web-listen", f"127.0.0.1:{self.web_port}",
            "--home-fresh-ms", "100",
            "--request-timeout-ms", "3000",
        ]
        log = open(self.log_path, "ab")
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (accepts(self.port) and accepts(self.web_port)):
            if self.process.poll() is not None:
                raise AssertionError(f"meridian lookup exited: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"meridian lookup not listening: {self.log_path.read_text()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"meridian lookup ignored SIGTERM: {self.log_path}")

    def errors(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines()
                if " ERROR " in line or "panicked at" in line]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def front_doors(meridian_bin, tmp_path, client_factory):
    """`front_doors(clusters, order)` → a started FrontDoor for the clusters named in `order`;
    every one is stopped by pid at teardown, and its log must hold no ERROR line."""
    started: list[FrontDoor] = []

    def make(clusters, order=("a", "b")) -> FrontDoor:
        door = FrontDoor(meridian_bin, tmp_path / f"lookup-{len(started)}.log",
                         [clusters[name].web_url for name in order])
        started.append(door)
        return door.start()

    yield make
    client_factory.close_all()
    for door in started:
        door.stop()
    problems = [line for door in started for line in door.errors()]
    assert not problems, "\n".join(problems)


def lookup(door: FrontDoor, topic: str) -> frames.Frame:
    """A raw LOOKUP of `topic` on the front door's binary port."""
    with frames.RawConnection(door.port) as connection:
        connection.handshake()
        return connection.request(frames.lookup_frame(topic, 1), frames.LOOKUP_RESPONSE)


def looked_up_url(door: FrontDoor, topic: str) -> str | None:
    """The broker URL a LOOKUP answers (None when it fails)."""
    reply = lookup(door, topic)
    url = reply.first(1)
    return url.decode() if url is not None else None


def http_lookup(door: FrontDoor, topic: str) -> dict:
    status, body = admin_get(door.http_url, "/lookup/v2/topic/" + topic.replace("://", "/"))
    assert status == 200, (status, body)
    return body


def admin_get(base: str, path: str):
    from replication_harness import admin_call
    return admin_call(base, "GET", path)


def produce_and_consume(client: pulsar.Client, topic: str, count: int = 10) -> list[bytes]:
    consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    producer = client.create_producer(topic)
    sent = [f"{topic}#{i}".encode() for i in range(count)]
    for payload in sent:
        producer.send(payload, partition_key=payload.decode())
    received = []
    while len(received) < count:
        message = consumer.receive(RECEIVE_TIMEOUT_MS)
        received.append(message.data())
        consumer.acknowledge(message)
    producer.close()
    consumer.close()
    assert sorted(received) == sorted(sent)
    return received


def messages_in(clusters, cluster: str, topic: str) -> int:
    stats = clusters.admin(cluster, "GET",
                           "/admin/v2/" + topic.replace("://", "/") + "/stats")
    return stats["msgInCounter"]


def test_each_tenant_is_served_by_its_home_and_two_copies_answer_alike(
    clusters_factory, front_doors, client_factory
):
    clusters = clusters_factory(names=("a", "b"))
    on_a, on_b = unique("home-a"), unique("home-b")
    clusters.create_tenant(on_a, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{on_a}/ns")
    clusters.create_tenant(on_b, on=["b"], allowed=["b"])
    clusters.admin("b", "PUT", f"/admin/v2/namespaces/{on_b}/ns")
    plain_a = f"persistent://{on_a}/ns/orders"
    plain_b = f"persistent://{on_b}/ns/orders"
    partitioned_b = f"persistent://{on_b}/ns/events"
    clusters.create_partitioned_topic("b", partitioned_b, 3)

    first, second = front_doors(clusters), front_doors(clusters, order=("b", "a"))
    client = client_factory(first)
    produce_and_consume(client, plain_a)
    produce_and_consume(client, plain_b)
    produce_and_consume(client, partitioned_b, count=30)
    # Each message was stored by its tenant's home, and only there.
    assert messages_in(clusters, "a", plain_a) == 10
    assert messages_in(clusters, "b", plain_b) == 10
    status, _ = clusters.call("a", "GET", f"/admin/v2/tenants/{on_b}")
    assert status == 404

    # A client configured with the second copy's HTTP URL (HTTP lookup) works the same.
    http_client = pulsar.Client(second.http_url, operation_timeout_seconds=30)
    try:
        produce_and_consume(http_client, partitioned_b, count=6)
    finally:
        http_client.close()
    assert clusters.partitioned_stats("b", partitioned_b)["msgInCounter"] == 36

    # The two copies (members listed in another order) answer the same, in both protocols.
    for topic, home in [(plain_a, "a"), (plain_b, "b"), (f"{partitioned_b}-partition-1", "b")]:
        for door in (first, second):
            assert looked_up_url(door, topic) == clusters[home].service_url, (topic, door.port)
            answer = http_lookup(door, topic)
            assert answer["brokerUrl"] == clusters[home].service_url
            assert answer["httpUrl"] == clusters[home].web_url
    for door in (first, second):
        with frames.RawConnection(door.port) as connection:
            connection.handshake()
            connection.ping()
            reply = connection.request(frames.partitioned_metadata_frame(partitioned_b, 7),
                                       frames.PARTITIONED_METADATA_RESPONSE)
            assert reply.first(1) == 3 and reply.first(2) == 7
            # Anything else is refused with an error that says what the front door serves.
            refused = connection.request(frames.producer_frame(plain_a, 1, 8), frames.ERROR)
            assert refused.first(1) == 8
            assert refused.first(2) == frames.SERVER_ERROR_NOT_ALLOWED
            assert b"lookup front door" in refused.first(3)
        status, body = admin_get(door.http_url, "/admin/v2/" + partitioned_b.replace("://", "/")
                                 + "/partitions")
        assert status == 200 and body["partitions"] == 3

    # A name the front door cannot parse is refused as such.
    reply = lookup(first, "persistent://not a tenant/ns/t")
    assert reply.first(3) == frames.LOOKUP_FAILED
    assert reply.first(6) == frames.SERVER_ERROR_INVALID_TOPIC_NAME

    # Bad input closes only that connection: a frame over the front door's 64 KiB limit, a
    # first command other than CONNECT.
    with frames.RawConnection(first.port) as connection:
        connection.handshake()
        connection.send(struct.pack(">I", 1 << 20) + b"x" * 64)
        assert connection.frames_until_closed() == []
    with frames.RawConnection(first.port) as connection:
        connection.send(frames.ping_frame())
        assert connection.frames_until_closed() == []
    assert looked_up_url(first, plain_a) == clusters["a"].service_url


def test_clients_follow_a_tenant_whose_home_changes(clusters_factory, front_doors, client_factory):
    # The tenant exists on a and b (a migration under way): a, the source with the record, is
    # home, whatever the order of --clusters says. Then it is deleted on a: b is home, and a
    # producer configured with the front door's URL carries on there.
    clusters = clusters_factory(names=("a", "b"))
    tenant = unique("moving")
    namespace = f"{tenant}/ns"
    topic = f"persistent://{namespace}/orders"
    clusters.create_tenant(tenant, on=["a"], allowed=["a"])
    clusters.admin("a", "PUT", f"/admin/v2/namespaces/{namespace}")
    door = front_doors(clusters, order=("b", "a"))
    client = client_factory(door)
    producer = client.create_producer(topic)
    producer.send(b"on a")
    assert messages_in(clusters, "a", topic) == 1

    clusters.admin("a", "POST", f"/admin/v2/tenants/{tenant}/migration", {"targetCluster": "b"})
    await_condition(lambda: clusters.call("b", "GET", f"/admin/v2/tenants/{tenant}")[0] == 200,
                    REPLICATION_TIMEOUT_S, "the migration to create the tenant on b")
    # b has the tenant too and comes first in --clusters, but a's record makes a the home
    # (before producersRedirected): for the front door that knew a as the home, and for a
    # fresh copy that has to ask both clusters.
    fresh = front_doors(clusters, order=("b", "a"))
    for copy in (door, fresh):
        assert looked_up_url(copy, topic) == clusters["a"].service_url
    producer.send(b"still on a")
    assert messages_in(clusters, "a", topic) == 2

    # The tenant leaves a (the migration aborted and the tenant deleted there; b keeps its own).
    clusters.admin("a", "DELETE", f"/admin/v2/tenants/{tenant}/migration")
    await_condition(lambda: clusters.call("a", "GET", f"/admin/v2/tenants/{tenant}/migration")[0]
                    == 404, REPLICATION_TIMEOUT_S, "the abort to finish")
    clusters.create_tenant(tenant, on=["b"], allowed=["b"])
    clusters.call("b", "PUT", f"/admin/v2/namespaces/{namespace}")
    clusters.admin("a", "DELETE", f"/admin/v2/namespaces/{namespace}?force=true")
    clusters.admin("a", "DELETE", f"/admin/v2/tenants/{tenant}")
    await_condition(lambda: looked_up_url(door, topic) == clusters["b"].service_url,
                    FOLLOW_TIMEOUT_S, "the front door to send the tenant to b")
    # The producer was closed by the deletion on a; it looked the topic up again through the
    # front door and now writes to b.
    producer.send(b"on b")
    assert messages_in(clusters, "b", topic) >= 1
    consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
    assert consumer.receive(RECEIVE_TIMEOUT_MS).data() == b"on b"


def test_an_unreachable_cluster_gives_a_retriable_error_never_a_wrong_home(
    clusters_factory, front_doors, client_factory
):
    clusters = clusters_factory(names=("a", "b"))
    known, unknown = unique("known"), unique("unknown")
    for tenant in (known, unknown):
        clusters.create_tenant(tenant, on=["a"], allowed=["a"])
        clusters.admin("a", "PUT", f"/admin/v2/namespaces/{tenant}/ns")
    door = front_doors(clusters)
    assert looked_up_url(door, f"persistent://{known}/ns/t") == clusters["a"].service_url

    clusters["b"].broker.kill()
    # A tenant whose home is not known yet: b might be the source of a migration of it, so the
    # front door does not guess a.
    reply = lookup(door, f"persistent://{unknown}/ns/t")
    assert reply.first(3) == frames.LOOKUP_FAILED
    assert reply.first(6) == frames.SERVER_ERROR_SERVICE_NOT_READY
    assert clusters["b"].web_url.encode() in reply.first(7), reply.first(7)
    status, body = admin_get(door.http_url, f"/lookup/v2/topic/persistent/{unknown}/ns/t")
    assert status == 503 and clusters["b"].web_url in body["reason"], (status, body)
    # The official client fails the same way (after retrying) instead of using a wrong cluster.
    client = client_factory(door, operation_timeout_seconds=3)
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(f"persistent://{unknown}/ns/t")
    # A tenant whose home is known is checked at its home alone, which is up.
    produce_and_consume(client_factory(door), f"persistent://{known}/ns/t", count=3)

    clusters["b"].broker.start()
    await_condition(lambda: looked_up_url(door, f"persistent://{unknown}/ns/t")
                    == clusters["a"].service_url, FOLLOW_TIMEOUT_S,
                    "the lookup to succeed once b is back")
