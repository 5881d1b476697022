"""Cluster mode through outages of the servers it stands on (issue 17): etcd restarted and the
object store unreachable while producers send. Nothing acknowledged may be lost.

A real etcd (restarted on the same ports and data directory), a real SeaweedFS (paused with
SIGSTOP: a store that stops answering), real `meridian broker` processes on the object store
and the official Python client.
"""

from __future__ import annotations

import signal
import threading
import time

import pulsar
import pytest

from broker_process import free_port
from helpers import receive_covering, wait_until
from test_cluster_mode import (  # noqa: F401  (fixtures are used by name)
    paused_weed,
    CURSOR_PERSIST_INTERVAL_MS,
    LEASE_LOST_LINES,
    new_client,
    object_brokers,
    start_etcd,
    topic_owned_by,
)


class Etcd:
    """An etcd that a test can kill and start again with its keys (same ports, same data)."""

    def __init__(self, base):
        self.base = base
        self.client_port, self.peer_port = free_port(), free_port()
        self.process = start_etcd(base, self.client_port, self.peer_port)

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def start(self) -> None:
        self.process = start_etcd(self.base, self.client_port, self.peer_port)


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def weed(paused_weed):
    return paused_weed


def produce_paced(producer, payloads: list[bytes], results: dict) -> threading.Thread:
    """Sends `payloads` asynchronously, one every 10 ms, recording each outcome in `results`."""

    def produce():
        for payload in payloads:
            producer.send_async(
                payload, lambda result, _id, payload=payload: results.__setitem__(payload, result)
            )
            time.sleep(0.01)  # pacing: a steady load, not a synchronisation

    thread = threading.Thread(target=produce, name="producer")
    thread.start()
    return thread


# While etcd is down, commits and lease renewals fail; a broker whose lease lapsed says so.
@pytest.mark.allow_broker_errors(*LEASE_LOST_LINES)
def test_an_etcd_restart_under_load_loses_nothing_acknowledged(
    etcd_server, weed, meridian_bin, tmp_path_factory, tmp_path
):
    # Models an operator restarting etcd (an upgrade, a crash and restart) while a producer
    # sends through a broker that is not the owner: commits and lookups fail while it is down,
    # the client resends by itself, and afterwards every message is acknowledged and delivered
    # once in send order (first occurrences).
    with object_brokers(etcd_server.url, weed[1], meridian_bin, tmp_path_factory, "etcd-restart",
                        2, CURSOR_PERSIST_INTERVAL_MS) as brokers:
        owner, other = brokers
        _, topic = topic_owned_by(owner, brokers, other, "etcdrestart")
        client = new_client(other, tmp_path, "client")
        try:
            consumer = client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            producer = client.create_producer(
                topic, send_timeout_millis=60_000, batching_enabled=False
            )
            results: dict[bytes, pulsar.Result] = {}
            payloads = [f"m{index}".encode() for index in range(300)]
            producing = produce_paced(producer, payloads, results)
            try:
                wait_until(lambda: len(results) >= 50, "the first 50 sends acknowledged")
                etcd_server.kill()
                etcd_server.start()
            finally:
                producing.join()
            producer.flush()
            wait_until(lambda: len(results) == len(payloads), "every send answered")
            failed = {payload: result for payload, result in results.items()
                      if result != pulsar.Result.Ok}
            assert not failed, failed
            seen = receive_covering(consumer, payloads)
            assert list(dict.fromkeys(seen)) == payloads
        finally:
            client.close()


def test_an_object_store_outage_holds_sends_and_loses_nothing_acknowledged(
    etcd_server, weed, meridian_bin, tmp_path_factory, tmp_path
):
    # Models the object store going silent (a network partition, a hung gateway) under load:
    # the owner cannot store a data object, so it acknowledges nothing of what it holds and
    # fails those sends retriably once the commit deadline passes; the client resends, and
    # when the store answers again every send is acknowledged and delivered in order.
    process, endpoint = weed
    with object_brokers(etcd_server.url, endpoint, meridian_bin, tmp_path_factory,
                        "store-outage", 1, CURSOR_PERSIST_INTERVAL_MS) as brokers:
        (owner,) = brokers
        _, topic = topic_owned_by(owner, brokers, owner, "storeoutage")
        client = new_client(owner, tmp_path, "client")
        try:
            consumer = client.subscribe(
                topic, "s", initial_position=pulsar.InitialPosition.Earliest
            )
            producer = client.create_producer(
                topic, send_timeout_millis=90_000, batching_enabled=False
            )
            before = [f"before/{index}".encode() for index in range(10)]
            for payload in before:
                producer.send(payload)
            results: dict[bytes, pulsar.Result] = {}
            during = [f"during/{index}".encode() for index in range(20)]
            process.send_signal(signal.SIGSTOP)
            try:
                producing = produce_paced(producer, during, results)
                producing.join()
                # The owner gave up on a data object at its commit deadline; nothing of it was
                # acknowledged.
                wait_until(
                    lambda: "data object not stored" in owner.log_text(),
                    "the owner failed a commit against the silent store",
                )
                assert not [payload for payload, result in results.items()
                            if result == pulsar.Result.Ok], results
            finally:
                process.send_signal(signal.SIGCONT)
            producer.flush()
            wait_until(lambda: len(results) == len(during), "every send answered")
            failed = {payload: result for payload, result in results.items()
                      if result != pulsar.Result.Ok}
            assert not failed, failed
            seen = receive_covering(consumer, before + during)
            assert list(dict.fromkeys(seen)) == before + during
        finally:
            client.close()
