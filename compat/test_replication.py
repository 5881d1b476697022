"""Geo-replication between real Meridian clusters, observed through the official client on both
ends.

Each test starts its own clusters (one `meridian standalone` per cluster name; see
replication_harness.py). Every cluster is registered on every broker, and the registry entry a
cluster has for a remote names a fault proxy as `proxyServiceUrl`, so all replication traffic
from x to y crosses `clusters.link(x, y)`: that is where partitions, resets and delays are
injected. Configuration is per cluster (each has its own metadata), as with Pulsar clusters that
do not share a configuration store.

The Pulsar behaviour held up here (pulsar-internals.md, section 2):
- a namespace's replication list on a cluster decides where that cluster's *own* messages go;
  messages that arrived from another cluster are never forwarded again (no loops, no relay);
- `replicate_to` on a message (the client's `replication_clusters`) narrows its destinations,
  and `disable_replication` keeps it local;
- a replicator starts at the *latest* position when it is created (on topic load, or when a
  cluster is added to the list), so existing data is not back-filled. The tests therefore
  configure replication before any topic exists, and consumers subscribe at Earliest;
- a replicated message keeps its payload, key, properties, event time, publish time and
  producer name, and lands in the same partition;
- an unreachable remote makes backlog accumulate on the source (stats: `connected` false,
  `replicationBacklog` > 0) without disturbing local producers and consumers; when the remote is
  back, the backlog drains, and the remote's de-duplication by origin position means that
  disconnections, resets and crashes of either side never store a message twice or skip one.

The Python client does not expose `replicated_from`; the admin stats' per-cluster `replication`
sections and `internalStats` cursors (`pulsar.repl.<cluster>`) show the replicators instead.
"""

from __future__ import annotations

import re

import pulsar
import pytest

from helpers import assert_no_more, unique
from replication_harness import (
    QUIET_WINDOW_S,
    REPL_POSITION_PROPERTY,
    REPLICATION_TIMEOUT_S,
    History,
    await_condition,
    check_exactly_once,
    clusters_factory,  # noqa: F401 (fixture)
    make_payload,
    parse_payload,
    topic_path,
)

Earliest = pulsar.InitialPosition.Earliest

# Messages per producer in the full-mesh test; pace and size of the loads under faults.
MESH_MESSAGES = 300
LOAD_RATE = 100  # messages per second
LOAD_PADDING = 400  # bytes added to each payload, so that resets land inside frames


def subscribe(clusters, cluster: str, topic: str, name: str = "check", **kwargs):
    try:
        return clusters.client(cluster).subscribe(topic, name, initial_position=Earliest, **kwargs)
    except pulsar.Timeout:
        # Seen in full runs: the official client's first subscribe to a cluster never reached
        # that broker (its log shows no connection from the client) while the broker was idle.
        # A fresh client gets through; the cause is not found yet (see the session notes).
        return clusters.new_client(cluster).subscribe(
            topic, name, initial_position=Earliest, **kwargs
        )


def user_properties(properties: dict) -> dict:
    """The properties without the replicator's origin-position marker."""
    return {key: value for key, value in properties.items() if key != REPL_POSITION_PROPERTY}


def counters(payloads) -> list[int]:
    return [parse_payload(payload)[1] for payload in payloads]


def assert_sent_metadata_kept(history: History, cluster: str, producer_names: dict) -> None:
    """Every message `cluster` received carries the key, properties, event time and producer
    name it was sent with."""
    problems = []
    for record in history.received(cluster):
        sent = history.sends[record.payload]
        if user_properties(record.properties) != sent.properties:
            problems.append(f"{record.payload!r} properties {record.properties} != {sent.properties}")
        if record.key != sent.key:
            problems.append(f"{record.payload!r} key {record.key!r} != {sent.key!r}")
        if sent.event_timestamp is not None and record.event_timestamp != sent.event_timestamp:
            problems.append(
                f"{record.payload!r} event time {record.event_timestamp} != {sent.event_timestamp}"
            )
        if record.producer_name != producer_names[sent.producer]:
            problems.append(
                f"{record.payload!r} producer name {record.producer_name!r} != "
                f"{producer_names[sent.producer]!r}"
            )
    assert not problems, f"on {cluster}:\n" + "\n".join(problems[:20])


def assert_same_publish_times(history: History, clusters: list[str]) -> None:
    """A message has the same publish time everywhere: the origin's, not the time it was
    stored by replication."""
    times = {
        cluster: {record.payload: record.publish_timestamp for record in history.received(cluster)}
        for cluster in clusters
    }
    reference = times[clusters[0]]
    differing = [
        (payload, {cluster: times[cluster].get(payload) for cluster in clusters})
        for payload in reference
        if any(times[cluster].get(payload) != reference[payload] for cluster in clusters)
    ]
    assert not differing, f"publish times differ between clusters: {differing[:10]}"


def load_kwargs(index: int) -> dict:
    return {
        "partition_key": f"key-{index % 7}",
        "properties": {"n": str(index)},
        "padding": LOAD_PADDING,
    }


# ------------------------------------------------------------------ the harness itself


def test_every_cluster_is_registered_everywhere_through_its_link_proxy(clusters_factory, tmp_path):
    """Precondition of every other test: each broker runs under its own cluster name, knows
    every cluster with its real URLs, and names the link proxy (`proxyServiceUrl`, SNI) for each
    remote; the proxy of link x→y reaches y; configuring a namespace on one cluster leaves the
    others alone (per-cluster metadata)."""
    clusters = clusters_factory(("a", "b", "c"))
    for on in clusters.names:
        assert sorted(clusters.admin(on, "GET", "/admin/v2/clusters")) == ["a", "b", "c"]
        for name in clusters.names:
            data = clusters.admin(on, "GET", f"/admin/v2/clusters/{name}")
            assert data["serviceUrl"] == clusters[name].web_url
            assert data["brokerServiceUrl"] == clusters[name].service_url
            if name == on:
                assert not data.get("proxyServiceUrl"), f"{on}'s own entry names a proxy"
            else:
                assert data["proxyServiceUrl"] == clusters.link(on, name).url
                assert data["proxyProtocol"] == "SNI"

    namespace = clusters.create_replicated_namespace(clusters.new_namespace(), ["a", "b", "c"])
    tenant = namespace.split("/")[0]
    for on in clusters.names:
        assert sorted(clusters.get_replication(on, namespace)) == ["a", "b", "c"]
        info = clusters.admin(on, "GET", f"/admin/v2/tenants/{tenant}")
        assert sorted(info["allowedClusters"]) == ["a", "b", "c"]

    only_a = clusters.create_replicated_namespace(clusters.new_namespace(), ["a", "c"], on=["a"])
    assert sorted(clusters.get_replication("a", only_a)) == ["a", "c"]
    assert clusters.call("b", "GET", f"/admin/v2/namespaces/{only_a}")[0] == 404

    # Link a→b leads to b: a message produced through it is stored on b.
    topic = f"persistent://{namespace}/through-the-link"
    link = clusters.link("a", "b")
    client = pulsar.Client(
        link.url,
        operation_timeout_seconds=20,
        logger=pulsar.FileLogger(pulsar.LoggerLevel.Info, str(tmp_path / "link-client.log")),
    )
    try:
        client.create_producer(topic).send(b"via the a->b link")
    finally:
        client.close()
    assert link.bytes_to_target > 0
    reader = clusters.client("b").create_reader(topic, pulsar.MessageId.earliest)
    assert reader.read_next(timeout_millis=15_000).data() == b"via the a->b link"


def test_exactly_once_checker_reports_loss_duplicates_extras_and_reordering():
    """The checker the other tests rely on fails for each kind of violation and passes only
    for an exact copy (optional messages may be absent, never doubled). No broker needed."""
    sent = [make_payload("p", i) for i in range(5)] + [make_payload("q", i) for i in range(3)]
    exact = sent[:3] + sent[5:7] + sent[3:5] + sent[7:]  # producers interleaved, each in order
    check_exactly_once({"x": sent}, {"x": exact})
    check_exactly_once({"x": sent[:4]}, {"x": sent[:4]}, {"x": [sent[4]]})
    check_exactly_once({"x": sent[:4]}, {"x": sent[:5]}, {"x": [sent[4]]})
    violations = {
        "missing": sent[1:],
        "received more than once": sent + [sent[2]],
        "not expected here": sent + [make_payload("r", 0)],
        "out of producer order": [sent[1], sent[0]] + sent[2:],
    }
    for what, received in violations.items():
        with pytest.raises(AssertionError, match=what):
            check_exactly_once({"x": sent}, {"x": received})
    with pytest.raises(AssertionError, match="received more than once"):
        check_exactly_once({"x": sent[:4]}, {"x": sent[:5] + [sent[4]]}, {"x": [sent[4]]})


# ------------------------------------------------------------------ 1. full mesh


@pytest.mark.timeout(300)
def test_full_mesh_every_cluster_receives_every_message_exactly_once_in_order(clusters_factory):
    """Three clusters replicating to each other, one producer on each publishing concurrently
    to the same topic: every cluster's consumer receives all 3N messages exactly once, each
    producer's in its send order, with key, properties, event time and producer name as sent
    and the same publish time everywhere. Traffic x→y crossed the x→y link; the replicators'
    backlogs drain to 0."""
    names = ["a", "b", "c"]
    clusters = clusters_factory(names)
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("mesh"), names)
    topic = f"persistent://{namespace}/orders"
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in names}

    producer_names = {name: unique(f"mesh-{name}") for name in names}
    loaders = []
    for name in names:
        producer = clusters.client(name).create_producer(
            topic,
            producer_name=producer_names[name],
            block_if_queue_full=True,
            # One of them batches: a replicated batch must keep its per-message metadata.
            batching_enabled=(name == "b"),
            batching_max_publish_delay_ms=5,
        )
        base = 1_600_000_000_000 + 1_000_000 * names.index(name)
        loaders.append(
            clusters.start_producer(
                history, producer, name, name, limit=MESH_MESSAGES,
                send_kwargs=lambda i, name=name, base=base: {
                    "partition_key": f"{name}-key-{i % 5}",
                    "properties": {"origin": name, "n": str(i)},
                    "event_timestamp": base + i,
                },
            )
        )
    for loader in loaders:
        loader.join(120)
        loader.stop()
    assert not history.failed(), f"sends failed: {history.failed()[:5]}"
    everything = history.sent_payloads()
    assert len(everything) == 3 * MESH_MESSAGES

    history.collect(consumers, {name: len(everything) for name in names})
    check_exactly_once({name: everything for name in names}, history)
    for name in names:
        assert_sent_metadata_kept(history, name, producer_names)
    assert_same_publish_times(history, names)

    for source in names:
        for remote in names:
            if source != remote:
                assert clusters.link(source, remote).bytes_to_target > 0, (
                    f"nothing crossed the {source}->{remote} link: the replicator did not use "
                    "the registered proxyServiceUrl"
                )
                section = clusters.await_replication_stats(
                    source, topic, remote,
                    lambda section: section["connected"] is True
                    and section["replicationBacklog"] == 0,
                    f"{source}'s replicator to {remote} is connected with no backlog",
                )
                for field in ("msgRateOut", "msgThroughputOut", "msgRateIn", "replicationDelayInSeconds"):
                    assert field in section, f"stats replication.{remote} lacks {field}"


# ------------------------------------------------------------------ 2. topologies and routing


def test_one_way_replication_follows_each_clusters_own_list(clusters_factory):
    """c's list is [c], a's is [a, c] (configured on c first, as an operator preparing the
    destination would): a's messages reach c exactly once, c's never reach a. Configuring a
    leaves c's own list as it was, and only a has a replicator cursor."""
    clusters = clusters_factory(("a", "c"))
    namespace = clusters.new_namespace("oneway")
    clusters.create_replicated_namespace(namespace, ["c"], on=["c"])
    clusters.create_replicated_namespace(namespace, ["a", "c"], on=["a"])
    topic = f"persistent://{namespace}/events"
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in ("a", "c")}
    on_a = clusters.client("a").create_producer(topic)
    for i in range(20):
        history.send(on_a, "a", "a", i, properties={"n": str(i)})
    from_a = history.sent_payloads("a")
    history.collect({"c": consumers["c"]}, {"c": len(from_a)}, quiet=0)
    assert clusters.get_replication("c", namespace) == ["c"], "a's configuration changed c's list"

    on_c = clusters.client("c").create_producer(topic)
    for i in range(20):
        history.send(on_c, "c", "c", i, properties={"n": str(i)})
    from_c = history.sent_payloads("c")
    history.collect(consumers, {"a": len(from_a), "c": len(from_a) + len(from_c)})
    check_exactly_once({"a": from_a, "c": from_a + from_c}, history)

    assert "pulsar.repl.c" in clusters.internal_stats("a", topic)["cursors"]
    assert "pulsar.repl.a" not in clusters.internal_stats("c", topic)["cursors"]
    assert clusters.get_replication("c", namespace) == ["c"]


def test_aggregation_two_sources_into_one_cluster(clusters_factory):
    """a and b each replicate to c only (c: [c], then a: [a, c], b: [b, c]): c receives both
    producers' messages exactly once and in order; a and b keep only their own; c's list is
    still [c] at the end."""
    clusters = clusters_factory(("a", "b", "c"))
    namespace = clusters.new_namespace("aggregate")
    clusters.create_replicated_namespace(namespace, ["c"], on=["c"])
    clusters.create_replicated_namespace(namespace, ["a", "c"], on=["a"])
    clusters.create_replicated_namespace(namespace, ["b", "c"], on=["b"])
    topic = f"persistent://{namespace}/metrics"
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in ("a", "b", "c")}
    producers = {name: clusters.client(name).create_producer(topic) for name in ("a", "b")}
    for i in range(30):
        for name, producer in producers.items():
            history.send(producer, name, name, i, partition_key=f"{name}-{i % 3}")

    from_a, from_b = history.sent_payloads("a"), history.sent_payloads("b")
    history.collect(consumers, {"a": len(from_a), "b": len(from_b), "c": len(from_a) + len(from_b)})
    check_exactly_once({"a": from_a, "b": from_b, "c": from_a + from_b}, history)
    assert clusters.get_replication("c", namespace) == ["c"], "a's or b's configuration changed c's"


def test_per_message_replication_clusters_and_disable_replication(clusters_factory):
    """In a full mesh, a message sent with replication_clusters=["a", "c"] reaches c but not
    b, one sent with disable_replication=True stays on a, and plain messages reach everyone;
    each cluster gets exactly its share, in order."""
    names = ["a", "b", "c"]
    clusters = clusters_factory(names)
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("routing"), names)
    topic = f"persistent://{namespace}/routed"
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in names}
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    routes = {}
    for i in range(30):
        route = ("to-a-and-c", "local", "everywhere")[i % 3]
        options = {"properties": {"route": route}}
        if route == "to-a-and-c":
            options["replication_clusters"] = ["a", "c"]
        elif route == "local":
            options["disable_replication"] = True
        routes[history.send(producer, "a", "a", i, **options).payload] = route
    # The last message goes everywhere: once b and c have it, the routed ones before it have
    # been dealt with by the in-order replicators.
    routes[history.send(producer, "a", "a", 30).payload] = "everywhere"

    sent = history.sent_payloads()
    expected = {
        "a": sent,
        "b": [p for p in sent if routes[p] == "everywhere"],
        "c": [p for p in sent if routes[p] in ("everywhere", "to-a-and-c")],
    }
    history.collect(consumers, {name: len(payloads) for name, payloads in expected.items()})
    check_exactly_once(expected, history)


def test_replication_backlog_and_delay_count_only_what_the_remote_still_has_to_store(
    clusters_factory,
):
    """Full mesh a, b, c; the link from a to b is cut before the topic exists, so a's
    replicator to b never runs a session. a stores 4 messages for everyone, 3 with
    replication_clusters=["a", "c"], 2 kept local, and 5 that arrive from c. a's stats for b:
    `replicationBacklog` is 4 (what b still has to get from a; not the 14 entries after the
    cursor) and `replicationDelayInSeconds` grows although nothing was ever sent. After the
    link heals both are 0, and b holds each of a's messages meant for it once, in order."""
    names = ["a", "b", "c"]
    clusters = clusters_factory(names)
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("lacks"), names)
    topic = f"persistent://{namespace}/lacks"
    history = History()
    link = clusters.link("a", "b")
    link.cut()
    consumers = {name: subscribe(clusters, name, topic) for name in names}
    producer_a = clusters.client("a").create_producer(topic, batching_enabled=False)
    producer_c = clusters.client("c").create_producer(topic, batching_enabled=False)
    meant_for_b = []
    for i in range(9):
        options = {}
        if i in (1, 4, 7):
            options["replication_clusters"] = ["a", "c"]
        elif i in (2, 5):
            options["disable_replication"] = True
        record = history.send(producer_a, "a", "a", i, **options)
        if not options:
            meant_for_b.append(record.payload)
    for i in range(5):
        history.send(producer_c, "c", "c", i)
    history.collect({"a": consumers["a"]}, {"a": 14})
    lacking = clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["replicationBacklog"] == 4
        and section["replicationDelayInSeconds"] >= 1,
        "a's stats count the 4 entries b lacks, and their age",
    )
    assert not lacking["connected"], lacking
    link.heal()
    history.collect({"b": consumers["b"]}, {"b": 4 + 5})
    check_exactly_once(
        {"b": meant_for_b + history.sent_payloads("c")}, history
    )
    clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["replicationBacklog"] == 0
        and section["replicationDelayInSeconds"] == 0 and section["msgOutCount"] == 4,
        "nothing left for b",
    )


# ------------------------------------------------------------------ 3. membership changes


@pytest.mark.timeout(300)
def test_clusters_added_and_removed_while_a_producer_keeps_publishing(clusters_factory):
    """a's replication list changes under load: [a, b] → [a, b, c] → [a, c]. c receives an
    unbroken run of a's messages from (no earlier than) the moment its replicator started (not
    back-filled: nothing a had acknowledged before the change) to the end; b receives an
    unbroken run from the first message until (no later than) its removal; the local producer
    and consumer never see an error and the local consumer gets everything."""
    clusters = clusters_factory(("a", "b", "c"))
    namespace = clusters.new_namespace("membership")
    clusters.create_replicated_namespace(namespace, ["b"], on=["b"])
    clusters.create_replicated_namespace(namespace, ["c"], on=["c"])
    clusters.create_replicated_namespace(namespace, ["a", "b"], on=["a"])
    topic = f"persistent://{namespace}/membership"
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in ("a", "b", "c")}
    readers = {name: clusters.start_consumer(history, name, consumers[name]) for name in consumers}
    producer = clusters.client("a").create_producer(topic, block_if_queue_full=True)
    loader = clusters.start_producer(history, producer, "a", "a", limit=30_000, rate=LOAD_RATE)

    def highest(cluster: str) -> int:
        got = counters(history.received_payloads(cluster))
        return max(got) if got else -1

    await_condition(lambda: readers["b"].count() >= 30, REPLICATION_TIMEOUT_S, "b receives a's messages")

    acked = history.sent("a", acked_only=True)
    acked_before_add = acked[-1].counter if acked else -1
    clusters.set_replication("a", namespace, ["a", "b", "c"])
    clusters.await_replicator("a", topic, "c", connected=True)
    first_after_add = loader.count
    await_condition(
        lambda: highest("c") >= first_after_add + 30, REPLICATION_TIMEOUT_S,
        "c receives what a publishes after c was added",
    )

    clusters.set_replication("a", namespace, ["a", "c"])
    await_condition(
        lambda: "pulsar.repl.b" not in clusters.internal_stats("a", topic)["cursors"],
        REPLICATION_TIMEOUT_S,
        "a dropped its replicator cursor for b",
    )
    first_after_remove = loader.count
    await_condition(
        lambda: highest("c") >= first_after_remove + 30, REPLICATION_TIMEOUT_S,
        "c keeps receiving after b was removed",
    )
    loader.stop()
    assert not history.failed(), f"the local producer saw errors: {history.failed()[:5]}"
    sent = history.sent_payloads("a")
    assert counters(sent) == list(range(len(sent)))
    for reader in readers.values():
        reader.stop()
    history.collect(consumers, {"a": len(sent), "c": len(sent) - first_after_add})

    check_exactly_once({"a": sent}, history)

    got_c = counters(history.received_payloads("c"))
    assert got_c, "c received nothing"
    start = min(got_c)
    assert start > acked_before_add, (
        f"c received message {start}, which a had acknowledged before c was added "
        f"(up to {acked_before_add}): replication must start at the latest position"
    )
    assert start <= first_after_add, (
        f"c's first message is {start}, but {first_after_add} was sent after c's replicator ran"
    )
    check_exactly_once({"c": sent[start:]}, history)

    got_b = counters(history.received_payloads("b"))
    end = max(got_b)
    assert end < first_after_remove, (
        f"b received message {end}, sent after b was removed (from {first_after_remove} on)"
    )
    check_exactly_once({"b": sent[: end + 1]}, history)


# ------------------------------------------------------------------ 4. link faults


def _two_clusters_under_load(clusters_factory, prefix: str):
    """Clusters a and b replicating both ways, consumers on both, a producer on a."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.create_replicated_namespace(clusters.new_namespace(prefix), ["a", "b"])
    topic = f"persistent://{namespace}/load"
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in ("a", "b")}
    threads = {name: clusters.start_consumer(history, name, consumers[name]) for name in consumers}
    producer = clusters.client("a").create_producer(topic, block_if_queue_full=True)
    return clusters, topic, history, consumers, threads, producer


def _finish_and_check(clusters, topic, history, consumers, threads, loader) -> list[bytes]:
    """Stop the load; every acknowledged message exactly once, in order, on a and on b; the
    replication backlog drains and the replicator is connected."""
    loader.stop()
    assert not history.failed(), f"the local producer saw errors: {history.failed()[:5]}"
    sent = history.sent_payloads("a")
    for thread in threads.values():
        thread.stop()
    history.collect(consumers, {"a": len(sent), "b": len(sent)})
    check_exactly_once({"a": sent, "b": sent}, history)
    clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["connected"] is True and section["replicationBacklog"] == 0,
        "a's replicator to b is connected and its backlog drained to 0",
    )
    return sent


@pytest.mark.timeout(300)
def test_link_partition_builds_backlog_then_heals_without_loss_or_duplicates(clusters_factory):
    """The a→b link is cut while a publishes: a's stats show the replicator to b disconnected
    and a growing backlog, a's local consumer keeps receiving everything; after healing, b
    receives every message exactly once, in order."""
    clusters, topic, history, consumers, threads, producer = _two_clusters_under_load(
        clusters_factory, "partition"
    )
    loader = clusters.start_producer(
        history, producer, "a", "a", limit=30_000, rate=LOAD_RATE, send_kwargs=load_kwargs
    )
    await_condition(lambda: threads["b"].count() >= 30, REPLICATION_TIMEOUT_S, "b receives a's messages")

    clusters.link("a", "b").cut()
    clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["connected"] is False and section["replicationBacklog"] >= 20,
        "a's stats show the replicator to b disconnected with a backlog of 20 or more",
    )
    sent_during_cut = loader.count
    await_condition(
        lambda: threads["a"].count() >= sent_during_cut + 20, REPLICATION_TIMEOUT_S,
        "a's local consumer keeps receiving while b is unreachable",
    )
    backlog = clusters.replication_stats("a", topic, "b")["replicationBacklog"]
    clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["connected"] is False and section["replicationBacklog"] > backlog,
        "the backlog keeps growing while the link is cut",
    )

    clusters.link("a", "b").heal()
    await_condition(
        lambda: threads["b"].count() >= sent_during_cut + 20, REPLICATION_TIMEOUT_S,
        "b receives again after the link healed",
    )
    _finish_and_check(clusters, topic, history, consumers, threads, loader)


@pytest.mark.timeout(300)
def test_connection_reset_mid_stream_repeatedly_loses_and_duplicates_nothing(clusters_factory):
    """The replication connection a→b is reset (RST) four times in the middle of the stream,
    each time after a different number of bytes, so inside a frame: every time replication
    resumes, and b ends with every message exactly once, in order."""
    clusters, topic, history, consumers, threads, producer = _two_clusters_under_load(
        clusters_factory, "reset"
    )
    loader = clusters.start_producer(
        history, producer, "a", "a", limit=30_000, rate=LOAD_RATE, send_kwargs=load_kwargs
    )
    link = clusters.link("a", "b")
    await_condition(lambda: threads["b"].count() >= 30, REPLICATION_TIMEOUT_S, "b receives a's messages")
    for number, n_bytes in enumerate((3_001, 17_011, 64_999, 101_009), start=1):
        link.reset_after(n_bytes)
        await_condition(
            lambda: link.resets == number, REPLICATION_TIMEOUT_S,
            f"reset {number} happened ({n_bytes} bytes after arming)",
        )
        sent_at_reset = loader.count
        await_condition(
            lambda: max(counters(history.received_payloads("b")), default=-1) >= sent_at_reset + 10,
            REPLICATION_TIMEOUT_S,
            f"replication to b resumed after reset {number}",
        )
    _finish_and_check(clusters, topic, history, consumers, threads, loader)
    assert link.resets == 4


@pytest.mark.timeout(300)
def test_slow_link_delivers_everything_in_order(clusters_factory):
    """With 50 ms added to every chunk in each direction on the a→b link, b still receives
    every message exactly once and in order."""
    clusters, topic, history, consumers, threads, producer = _two_clusters_under_load(
        clusters_factory, "delay"
    )
    link = clusters.link("a", "b")
    link.set_delay(0.05)
    loader = clusters.start_producer(
        history, producer, "a", "a", limit=300, rate=LOAD_RATE, send_kwargs=load_kwargs
    )
    loader.join(60)
    _finish_and_check(clusters, topic, history, consumers, threads, loader)
    assert link.bytes_to_target > 300 * LOAD_PADDING, "the load did not cross the slow link"


# ------------------------------------------------------------------ 5. crashes


@pytest.mark.timeout(300)
@pytest.mark.parametrize("source_dedup", [True, False], ids=["source-dedup", "no-source-dedup"])
def test_kill9_of_the_source_mid_replication(clusters_factory, source_dedup):
    """a is killed (SIGKILL) while it publishes and replicates to b, and restarted; its
    producer reconnects and goes on. b's subscription ends with exactly a's log, in a's order,
    each entry once, which includes every send a acknowledged: the entries a replicated before
    the crash but whose confirmation it lost are not stored on b again.

    With de-duplication on a, a's log holds each message once, so b has every acknowledged
    message exactly once. Without it, a may itself store a resent message twice (two entries);
    b must then hold both entries too, as a does: b de-duplicates by origin position, not by
    the original producer's sequence id."""
    clusters = clusters_factory(
        ("a", "b"), configs={"a": {"deduplication_enabled": True}} if source_dedup else None
    )
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("kill-source"), ["a", "b"])
    topic = f"persistent://{namespace}/crash"
    history = History()
    # A subscription that never acknowledges keeps a's whole log readable at the end (without
    # one, the segment sealed by the restart is deleted once replicated, as in Pulsar).
    subscribe(clusters, "a", topic, "audit").close()
    consumer_b = subscribe(clusters, "b", topic)
    on_b = clusters.start_consumer(history, "b", consumer_b)
    client_a = clusters.new_client("a", operation_timeout_seconds=60)
    producer = client_a.create_producer(
        topic,
        producer_name=unique("source"),
        block_if_queue_full=True,
        send_timeout_millis=120_000,
    )
    loader = clusters.start_producer(
        history, producer, "a", "a", limit=30_000, rate=2 * LOAD_RATE, send_kwargs=load_kwargs
    )
    await_condition(lambda: on_b.count() >= 100, REPLICATION_TIMEOUT_S, "b receives a's messages")

    acked_before = loader.acked()
    clusters["a"].broker.kill9_and_restart()
    await_condition(
        lambda: loader.acked() >= acked_before + 200, 120, "a's producer goes on after the restart"
    )
    loader.stop(settle_timeout=150)
    acked = history.sent_payloads("a", acked_only=True)

    stored_a = clusters.read_all(history, "a", topic, len(acked))
    missing_on_a = set(acked) - set(stored_a)
    assert not missing_on_a, f"a lost acknowledged messages: {sorted(missing_on_a)[:10]}"
    if source_dedup:
        assert len(stored_a) == len(set(stored_a)), "a stored a message twice despite de-duplication"

    await_condition(
        lambda: on_b.count() >= len(stored_a), REPLICATION_TIMEOUT_S,
        f"b received {len(stored_a)} messages",
    )
    on_b.stop()
    history.collect({"b": consumer_b}, {"b": len(stored_a)})
    if source_dedup:
        check_exactly_once(
            {"b": acked}, history, optional_payloads_by_cluster={"b": set(stored_a) - set(acked)}
        )
    received_b = history.received_payloads("b")
    differ = [i for i, (x, y) in enumerate(zip(received_b, stored_a)) if x != y][:1]
    assert received_b == stored_a, (
        f"b's copy differs from a's log: {len(received_b)} entries on b, {len(stored_a)} on a; "
        f"first difference at index {differ[0] if differ else min(map(len, (received_b, stored_a)))}"
    )


@pytest.mark.timeout(300)
def test_kill9_of_the_remote_mid_replication(clusters_factory):
    """b is killed (SIGKILL) while a replicates to it, and restarted: a's producer never
    notices; b's log ends with every message of a exactly once, in order, although a resends
    what b had stored without confirming it."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("kill-remote"), ["a", "b"])
    topic = f"persistent://{namespace}/crash"
    history = History()
    # Progress only: after b's crash its subscription may redeliver, which is not replication's
    # doing; b's log is checked with a fresh reader at the end, and a subscription that never
    # acknowledges keeps all of it (the segment sealed by the restart is otherwise deleted).
    subscribe(clusters, "b", topic, "audit").close()
    progress = clusters.start_consumer(history, "b-live", subscribe(clusters, "b", topic))
    producer = clusters.client("a").create_producer(topic, block_if_queue_full=True)
    loader = clusters.start_producer(
        history, producer, "a", "a", limit=30_000, rate=2 * LOAD_RATE, send_kwargs=load_kwargs
    )
    await_condition(lambda: progress.count() >= 100, REPLICATION_TIMEOUT_S, "b receives a's messages")

    clusters["b"].broker.kill9_and_restart()
    received_before = progress.count()
    await_condition(
        lambda: progress.count() >= received_before + 200, 120,
        "replication to b resumes after b's restart",
    )
    loader.stop()
    assert not history.failed(), f"a's producer saw errors: {history.failed()[:5]}"
    sent = history.sent_payloads("a")
    progress.stop()

    clusters.await_replication_stats(
        "a", topic, "b", lambda section: section["replicationBacklog"] == 0,
        "a's replication backlog to b drains to 0",
    )
    stored_b = clusters.read_all(history, "b", topic, len(sent))
    check_exactly_once({"b-stored": sent}, history)
    assert stored_b == sent


# ------------------------------------------------------------------ 7. partitioned topics


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "compression",
    [pulsar.CompressionType.LZ4, pulsar.CompressionType.ZSTD],
    ids=["lz4", "zstd"],
)
def test_partitioned_topic_batched_and_compressed(clusters_factory, compression):
    """A 3-partition topic created on a only: the replicator creates it on b with 3 partitions;
    a batching, compressing producer with keys and properties publishes; b's consumer receives
    every message exactly once, in per-partition order, in the partition a stored it in, with
    its key, properties, event time, producer name and publish time."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("partitioned"), ["a", "b"])
    topic = f"persistent://{namespace}/sharded"
    clusters.create_partitioned_topic("a", topic, 3)
    producer_name = unique("sharded")
    producer = clusters.client("a").create_producer(
        topic,
        producer_name=producer_name,
        batching_enabled=True,
        batching_max_messages=20,
        batching_max_publish_delay_ms=20,
        compression_type=compression,
        block_if_queue_full=True,
    )
    await_condition(
        lambda: clusters.partitions("b", topic) == 3, REPLICATION_TIMEOUT_S,
        "b has the topic with 3 partitions",
    )
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in ("a", "b")}
    base = 1_700_000_000_000
    for i in range(240):
        history.send_async(
            producer, "a", "a", i,
            partition_key=f"key-{i % 10}",
            properties={"n": str(i), "kind": "compressed" if i % 2 else "plain"},
            event_timestamp=base + i,
            padding=200,  # compressible filler
        )
    producer.flush()
    history.await_settled()
    assert not history.failed(), f"sends failed: {history.failed()[:5]}"
    sent = history.sent_payloads("a")
    partition_of = {record.payload: record.message_id.partition() for record in history.sent("a")}
    assert set(partition_of.values()) == {0, 1, 2}, "the keys did not spread over all partitions"

    history.collect(consumers, {"a": len(sent), "b": len(sent)})
    check_exactly_once(
        {"a": sent, "b": sent}, history,
        order_group=lambda cluster, payload: partition_of[payload],
    )
    assert_sent_metadata_kept(history, "b", {"a": producer_name})
    assert_same_publish_times(history, ["a", "b"])
    wrong_partition = [
        (record.payload, record.topic, partition_of[record.payload])
        for record in history.received("b")
        if record.partition != partition_of[record.payload]
        or record.topic != f"{topic}-partition-{partition_of[record.payload]}"
    ]
    assert not wrong_partition, f"on b in another partition than on a: {wrong_partition[:10]}"


def test_a_remote_that_never_answers_does_not_starve_replication_to_the_others(clusters_factory):
    """a replicates to b and c with the smallest memory bound (1 MiB). The link to b goes
    silent (every byte delayed far beyond the test) after the replicators started; a then
    stores 12 messages of 200 KiB. b's replicator sends what memory allows and waits on answers
    that do not come: c must still receive all 12, each once, in order, instead of waiting
    until b's sends time out. Once the link to b is reset and healthy again, b gets them too."""
    clusters = clusters_factory(
        ("a", "b", "c"), configs={"a": {"replication_max_memory_bytes": 1024 * 1024}}
    )
    namespace = clusters.create_replicated_namespace(
        clusters.new_namespace("share"), ["a", "b", "c"]
    )
    topic = f"persistent://{namespace}/share"
    history = History()
    consumers = {name: subscribe(clusters, name, topic) for name in ("b", "c")}
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    history.send(producer, "a", "a", 0)
    history.collect(consumers, {"b": 1, "c": 1}, quiet=0)
    link = clusters.link("a", "b")
    link.set_delay(3600)
    for i in range(1, 13):
        history.send(producer, "a", "a", i, padding=200 * 1024)
    history.collect({"c": consumers["c"]}, {"c": 13})
    link.set_delay(0)
    link.cut()
    link.heal()
    history.collect({"b": consumers["b"]}, {"b": 13})
    sent = history.sent_payloads("a")
    check_exactly_once({"b": sent, "c": sent}, history)


@pytest.mark.allow_broker_errors(r"partitions inconsistent")
def test_partition_count_mismatch_stops_replication_and_keeps_a_backlog(clusters_factory):
    """The topic has 3 partitions on a but 2 on b: a refuses to replicate into the wrong shape.
    a's per-partition stats show the replicator to b disconnected and a backlog of exactly what
    was published, growing with each message; b's topic keeps 2 partitions and receives
    nothing; a's own consumer is unaffected."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("mismatch"), ["a", "b"])
    topic = f"persistent://{namespace}/shapes"
    clusters.create_partitioned_topic("b", topic, 2)
    clusters.create_partitioned_topic("a", topic, 3)
    history = History()
    consumer_b = subscribe(clusters, "b", topic)
    consumer_a = subscribe(clusters, "a", topic)
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)

    def backlog_to_b() -> int:
        total = 0
        for index in range(3):
            section = clusters.replication_stats("a", f"{topic}-partition-{index}", "b")
            assert section["connected"] is False, f"partition {index} claims to replicate to b"
            total += section["replicationBacklog"]
        return total

    for i in range(30):
        history.send(producer, "a", "a", i)
    history.collect({"a": consumer_a}, {"a": 30})
    check_exactly_once(
        {"a": history.sent_payloads("a")}, history,
        order_group=lambda cluster, payload: history.sends[payload].message_id.partition(),
    )
    await_condition(lambda: backlog_to_b() == 30, REPLICATION_TIMEOUT_S, "a's backlog to b is 30")
    for i in range(30, 45):
        history.send(producer, "a", "a", i)
    await_condition(lambda: backlog_to_b() == 45, REPLICATION_TIMEOUT_S, "a's backlog to b grew to 45")

    assert clusters.partitions("b", topic) == 2
    assert not [t for t in clusters.topics("b", namespace) if t.endswith("-partition-2")]
    assert_no_more(consumer_b, wait_ms=int(QUIET_WINDOW_S * 1000), what="b must receive nothing")


# ------------------------------------------------------------------ no silent gap (issue 11)

SMALL_LIMIT = 1024 * 1024  # b's maxMessageSize where the clusters' limits differ


def sized_payload(producer: str, counter: int, size: int) -> dict:
    """`History.send` arguments for a payload of exactly `size` bytes."""
    return {"padding": size - len(make_payload(producer, counter))}


def one_message_through(clusters_factory, prefix: str):
    """Clusters a and b replicating a fresh namespace both ways, and one topic through which
    a's first message reached b: (clusters, topic, history, consumer on b, producer on a)."""
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.create_replicated_namespace(clusters.new_namespace(prefix), ["a", "b"])
    topic = f"persistent://{namespace}/{prefix}"
    history = History()
    consumer_b = subscribe(clusters, "b", topic)
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    history.send(producer, "a", "a", 0)
    history.collect({"b": consumer_b}, {"b": 1}, quiet=0)
    return clusters, topic, history, consumer_b, producer


def log_count(clusters, cluster: str, *needles: str) -> int:
    return len(clusters.log_lines(cluster, *needles))


@pytest.mark.allow_broker_errors(r"replication stopped")
def test_an_entry_too_large_for_the_remote_stops_only_its_replicator_until_the_limit_is_raised(
    clusters_factory,
):
    """b accepts 1 MiB payloads, a the default 5 MiB. On a: m0 of exactly 1 MiB, m1 one byte
    over, m2..m9 small, published back to back. b stores m0 and nothing after it (no gap): the
    replicator says `Stopped` at m1, retries, and another topic replicating to b over the same
    connection is not disturbed. From b to a, a message at b's limit arrives. Once b's limit is
    raised (a restart with the new setting), b holds m0..m9, each once, in order."""
    clusters = clusters_factory(("a", "b"), configs={"b": {"max_message_size": SMALL_LIMIT}})
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("limits"), ["a", "b"])
    big, other = f"persistent://{namespace}/big", f"persistent://{namespace}/other"
    history = History()
    consumer_b = subscribe(clusters, "b", big)
    other_b = subscribe(clusters, "b", other, name="other")
    producer = clusters.client("a").create_producer(big, batching_enabled=False)
    sizes = {0: SMALL_LIMIT, 1: SMALL_LIMIT + 1}
    for i in range(10):
        history.send_async(producer, "a", "a", i, **sized_payload("a", i, sizes.get(i, 100)))
    producer.flush()
    history.await_settled()
    sent = history.sent_payloads("a")
    assert len(sent) == 10, "a accepts every message under its own limit"

    stopped = clusters.await_replication_stats(
        "a", big, "b", lambda section: section["state"].startswith("Stopped: ")
        and section["replicationBacklog"] == 9,
        "the replicator of big to b is stopped",
    )
    assert "exceeds" in stopped["state"], stopped
    history.collect({"b": consumer_b}, {"b": 1})
    check_exactly_once({"b": sent[:1]}, history)
    metrics = clusters.metrics("a")
    assert any(
        line.startswith("meridian_replication_stopped_count") and "big" in line
        and line.endswith(" 1")
        for line in metrics.splitlines()
    ), "no metric says the replicator is stopped"
    [logged] = clusters.log_lines("a", "replication stopped", "big")[:1]
    assert "remote=b" in logged and "entry " in logged, logged

    # Another topic to b replicates over the same connection while big's replicator retries.
    other_producer = clusters.client("a").create_producer(other)
    for i in range(10):
        history.send(other_producer, "other", "a", i)
    connected_since = clusters.await_replication_stats(
        "a", other, "b", lambda section: section["connected"], "other replicates to b",
    )["outboundConnectedSince"]
    retries = log_count(clusters, "a", "replicator started", "big")
    await_condition(
        lambda: log_count(clusters, "a", "replicator started", "big") > retries,
        REPLICATION_TIMEOUT_S, "big's replicator retried",
    )
    assert log_count(clusters, "a", "replication stopped", "big") == 1, "an ERROR per retry"
    history.collect({"other": other_b}, {"other": 10})
    check_exactly_once({"other": history.sent_payloads("other")}, history)
    still = clusters.replication_stats("a", other, "b")
    assert still["connected"] and still["outboundConnectedSince"] == connected_since, still

    # The other direction: b's largest message fits a's larger limit.
    back = f"persistent://{namespace}/back"
    consumer_a = subscribe(clusters, "a", back)
    history.send(clusters.client("b").create_producer(back), "b", "b", 0,
                 **sized_payload("b", 0, SMALL_LIMIT))
    history.collect({"a": consumer_a}, {"a": 1})
    check_exactly_once({"a": history.sent_payloads("b")}, history)

    clusters.reconfigure("b", max_message_size=5 * 1024 * 1024)
    history.collect({"b": consumer_b}, {"b": 10})
    check_exactly_once({"b": sent}, history)
    clusters.await_replication_stats(
        "a", big, "b", lambda section: section["state"] == "Started"
        and section["replicationBacklog"] == 0 and section["msgOutCount"] == 10,
        "big's replicator resumed and drained",
    )


@pytest.mark.allow_broker_errors(r"replication stopped")
def test_skipping_an_entry_the_remote_refuses_is_an_explicit_admin_action(clusters_factory):
    """b accepts 1 MiB payloads; m1 is one byte over. The replicator stops at m1 and b holds
    m0 only. `skip/1` on the replication cursor `pulsar.repl.b` of a lets m2 and m3 through:
    b holds m0, m2, m3, each once, in order, and never m1."""
    clusters = clusters_factory(("a", "b"), configs={"b": {"max_message_size": SMALL_LIMIT}})
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("skip"), ["a", "b"])
    topic = f"persistent://{namespace}/skip"
    history = History()
    consumer_b = subscribe(clusters, "b", topic)
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    for i in range(4):
        size = SMALL_LIMIT + 1 if i == 1 else 100
        history.send(producer, "a", "a", i, **sized_payload("a", i, size))
    clusters.await_replication_stats(
        "a", topic, "b", lambda section: section["state"].startswith("Stopped: "),
        "the replicator to b is stopped at m1",
    )
    history.collect({"b": consumer_b}, {"b": 1}, quiet=0)
    clusters.admin("a", "POST", f"{topic_path(topic)}/subscription/pulsar.repl.b/skip/1")
    sent = history.sent_payloads("a")
    history.collect({"b": consumer_b}, {"b": 3})
    check_exactly_once({"b": [sent[0], sent[2], sent[3]]}, history)
    clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["state"] == "Started" and section["replicationBacklog"] == 0,
        "the replicator to b goes on after the skip",
    )


def test_a_corrupted_entry_in_a_full_pipeline_is_sent_again_and_nothing_is_lost(clusters_factory):
    """300 messages wait on a while the link to b is cut; then the link heals, the replicator
    pipelines them, and the proxy flips one byte in the payload of the 150th. b refuses it
    (checksum); the replicator sends it and everything after it again: b holds all 300, each
    once, in order, and a's stats count 300 sent and nothing left."""
    clusters, topic, history, consumer_b, producer = one_message_through(
        clusters_factory, "corrupt"
    )
    link = clusters.link("a", "b")
    link.cut()
    for i in range(1, 300):
        history.send_async(producer, "a", "a", i, padding=LOAD_PADDING)
    producer.flush()
    history.await_settled()
    link.corrupt(make_payload("a", 150))
    link.heal()
    history.collect({"b": consumer_b}, {"b": 300})
    check_exactly_once({"b": history.sent_payloads("a")}, history)
    assert link.corrupted == 1
    clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["replicationBacklog"] == 0 and section["msgOutCount"] == 300,
        "a counts what b stored",
    )


def test_entries_the_remote_stored_without_answering_are_counted_once(clusters_factory):
    """The link from a to b delays every chunk by 3 s. a stores 5 messages; once b's consumer
    has them (b stored them), and before b's receipts have crossed the link back, the link is
    reset: a's replicator sends them again and b answers them as duplicates. a's `msgOutCount`
    must count the 5 entries b stored, once (it said 1, counting only the first message)."""
    clusters, topic, history, consumer_b, producer = one_message_through(
        clusters_factory, "unanswered"
    )
    link = clusters.link("a", "b")
    link.set_delay(3)
    for i in range(1, 6):
        history.send(producer, "a", "a", i)
    history.collect({"b": consumer_b}, {"b": 6}, quiet=0)
    link.cut()
    link.set_delay(0)
    link.heal()
    clusters.await_replication_stats(
        "a", topic, "b",
        lambda section: section["replicationBacklog"] == 0 and section["msgOutCount"] == 6,
        "a counts the 6 entries b stored",
    )
    assert_no_more(consumer_b, wait_ms=int(QUIET_WINDOW_S * 1000), what="no second copy on b")
    check_exactly_once({"b": history.sent_payloads("a")}, history)


def test_replication_backlog_expired_by_a_ttl_is_never_silent(clusters_factory):
    """The link from a to b is cut before the topic exists (a's replicator to b never reads)
    and a stores 3 messages; then a's namespace gets a 1 s message TTL. As in Pulsar, the TTL
    expires the replication backlog too, so b will never get them. That skip must not be
    silent: a logs a WARN line naming the topic and the replication cursor, and its backlog to
    b is 0. After the link heals, b gets what a stores next."""
    clusters = clusters_factory(("a", "b"), configs={"a": {"policy_check_interval_seconds": 1}})
    namespace = clusters.create_replicated_namespace(clusters.new_namespace("ttl"), ["a", "b"])
    topic = f"persistent://{namespace}/ttl"
    history = History()
    link = clusters.link("a", "b")
    link.cut()
    consumer_b = subscribe(clusters, "b", topic)
    producer = clusters.client("a").create_producer(topic, batching_enabled=False)
    for i in range(3):
        history.send(producer, "a", "a", i)
    clusters.admin("a", "POST", f"/admin/v2/namespaces/{namespace}/messageTTL", 1)
    await_condition(
        lambda: clusters.log_lines("a", "replication backlog expired", topic, "pulsar.repl.b"),
        REPLICATION_TIMEOUT_S, "a WARN line says the replication backlog to b expired",
    )
    clusters.await_replication_stats(
        "a", topic, "b", lambda section: section["replicationBacklog"] == 0,
        "nothing left for b",
    )
    link.heal()
    history.send(producer, "a", "a", 3)
    history.collect({"b": consumer_b}, {"b": 1})
    check_exactly_once({"b": history.sent_payloads("a")[3:]}, history)


def retry_delays_ms(clusters, cluster: str, topic: str) -> list[float]:
    """The `retry_in` of each `replication interrupted` line logged for `topic` (a WARN when
    the reason is new, `replication still interrupted` at DEBUG while it repeats)."""
    delays = []
    lines = [line for line in clusters.log_lines(cluster, "interrupted", topic)
             if "replication interrupted" in line or "replication still interrupted" in line]
    for line in lines:
        match = re.search(r"retry_in=([0-9.]+)(ms|s)\b", line)
        if match:
            delays.append(float(match.group(1)) * (1 if match.group(2) == "ms" else 1000))
    return delays


def test_the_backoff_grows_while_the_remote_confirms_nothing(clusters_factory, monkeypatch):
    """Every copy of one message is corrupted on the link: each session creates its producer
    and fails a moment later at that message. The retries back off (each delay longer than the
    one before) instead of starting again at the shortest delay; once the link is clean, b holds
    every message once, in order."""
    # A retry for the same reason is logged at DEBUG only (the WARN says it once).
    monkeypatch.setenv("RUST_LOG", "info,meridian_broker::replication::replicator=debug")
    clusters, topic, history, consumer_b, producer = one_message_through(
        clusters_factory, "backoff"
    )
    link = clusters.link("a", "b")
    link.corrupt(make_payload("a", 5), times=None)
    for i in range(1, 10):
        history.send(producer, "a", "a", i, padding=LOAD_PADDING)
    await_condition(
        lambda: len(retry_delays_ms(clusters, "a", topic)) >= 4,
        REPLICATION_TIMEOUT_S, "four retries",
    )
    delays = retry_delays_ms(clusters, "a", topic)[:4]
    assert delays == sorted(set(delays)), f"the backoff did not grow: {delays}"
    link.corrupt(None)
    history.collect({"b": consumer_b}, {"b": 10})
    check_exactly_once({"b": history.sent_payloads("a")}, history)


@pytest.mark.allow_broker_errors(r"replication stopped")
def test_a_terminated_remote_topic_stops_its_replicator_and_local_traffic_goes_on(
    clusters_factory,
):
    """The topic is terminated on b only. a's replicator stops (`Stopped`, naming the
    termination) with what b could not take left in its backlog; a's own producer and
    consumer go on."""
    clusters, topic, history, consumer_b, producer = one_message_through(
        clusters_factory, "ended"
    )
    consumer_a = subscribe(clusters, "a", topic)
    for i in range(1, 5):
        history.send(producer, "a", "a", i)
    history.collect({"b": consumer_b}, {"b": 5}, quiet=0)
    clusters.admin("b", "POST", f"{topic_path(topic)}/terminate")
    for i in range(5, 10):
        history.send(producer, "a", "a", i)
    history.collect({"a": consumer_a}, {"a": 10})
    stopped = clusters.await_replication_stats(
        "a", topic, "b", lambda section: section["state"].startswith("Stopped: ")
        and section["replicationBacklog"] == 5,
        "the replicator to b is stopped",
    )
    assert "terminated" in stopped["state"].lower(), stopped
    check_exactly_once(
        {"a": history.sent_payloads("a"), "b": history.sent_payloads("a")[:5]}, history
    )
    # The refusal is permanent however it comes: after a restart of a, the remote refuses the
    # replicator's producer itself, and the replicator is stopped again (not "Disconnected",
    # retrying as if the link were down), with the metric saying so.
    clusters.reconfigure("a")
    stopped = clusters.await_replication_stats(
        "a", topic, "b", lambda section: section["state"].startswith("Stopped: ")
        and section["replicationBacklog"] == 5,
        "the replicator to b is stopped again after a restart of a",
    )
    assert "terminated" in stopped["state"].lower(), stopped
    assert any(
        line.startswith("meridian_replication_stopped_count") and "ended" in line
        and line.endswith(" 1")
        for line in clusters.metrics("a").splitlines()
    ), "no metric says the replicator is stopped"


@pytest.mark.allow_broker_errors(r"replication stopped")
def test_a_remote_that_lost_its_topic_is_a_gap_until_the_replication_cursor_is_reset(
    clusters_factory,
):
    """b's topic is deleted (b loses what a had replicated). a's next entry names a previous
    one b no longer holds: b refuses it as a gap and a's replicator stops, instead of going on
    as if nothing were missing. Resetting a's replication cursor to the start resends what a
    retains: b holds all of it again, each once, in order."""
    clusters, topic, history, consumer_b, producer = one_message_through(clusters_factory, "lost")
    consumer_b.close()
    clusters.admin("b", "DELETE", f"{topic_path(topic)}?force=true")
    for i in range(1, 4):
        history.send(producer, "a", "a", i)
    stopped = clusters.await_replication_stats(
        "a", topic, "b", lambda section: section["state"].startswith("Stopped: ")
        and section["replicationBacklog"] == 3,
        "the replicator to b is stopped at the gap",
    )
    assert "replication gap" in stopped["state"], stopped

    clusters.admin("a", "POST", f"{topic_path(topic)}/subscription/pulsar.repl.b/resetcursor/0")
    again = subscribe(clusters, "b", topic, name="again")
    history.collect({"b": again}, {"b": 1 + 4})
    sent = history.sent_payloads("a")
    check_exactly_once({"b": sent}, {"b": history.received_payloads("b")[1:]})
