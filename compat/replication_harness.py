"""Multi-cluster harness for the geo-replication tests: N brokers, a fault proxy on every link,
the cluster registry, tenants and namespaces, stats, and an exactly-once checker.

`Clusters` (made through the `clusters_factory` fixture) starts one `meridian standalone` per
cluster name through the suite's own `broker_factory` (so the log rule, the failure reports and
the teardown by pid all apply; the cluster name is the `cluster_name` config key, which is what
`--cluster-name` sets), then:

- starts one `FaultProxy` per *ordered* link: `clusters.link("a", "b")` forwards to b's binary
  port, and a's registry entry for b names it as `proxyServiceUrl`, so every byte a's
  replicators send to b crosses it (and only those: b's replicators to a use the b→a link);
- registers every cluster on every broker (`PUT /admin/v2/clusters/{name}`; a broker's own
  entry, which it creates at start, is updated with `POST`):
  `{"serviceUrl": "http://127.0.0.1:<web port>", "brokerServiceUrl": "pulsar://127.0.0.1:<binary
  port>", "proxyServiceUrl": "pulsar://127.0.0.1:<port of the link's proxy>", "proxyProtocol":
  "SNI"}` (no proxy fields in a broker's own entry).

Each broker has its own metadata (as Pulsar clusters with per-cluster configuration stores), so
tenants, namespaces and replication lists are configured on each cluster separately:
`create_replicated_namespace("t/ns", ["a", "b"], on=["a"])` configures only a.

Teardown (also when the test failed): clients are closed, then every broker is stopped by pid
(while the proxies still forward, so shutdown is orderly), then every proxy is closed.

`History` records every send (producer, cluster, payload, whether the broker acknowledged it)
and every receive (cluster, payload, properties, key, times, partition, producer name);
`check_exactly_once` compares what each cluster received with what it should have: nothing
missing, nothing twice, nothing unexpected, per-producer order as sent. Payloads name their
producer and counter (`make_payload("a", 7) == b"a#000007|"`), so order can be checked.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Hashable, Iterable, Mapping, Optional, Sequence

import pulsar
import pytest

from broker_process import BrokerError, BrokerProcess, toml_value
from fault_proxy import FaultProxy
from helpers import unique

ADMIN_TIMEOUT_S = 20
# Deadline for replicated data and replicator states to show up (debug build, 2 cores, several
# brokers): generous, because a slow machine must make the tests slower, not wrong.
REPLICATION_TIMEOUT_S = 90.0
# After everything expected has arrived, how long a consumer must stay quiet before the test
# concludes that nothing more (duplicates, unwanted messages) is coming.
QUIET_WINDOW_S = 2.0
REPL_POSITION_PROPERTY = "__MSG_PROP_REPL_SOURCE_POSITION"


# ------------------------------------------------------------------ conditions


def await_condition(fn: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll `fn` until it returns something truthy, and return that.

    Lookup errors, assertion errors and admin errors raised by `fn` count as "not yet" (stats
    without the expected section, a topic not created yet); the last value or error is named
    in the failure, which is raised when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = f"last value: {value!r}"
        except (LookupError, AssertionError, AdminError, TypeError, ValueError) as error:
            last = f"last error: {type(error).__name__}: {error}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what} ({last})")
        time.sleep(interval)


# ------------------------------------------------------------------ payloads


def make_payload(producer_id: str, counter: int, padding: int = 0) -> bytes:
    """`<producer>#<counter>|` plus `padding` filler bytes."""
    return f"{producer_id}#{counter:06d}|".encode() + b"." * padding


def parse_payload(payload: bytes) -> tuple[str, int]:
    """(producer id, counter) of a payload made by `make_payload`."""
    head = payload.split(b"|", 1)[0].decode()
    producer_id, counter = head.rsplit("#", 1)
    return producer_id, int(counter)


def topic_path(topic: str) -> str:
    """`persistent://t/ns/x` → `/admin/v2/persistent/t/ns/x`."""
    domain, rest = topic.split("://", 1)
    return f"/admin/v2/{domain}/{rest}"


# ------------------------------------------------------------------ history


@dataclasses.dataclass
class SendRecord:
    producer: str
    cluster: str
    counter: int
    payload: bytes
    properties: dict
    key: Optional[str]
    event_timestamp: Optional[int]
    # None while the send is in flight; then pulsar.Result.Ok or the failure.
    result: Optional[object] = None
    message_id: Optional[object] = None

    @property
    def acked(self) -> bool:
        return self.result == pulsar.Result.Ok


@dataclasses.dataclass
class ReceiveRecord:
    cluster: str
    payload: bytes
    properties: dict
    key: Optional[str]
    event_timestamp: int
    publish_timestamp: int
    producer_name: str
    topic: str
    partition: int
    redelivery_count: int


class History:
    """Every send and every receive of a test, from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sends: dict[bytes, SendRecord] = {}
        self.send_order: list[bytes] = []
        self.receives: dict[str, list[ReceiveRecord]] = collections.defaultdict(list)

    # sends

    def record_send(
        self,
        producer: str,
        cluster: str,
        counter: int,
        payload: bytes,
        properties: Optional[dict] = None,
        key: Optional[str] = None,
        event_timestamp: Optional[int] = None,
    ) -> SendRecord:
        record = SendRecord(
            producer, cluster, counter, payload, dict(properties or {}), key, event_timestamp
        )
        with self.lock:
            if payload in self.sends:
                raise ValueError(f"payload {payload!r} sent twice by the test itself")
            self.sends[payload] = record
            self.send_order.append(payload)
        return record

    def settle_send(self, payload: bytes, result, message_id=None) -> None:
        with self.lock:
            record = self.sends[payload]
            record.result = result
            record.message_id = message_id

    def send(self, producer_obj, producer: str, cluster: str, counter: int, **kwargs) -> SendRecord:
        """Synchronous send of `make_payload(producer, counter)`, recorded (raises on failure)."""
        payload = make_payload(producer, counter, kwargs.pop("padding", 0))
        record = self.record_send(
            producer, cluster, counter, payload, kwargs.get("properties"),
            kwargs.get("partition_key"), kwargs.get("event_timestamp"),
        )
        message_id = producer_obj.send(payload, **kwargs)
        self.settle_send(payload, pulsar.Result.Ok, message_id)
        return record

    def send_async(self, producer_obj, producer: str, cluster: str, counter: int, **kwargs):
        """`send_async` of `make_payload(producer, counter)`; the outcome is recorded."""
        payload = make_payload(producer, counter, kwargs.pop("padding", 0))
        self.record_send(
            producer, cluster, counter, payload, kwargs.get("properties"),
            kwargs.get("partition_key"), kwargs.get("event_timestamp"),
        )

        def done(result, message_id):
            self.settle_send(payload, result, message_id)

        producer_obj.send_async(payload, done, **kwargs)
        return payload

    def sent(self, producer: Optional[str] = None, acked_only: bool = False) -> list[SendRecord]:
        """Sends in the order the test made them (optionally one producer's, only acked)."""
        with self.lock:
            records = [self.sends[payload] for payload in self.send_order]
        return [
            record
            for record in records
            if (producer is None or record.producer == producer)
            and (not acked_only or record.acked)
        ]

    def sent_payloads(self, producer: Optional[str] = None, acked_only: bool = True) -> list[bytes]:
        return [record.payload for record in self.sent(producer, acked_only)]

    def unsettled(self) -> int:
        with self.lock:
            return sum(1 for record in self.sends.values() if record.result is None)

    def failed(self) -> list[SendRecord]:
        with self.lock:
            return [r for r in self.sends.values() if r.result is not None and not r.acked]

    def await_settled(self, timeout: float = REPLICATION_TIMEOUT_S) -> None:
        await_condition(lambda: self.unsettled() == 0, timeout, "every send was settled")

    # receives

    def record_receive(self, cluster: str, message) -> ReceiveRecord:
        record = ReceiveRecord(
            cluster=cluster,
            payload=message.data(),
            properties=dict(message.properties()),
            key=message.partition_key() or None,
            event_timestamp=message.event_timestamp(),
            publish_timestamp=message.publish_timestamp(),
            producer_name=message.producer_name(),
            topic=message.topic_name(),
            partition=message.message_id().partition(),
            redelivery_count=message.redelivery_count(),
        )
        with self.lock:
            self.receives[cluster].append(record)
        return record

    def received(self, cluster: str) -> list[ReceiveRecord]:
        with self.lock:
            return list(self.receives[cluster])

    def received_payloads(self, cluster: str) -> list[bytes]:
        return [record.payload for record in self.received(cluster)]

    def received_count(self, cluster: str) -> int:
        with self.lock:
            return len(self.receives[cluster])

    def collect(
        self,
        consumers: Mapping[str, object],
        expected_counts: Mapping[str, int],
        timeout: float = REPLICATION_TIMEOUT_S,
        quiet: float = QUIET_WINDOW_S,
        ack: bool = True,
    ) -> None:
        """Receive (and ack) from every cluster's consumer or reader until each has at least
        its expected count, then keep receiving until all stay quiet for `quiet` seconds, so
        that duplicates and unwanted extras are seen too.

        Does not fail by itself when the deadline passes: `check_exactly_once` then says what
        is missing, which is the better report.
        """
        deadline = time.monotonic() + timeout

        def short() -> bool:
            return any(
                self.received_count(cluster) < count for cluster, count in expected_counts.items()
            )

        while short() and time.monotonic() < deadline:
            self._poll(consumers, 100, ack)
        if short():
            return
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet:
            if self._poll(consumers, 100, ack):
                quiet_since = time.monotonic()

    def _poll(self, consumers: Mapping[str, object], timeout_ms: int, ack: bool) -> bool:
        """One round over the receivers: wait up to a share of `timeout_ms` on each, then take
        whatever else it has buffered. True if anything arrived."""
        got = False
        share = max(10, timeout_ms // max(1, len(consumers)))
        for cluster, receiver in consumers.items():
            wait = share
            while True:
                try:
                    if hasattr(receiver, "read_next"):
                        message = receiver.read_next(timeout_millis=wait)
                    else:
                        message = receiver.receive(timeout_millis=wait)
                except pulsar.Timeout:
                    break
                got = True
                wait = 1
                self.record_receive(cluster, message)
                if ack and not hasattr(receiver, "read_next"):
                    receiver.acknowledge(message)
        return got


def check_exactly_once(
    expected_payloads_by_cluster: Mapping[str, Sequence[bytes]],
    received: "History | Mapping[str, Sequence[bytes]]",
    optional_payloads_by_cluster: Optional[Mapping[str, Iterable[bytes]]] = None,
    order_group: Optional[Callable[[str, bytes], Hashable]] = None,
) -> None:
    """Assert, for each cluster: every expected payload received, none twice, nothing else
    (optional payloads may be there or not, but not twice), and each producer's payloads in
    the order their counters give (the send order). `order_group(cluster, payload)` refines the
    ordering groups (e.g. per partition: a producer's order only holds within a partition).

    Reports every cluster's problems together.
    """
    optional_by_cluster = optional_payloads_by_cluster or {}
    problems = []
    for cluster, expected in expected_payloads_by_cluster.items():
        got = (
            received.received_payloads(cluster)
            if isinstance(received, History)
            else list(received.get(cluster, []))
        )
        expected_set = set(expected)
        optional = set(optional_by_cluster.get(cluster, ())) - expected_set
        counts = collections.Counter(got)
        duplicates = sorted(payload for payload, n in counts.items() if n > 1)
        missing = sorted(expected_set - counts.keys())
        unexpected = sorted(counts.keys() - expected_set - optional)
        out_of_order = []
        last_counter: dict[Hashable, tuple[int, bytes]] = {}
        for payload in got:
            try:
                producer, counter = parse_payload(payload)
            except ValueError:
                continue  # reported as unexpected
            group = order_group(cluster, payload) if order_group else producer
            previous = last_counter.get(group)
            if previous is not None and counter <= previous[0]:
                out_of_order.append((previous[1], payload))
            last_counter[group] = (counter, payload)
        if duplicates or missing or unexpected or out_of_order:
            problems.append(
                f"cluster {cluster}: received {len(got)} messages, expected {len(expected_set)}"
                + (f" (+{len(optional)} optional)" if optional else "")
                + _listing("missing", missing)
                + _listing("received more than once", [(p, counts[p]) for p in duplicates])
                + _listing("not expected here", unexpected)
                + _listing("out of producer order (previous, this)", out_of_order)
            )
    assert not problems, "exactly-once check failed:\n" + "\n".join(problems)


def _listing(what: str, items: list) -> str:
    if not items:
        return ""
    shown = ", ".join(repr(item) for item in items[:12])
    return f"\n  {what} ({len(items)}): {shown}{' ...' if len(items) > 12 else ''}"


# ------------------------------------------------------------------ producer threads


class ProducerThread(threading.Thread):
    """Sends `make_payload(producer_id, i)` for i = 0.. with send_async until stopped (or
    `limit`), recording every send and its outcome in `history`. `rate` (messages per second)
    paces the load so that faults land mid-stream; `send_kwargs(i)` adds per-message options.
    """

    def __init__(
        self,
        history: History,
        producer,
        producer_id: str,
        cluster: str,
        limit: int,
        rate: Optional[float] = None,
        send_kwargs: Optional[Callable[[int], dict]] = None,
    ):
        super().__init__(daemon=True, name=f"producer-{producer_id}")
        self.history = history
        self.producer = producer
        self.producer_id = producer_id
        self.cluster = cluster
        self.limit = limit
        self.rate = rate
        self.send_kwargs = send_kwargs or (lambda index: {})
        self.halt = threading.Event()
        self.count = 0
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self.halt.is_set() and self.count < self.limit:
                index = self.count
                self.history.send_async(
                    self.producer, self.producer_id, self.cluster, index, **self.send_kwargs(index)
                )
                self.count += 1
                if self.rate:
                    ahead = started + self.count / self.rate - time.monotonic()
                    if ahead > 0:
                        self.halt.wait(ahead)  # pacing the load, not a synchronisation
        except BaseException as error:  # surfaced by stop()
            self.error = error

    def acked(self) -> int:
        return len(self.history.sent(self.producer_id, acked_only=True))

    def stop(self, settle_timeout: float = REPLICATION_TIMEOUT_S) -> None:
        """Stop sending, flush, and wait until every send has an outcome."""
        self.halt.set()
        self.join(60)
        assert not self.is_alive(), f"producer {self.producer_id} did not stop"
        assert self.error is None, f"producer {self.producer_id} failed: {self.error!r}"
        self.producer.flush()
        await_condition(
            lambda: all(r.result is not None for r in self.history.sent(self.producer_id)),
            settle_timeout,
            f"every send of producer {self.producer_id} was settled",
        )


class ConsumerThread(threading.Thread):
    """Receives (and acks) from one consumer until stopped, recording under `label` (usually
    the cluster name) in `history`. With `ack_window` > 1 it acknowledges each window of that
    many messages in reverse order, and what it holds when nothing arrives for a moment: its
    acknowledgements leave gaps that only fill later (out-of-order acknowledgement)."""

    def __init__(self, history: History, label: str, consumer, ack: bool = True,
                 ack_window: int = 1):
        super().__init__(daemon=True, name=f"consumer-{label}")
        self.history = history
        self.label = label
        self.consumer = consumer
        self.ack = ack
        self.ack_window = ack_window
        self.halt = threading.Event()
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        window = []
        try:
            while not self.halt.is_set():
                try:
                    message = self.consumer.receive(timeout_millis=100)
                except pulsar.Timeout:
                    message = None
                if message is not None:
                    self.history.record_receive(self.label, message)
                    if self.ack:
                        window.append(message)
                if len(window) >= self.ack_window or (message is None and window):
                    for held in reversed(window):
                        self.consumer.acknowledge(held)
                    window = []
        except BaseException as error:  # surfaced by stop()
            self.error = error

    def count(self) -> int:
        return self.history.received_count(self.label)

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), f"consumer thread {self.label} did not stop"
        assert self.error is None, f"consumer {self.label} failed: {self.error!r}"


# ------------------------------------------------------------------ admin


class AdminError(Exception):
    """An admin call answered with an unexpected status."""

    def __init__(self, method: str, url: str, status: Optional[int], body):
        super().__init__(f"{method} {url}: {status} {body}")
        self.status = status
        self.body = body


def admin_call(web_url: str, method: str, path: str, body=None) -> tuple[Optional[int], object]:
    """(status, parsed JSON or text); status None if the broker did not answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        web_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return None, repr(error)
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


# ------------------------------------------------------------------ clusters


@dataclasses.dataclass
class Cluster:
    name: str
    broker: BrokerProcess

    @property
    def web_url(self) -> str:
        return self.broker.web_url

    @property
    def service_url(self) -> str:
        return self.broker.service_url

    @property
    def broker_port(self) -> int:
        return self.broker.broker_port


class Clusters:
    """Brokers named after clusters, a fault proxy per directed link, and admin helpers."""

    def __init__(
        self,
        broker_factory,
        client_factory,
        names: Sequence[str] = ("a", "b", "c"),
        config: Optional[dict] = None,
        configs: Optional[Mapping[str, dict]] = None,
    ):
        if len(set(names)) != len(names):
            raise ValueError(f"cluster names must be distinct: {names}")
        self.broker_factory = broker_factory
        self.client_factory = client_factory
        self.names = list(names)
        self.config = dict(config or {})
        self.configs = dict(configs or {})
        self.clusters: dict[str, Cluster] = {}
        self.proxies: dict[tuple[str, str], FaultProxy] = {}
        self._clients: dict[str, pulsar.Client] = {}
        self.threads: list[threading.Thread] = []
        self.closed = False

    # ---------------------------------------------------------------- life cycle

    def start(self) -> "Clusters":
        for name in self.names:
            config = {**self.config, **self.configs.get(name, {}), "cluster_name": name}
            self.clusters[name] = Cluster(name, self.broker_factory.start(config=config))
        for source in self.names:
            for remote in self.names:
                if source != remote:
                    self.proxies[(source, remote)] = FaultProxy(
                        ("127.0.0.1", self.clusters[remote].broker_port), name=f"{source}->{remote}"
                    )
        for name in self.names:
            self.register_clusters(name)
        return self

    def register_clusters(self, on: str) -> None:
        """Registers every cluster in `on`'s cluster registry (own entry without a proxy)."""
        for name in self.names:
            target = self.clusters[name]
            data = {
                "serviceUrl": target.web_url,
                "brokerServiceUrl": target.service_url,
            }
            if name != on:
                data["proxyServiceUrl"] = self.link(on, name).url
                data["proxyProtocol"] = "SNI"
            status, body = self.call(on, "PUT", f"/admin/v2/clusters/{name}", data)
            if status == 409:  # the broker registers its own cluster when it starts
                self.admin(on, "POST", f"/admin/v2/clusters/{name}", data)
            elif status is None or not 200 <= status < 300:
                raise AdminError("PUT", f"{on}:/admin/v2/clusters/{name}", status, body)

    def close(self) -> None:
        """Clients closed, brokers stopped by pid (proxies still up), proxies closed."""
        if self.closed:
            return
        self.closed = True
        failures = []
        try:
            for thread in self.threads:  # halted before their clients close under them
                thread.halt.set()
            for thread in self.threads:
                thread.join(30)
            self.client_factory.close_all()
            for cluster in self.clusters.values():
                try:
                    cluster.broker.stop()
                except BrokerError as error:
                    failures.append(str(error))
                finally:
                    cluster.broker.kill()  # no-op unless stop() left it running
        finally:
            for proxy in self.proxies.values():
                try:
                    proxy.close()
                except Exception as error:  # keep closing the others
                    failures.append(f"closing {proxy!r}: {error!r}")
        if failures:
            pytest.fail("\n\n".join(failures), pytrace=False)

    def reconfigure(self, name: str, **changes) -> None:
        """Restarts cluster `name`'s broker (same ports and data) with `changes` applied to
        its configuration file, as an operator changing a setting would."""
        broker = self.clusters[name].broker
        config = {**self.config, **self.configs.get(name, {}), "cluster_name": name}
        self.configs[name] = {**self.configs.get(name, {}), **changes}
        config.update(changes)
        broker.stop()
        broker.config_path.write_text(
            "".join(f"{key} = {toml_value(value)}\n" for key, value in config.items())
        )
        broker.start()

    def metrics(self, name: str) -> str:
        """Cluster `name`'s Prometheus metrics (`GET /metrics`)."""
        with urllib.request.urlopen(f"{self.clusters[name].web_url}/metrics", timeout=30) as reply:
            return reply.read().decode()

    def log_lines(self, name: str, *needles: str) -> list[str]:
        """The lines of cluster `name`'s broker log that contain every one of `needles`."""
        return [
            line for line in self.clusters[name].broker.log_text().splitlines()
            if all(needle in line for needle in needles)
        ]

    # ---------------------------------------------------------------- access

    def __getitem__(self, name: str) -> Cluster:
        return self.clusters[name]

    def link(self, source: str, remote: str) -> FaultProxy:
        """The proxy every replication connection from `source` to `remote` goes through."""
        return self.proxies[(source, remote)]

    def client(self, cluster: str) -> pulsar.Client:
        """The test's official client for `cluster` (connected to that cluster's broker only)."""
        if cluster not in self._clients:
            self._clients[cluster] = self.new_client(cluster)
        return self._clients[cluster]

    def new_client(self, cluster: str, **kwargs) -> pulsar.Client:
        """Another client for `cluster`, with client options (closed at teardown)."""
        return self.client_factory(self.clusters[cluster].broker, **kwargs)

    def start_producer(self, history: History, producer, producer_id: str, cluster: str,
                       limit: int = 100_000, rate: Optional[float] = None,
                       send_kwargs: Optional[Callable[[int], dict]] = None) -> ProducerThread:
        """A started ProducerThread (halted at teardown if the test does not stop it)."""
        thread = ProducerThread(history, producer, producer_id, cluster, limit, rate, send_kwargs)
        self.threads.append(thread)
        thread.start()
        return thread

    def start_consumer(self, history: History, label: str, consumer, ack: bool = True) -> ConsumerThread:
        """A started ConsumerThread (halted at teardown if the test does not stop it)."""
        thread = ConsumerThread(history, label, consumer, ack)
        self.threads.append(thread)
        thread.start()
        return thread

    # ---------------------------------------------------------------- admin

    def call(self, cluster: str, method: str, path: str, body=None) -> tuple[Optional[int], object]:
        return admin_call(self.clusters[cluster].web_url, method, path, body)

    def admin(self, cluster: str, method: str, path: str, body=None):
        """An admin call that must succeed (2xx); returns the parsed body."""
        status, value = self.call(cluster, method, path, body)
        if status is None or not 200 <= status < 300:
            raise AdminError(method, f"{cluster}:{path}", status, value)
        return value

    def create_tenant(self, tenant: str, on: Iterable[str], allowed: Optional[list] = None) -> None:
        """The tenant on each cluster in `on`, allowed on `allowed` (default: every cluster)."""
        body = {"adminRoles": [], "allowedClusters": list(allowed or self.names)}
        for cluster in on:
            status, value = self.call(cluster, "PUT", f"/admin/v2/tenants/{tenant}", body)
            if status == 409:
                continue  # already there (an earlier namespace of the same test)
            if status is None or not 200 <= status < 300:
                raise AdminError("PUT", f"{cluster}:/admin/v2/tenants/{tenant}", status, value)

    def set_replication(self, cluster: str, namespace: str, clusters: Sequence[str]) -> None:
        """`POST /admin/v2/namespaces/{namespace}/replication` on one cluster."""
        self.admin(cluster, "POST", f"/admin/v2/namespaces/{namespace}/replication", list(clusters))

    def get_replication(self, cluster: str, namespace: str) -> list:
        return self.admin(cluster, "GET", f"/admin/v2/namespaces/{namespace}/replication")

    def create_replicated_namespace(
        self, tenant_ns: str, clusters: Sequence[str], on: Optional[Sequence[str]] = None
    ) -> str:
        """On each cluster in `on` (default: `clusters`): the tenant (allowed everywhere), the
        namespace, and its replication list set to `clusters`. Each cluster is configured by
        hand, as with per-cluster configuration stores. Returns `tenant_ns`.
        """
        tenant, _ = tenant_ns.split("/", 1)
        targets = list(on if on is not None else clusters)
        self.create_tenant(tenant, targets)
        for cluster in targets:
            status, value = self.call(cluster, "PUT", f"/admin/v2/namespaces/{tenant_ns}")
            if status != 409 and (status is None or not 200 <= status < 300):
                raise AdminError("PUT", f"{cluster}:/admin/v2/namespaces/{tenant_ns}", status, value)
            self.set_replication(cluster, tenant_ns, clusters)
        return tenant_ns

    def new_namespace(self, prefix: str = "geo") -> str:
        """A fresh `tenant/ns` name (nothing created)."""
        return f"{unique(prefix)}/ns"

    def create_partitioned_topic(self, cluster: str, topic: str, partitions: int) -> None:
        self.admin(cluster, "PUT", f"{topic_path(topic)}/partitions", partitions)

    def partitions(self, cluster: str, topic: str) -> int:
        """The partition count `cluster` has for `topic` (0: not partitioned or unknown)."""
        return self.admin(cluster, "GET", f"{topic_path(topic)}/partitions")["partitions"]

    def topics(self, cluster: str, namespace: str) -> list:
        """`GET /admin/v2/persistent/{namespace}`: every topic (and partition) `cluster` has."""
        return self.admin(cluster, "GET", f"/admin/v2/persistent/{namespace}")

    def read_all(
        self, history: History, cluster: str, topic: str, expected_count: int,
        label: Optional[str] = None, timeout: float = REPLICATION_TIMEOUT_S,
    ) -> list[bytes]:
        """What `cluster` stores for a non-partitioned `topic`, read from the earliest message
        by a fresh reader (no subscription, no acknowledgement state involved): at least
        `expected_count` messages are awaited, then the reader must stay quiet for
        QUIET_WINDOW_S. Recorded in `history` under `label` (default `<cluster>-stored`)."""
        label = label or f"{cluster}-stored"
        reader = self.client(cluster).create_reader(topic, pulsar.MessageId.earliest)
        try:
            history.collect({label: reader}, {label: expected_count}, timeout)
        finally:
            reader.close()
        return history.received_payloads(label)

    # ---------------------------------------------------------------- stats

    def internal_stats(self, cluster: str, topic: str) -> dict:
        """`GET .../{topic}/internalStats` (its `cursors` include `pulsar.repl.<remote>`)."""
        return self.admin(cluster, "GET", f"{topic_path(topic)}/internalStats")

    def stats(self, cluster: str, topic: str) -> dict:
        """`GET /admin/v2/persistent/{t}/{ns}/{topic}/stats` on `cluster`."""
        return self.admin(cluster, "GET", f"{topic_path(topic)}/stats")

    def partitioned_stats(self, cluster: str, topic: str, per_partition: bool = False) -> dict:
        query = "?perPartition=true" if per_partition else ""
        return self.admin(cluster, "GET", f"{topic_path(topic)}/partitioned-stats{query}")

    def replication_stats(self, cluster: str, topic: str, remote: str) -> dict:
        """`stats(cluster, topic)["replication"][remote]` (KeyError while it is absent)."""
        return self.stats(cluster, topic)["replication"][remote]

    def await_replication_stats(
        self, cluster: str, topic: str, remote: str, predicate: Callable[[dict], bool],
        what: str, timeout: float = REPLICATION_TIMEOUT_S,
    ) -> dict:
        """Waits until `predicate(stats(cluster, topic)["replication"][remote])` holds and
        returns that section; on timeout the failure shows the last section seen."""
        seen: list = [None]

        def check():
            section = self.replication_stats(cluster, topic, remote)
            seen[0] = section
            return section if predicate(section) else None

        try:
            return await_condition(check, timeout, what)
        except AssertionError as error:
            raise AssertionError(
                f"{error}\nlast stats of {cluster} for {topic}, replication.{remote}: {seen[0]}"
            ) from None

    def await_replicator(
        self, cluster: str, topic: str, remote: str, connected: bool = True,
        timeout: float = REPLICATION_TIMEOUT_S,
    ) -> dict:
        """Waits until `cluster`'s stats for `topic` show the replicator to `remote` with
        `connected` as given; returns that stats section."""
        return self.await_replication_stats(
            cluster, topic, remote, lambda section: section["connected"] is connected,
            f"{cluster}'s stats of {topic} show the replicator to {remote} connected={connected}",
            timeout,
        )


@pytest.fixture
def clusters_factory(broker_factory, client_factory):
    """`clusters_factory(names=("a", "b", "c"), config=None, configs=None)` → started Clusters.

    Every Clusters made is closed at teardown (before the brokers' own fixture checks their
    logs), whether the test passed or not.
    """
    made: list[Clusters] = []

    def make(names: Sequence[str] = ("a", "b", "c"), **kwargs) -> Clusters:
        clusters = Clusters(broker_factory, client_factory, names, **kwargs)
        made.append(clusters)  # before start(): a half-started set is torn down too
        return clusters.start()

    yield make
    failures = []
    for clusters in made:
        try:
            clusters.close()
        except BaseException as error:  # pytest.fail: keep closing the others
            failures.append(str(error))
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
