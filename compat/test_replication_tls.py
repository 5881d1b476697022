"""Replication over TLS: two clusters, `a` and `b`, with token authentication, authorization and
TLS on both and their plain ports turned off. Each registration on `a` carries Pulsar's TLS
fields (`brokerClientTlsEnabled`, `serviceUrlTls`, `brokerServiceUrlTls`,
`brokerClientTrustCertsFilePath`) and the replicator's token, so configure-once, the remote
topic's creation and replication itself all go over `https://` and `pulsar+ssl://`.

Messages produced with the official client over `pulsar+ssl://` on `a` are consumed over TLS
on `b`. A registration that trusts the wrong CA stalls replication with the reason in the
topic's stats (said once in the log), and fixing the registration lets it finish. `meridian
admin` reaches an HTTPS-only broker with `--tls-trust-cert-path`, and without it is refused
with a one-line reason.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pulsar
import pytest

import broker_process
from broker_process import HEALTH_PATH, free_port
from helpers import unique, wait_until
from test_security import Keys, SecuredBroker
from test_security_tls import make_ca, make_server_cert, openssl


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """ca.pem signs server.pem (127.0.0.1); other-ca.pem is a CA that signed nothing here."""
    directory = tmp_path_factory.mktemp("certs")
    make_ca(directory)
    make_server_cert(directory, "server", "meridian-server")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "2",
            "-subj", "/CN=another-ca", cwd=directory)
    return directory


@pytest.fixture(scope="module")
def keys(meridian_bin, tmp_path_factory):
    return Keys(meridian_bin, tmp_path_factory.mktemp("keys"))


class TlsOnlyBroker(SecuredBroker):
    """A secured broker that serves TLS only: ready when its TLS ports answer."""

    def __init__(self, binary, base_dir, name, keys, certs):
        self.broker_port_tls, self.web_port_tls = free_port(), free_port()
        self.ca = certs / "ca.pem"
        config = (
            f'cluster_name = "{name}"\n'
            "authentication_enabled = true\nauthorization_enabled = true\n"
            'super_user_roles = ["admin"]\nreplicator_roles = ["replicator"]\n'
            f'token_secret_key = "file://{keys.secret}"\n'
            "plain_ports_enabled = false\n"
            f"broker_port_tls = {self.broker_port_tls}\nweb_port_tls = {self.web_port_tls}\n"
            f'tls_certificate_file_path = "{certs / "server.pem"}"\n'
            f'tls_key_file_path = "{certs / "server.key"}"\n'
        )
        super().__init__(binary, base_dir, name, config, keys.token("admin"))

    @property
    def service_url(self) -> str:
        return f"pulsar+ssl://127.0.0.1:{self.broker_port_tls}"

    @property
    def web_url(self) -> str:
        return f"https://127.0.0.1:{self.web_port_tls}"

    def _tcp_accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.broker_port_tls), timeout=1):
                return True
        except OSError:
            return False

    def _health_status(self):
        try:
            status, _ = self.rest("GET", HEALTH_PATH)
            return status, f"HTTP {status}"
        except OSError as error:
            return None, repr(error)

    def rest(self, method: str, path: str, body=None):
        """An admin call over HTTPS as the super-user: (status, JSON or text)."""
        request = urllib.request.Request(
            self.web_url + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                text = response.read().decode()
                return response.status, (json.loads(text) if text.startswith(("{", "[")) else text)
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def registration(self, replicator_token: str, trust) -> dict:
        """How peers reach this cluster: its TLS URLs, trusting `trust`, as the replicator."""
        return {
            # The plain URLs are registered too (Pulsar keeps both); nothing listens there.
            "serviceUrl": f"http://127.0.0.1:{self.web_port}",
            "brokerServiceUrl": f"pulsar://127.0.0.1:{self.broker_port}",
            "serviceUrlTls": self.web_url,
            "brokerServiceUrlTls": self.service_url,
            "brokerClientTlsEnabled": True,
            "brokerClientTrustCertsFilePath": str(trust),
            "authenticationPlugin": "org.apache.pulsar.client.impl.auth.AuthenticationToken",
            "authenticationParameters": f"token:{replicator_token}",
        }


@pytest.fixture(scope="module")
def clusters(module_brokers, meridian_bin, keys, certs, tmp_path_factory):
    """`a` and `b`, registered on `a` with TLS; tenant `geo` with namespace `geo/tls`
    replicated between them, configured once on `a` (pushed to `b` over HTTPS)."""
    started = {}
    for name in ("a", "b"):
        broker = TlsOnlyBroker(meridian_bin, tmp_path_factory.mktemp(f"tls-{name}"), name, keys, certs)
        module_brokers.brokers.append(broker)
        broker_process.KNOWN_BROKERS.append(broker)
        # `a` logs its replicators' retries (DEBUG), which the untrusted-peer test counts.
        previous = os.environ.get("RUST_LOG")
        if name == "a":
            os.environ["RUST_LOG"] = "info,meridian_broker::replication::replicator=debug"
        try:
            broker.start()
        finally:
            if previous is None:
                os.environ.pop("RUST_LOG", None)
            else:
                os.environ["RUST_LOG"] = previous
        started[name] = broker
    a, b = started["a"], started["b"]
    replicator = keys.token("replicator")
    # `a` registered itself at startup (POST updates it); `b` is new on `a` (PUT).
    for broker, method in ((a, "POST"), (b, "PUT")):
        status, body = a.rest(method, f"/admin/v2/clusters/{broker.name}",
                              broker.registration(replicator, certs / "ca.pem"))
        assert status in (200, 204), (status, body)
    assert a.rest("PUT", "/admin/v2/tenants/geo", {"adminRoles": [], "allowedClusters": ["a", "b"]})[0] in (200, 204)
    assert a.rest("PUT", "/admin/v2/namespaces/geo/tls")[0] in (200, 204)
    assert a.rest("POST", "/admin/v2/namespaces/geo/tls/replication", ["a", "b"])[0] in (200, 204)
    wait_until(lambda: b.rest("GET", "/admin/v2/namespaces/geo/tls/replication") == (200, ["a", "b"]),
               "configure-once pushed the replicated namespace to b over HTTPS")
    return a, b


def tls_client(broker, keys, certs) -> pulsar.Client:
    return pulsar.Client(
        broker.service_url,
        authentication=pulsar.AuthenticationToken(keys.token("admin")),
        tls_trust_certs_file_path=str(certs / "ca.pem"),
        tls_validate_hostname=True,
        operation_timeout_seconds=10,
    )


def produce(broker, keys, certs, topic: str, payloads: list[bytes]) -> None:
    client = tls_client(broker, keys, certs)
    try:
        producer = client.create_producer(topic)
        for payload in payloads:
            producer.send(payload)
    finally:
        client.close()


def receive_all(broker, keys, certs, topic: str, count: int) -> list[bytes]:
    client = tls_client(broker, keys, certs)
    try:
        consumer = client.subscribe(topic, "check",
                                    initial_position=pulsar.InitialPosition.Earliest)
        return [consumer.receive(timeout_millis=30_000).data() for _ in range(count)]
    finally:
        client.close()


def replication_state(broker, topic: str, remote: str) -> str:
    status, stats = broker.rest("GET", "/admin/v2/" + topic.replace("://", "/") + "/stats")
    if status != 200:
        return ""
    return (stats.get("replication", {}).get(remote) or {}).get("state", "")


def log_lines(broker, *parts: str) -> list[str]:
    return [line for line in broker.log_path.read_text().splitlines()
            if all(part in line for part in parts)]


def test_messages_replicate_over_tls_with_the_registrations_token(clusters, keys, certs):
    a, b = clusters
    topic = f"persistent://geo/tls/{unique('over-tls')}"
    payloads = [f"m{i}".encode() for i in range(5)]
    produce(a, keys, certs, topic, payloads)
    # (Subscribing on b while the replicator creates the topic there can meet the official
    # client's lost retry of "Retryable" subscribe errors: wait until the topic exists.)
    wait_until(lambda: replication_state(a, topic, "b") == "Started", "the replicator started")
    assert receive_all(b, keys, certs, topic, len(payloads)) == payloads


def test_an_untrusted_peer_stalls_replication_until_its_registration_is_fixed(clusters, keys, certs):
    a, b = clusters
    replicator = keys.token("replicator")
    status, body = a.rest("POST", "/admin/v2/clusters/b", b.registration(replicator, certs / "other-ca.pem"))
    assert status in (200, 204), (status, body)
    try:
        topic = f"persistent://geo/tls/{unique('untrusted')}"
        produce(a, keys, certs, topic, [b"held back"])
        wait_until(lambda: "UnknownIssuer" in replication_state(a, topic, "b"),
                   "the replicator's state says b's certificate is not trusted")
        state = replication_state(a, topic, "b")
        assert state.startswith("Disconnected:") and "certificate" in state, state
        # It keeps retrying (logged at DEBUG only)...
        wait_until(lambda: len(log_lines(a, "replication still interrupted", topic, "UnknownIssuer")) >= 2,
                   "the replicator retried twice")
        # Nothing reached b meanwhile (its topic was not even created: that call is refused).
        assert b.rest("GET", "/admin/v2/" + topic.replace("://", "/") + "/stats")[0] == 404
    finally:
        status, body = a.rest("POST", "/admin/v2/clusters/b", b.registration(replicator, certs / "ca.pem"))
        assert status in (200, 204), (status, body)
    wait_until(lambda: replication_state(a, topic, "b") == "Started", "the replicator started")
    assert receive_all(b, keys, certs, topic, 1) == [b"held back"]
    # ...but said why once, not at every retry.
    warnings = log_lines(a, "WARN", "replication interrupted", topic, "UnknownIssuer")
    assert len(warnings) == 1, warnings


@pytest.mark.allow_broker_errors(r"replication stopped")
def test_a_registration_whose_trust_file_is_missing_stops_replication_until_fixed(clusters, keys, certs):
    a, b = clusters
    replicator = keys.token("replicator")
    missing = certs / "no-such-ca.pem"
    status, body = a.rest("POST", "/admin/v2/clusters/b", b.registration(replicator, missing))
    assert status in (200, 204), (status, body)
    try:
        topic = f"persistent://geo/tls/{unique('no-trust-file')}"
        produce(a, keys, certs, topic, [b"waits for the file"])
        wait_until(lambda: replication_state(a, topic, "b").startswith("Stopped: ")
                   and str(missing) in replication_state(a, topic, "b"),
                   "the replicator's state names the missing trust file")
    finally:
        status, body = a.rest("POST", "/admin/v2/clusters/b", b.registration(replicator, certs / "ca.pem"))
        assert status in (200, 204), (status, body)
    wait_until(lambda: replication_state(a, topic, "b") == "Started", "the replicator started")
    assert receive_all(b, keys, certs, topic, 1) == [b"waits for the file"]


def admin(meridian_bin, broker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(meridian_bin), "admin", "--url", broker.web_url, "--auth-token", broker.token, *args],
        capture_output=True, text=True, timeout=60)


def test_meridian_admin_over_https_needs_the_ca(clusters, meridian_bin, certs):
    a, _ = clusters
    trusted = admin(meridian_bin, a, "--tls-trust-cert-path", str(certs / "ca.pem"), "clusters", "list")
    assert trusted.returncode == 0, trusted.stderr
    assert sorted(trusted.stdout.split()) == ["a", "b"], trusted.stdout
    refused = admin(meridian_bin, a, "clusters", "list")
    assert refused.returncode != 0
    assert "certificate" in refused.stderr and "--tls-trust-cert-path" in refused.stderr, refused.stderr
    assert "backtrace" not in refused.stderr.lower() and len(refused.stderr.splitlines()) == 1, refused.stderr


def test_a_lookup_over_https_answers_the_tls_urls(clusters):
    a, _ = clusters
    status, answer = a.rest("GET", "/lookup/v2/topic/persistent/geo/tls/" + unique("lookup"))
    assert status == 200, answer
    assert answer["brokerUrlTls"] == a.service_url, answer
    assert answer["httpUrlTls"] == a.web_url, answer


def test_meridian_client_produces_over_pulsar_ssl(clusters, meridian_bin, keys, certs):
    a, _ = clusters
    topic = f"persistent://geo/tls/{unique('cli')}"

    def produce_with(*tls: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(meridian_bin), "client", "--url", a.service_url, "--auth-token", a.token, *tls,
             "produce", topic, "-m", "from the cli"],
            capture_output=True, text=True, timeout=60)

    refused = produce_with()
    assert refused.returncode != 0
    assert "UnknownIssuer" in refused.stderr and "--tls-trust-cert-path" in refused.stderr, refused.stderr
    sent = produce_with("--tls-trust-cert-path", str(certs / "ca.pem"))
    assert sent.returncode == 0, sent.stderr
    assert receive_all(a, keys, certs, topic, 1) == [b"from the cli"]


def test_the_lookup_front_door_reaches_tls_clusters_and_answers_their_tls_urls(
        clusters, meridian_bin, certs, tmp_path, monkeypatch):
    """`meridian lookup --clusters https://...` calls the clusters over TLS (their plain ports
    are closed) and answers with the home's TLS URLs next to the plain ones."""
    from test_lookup_front_door import FrontDoor, http_lookup, lookup

    a, b = clusters
    monkeypatch.setenv("MERIDIAN_AUTH_TOKEN", a.token)
    monkeypatch.setenv("MERIDIAN_TLS_TRUST_CERT_PATH", str(certs / "ca.pem"))
    door = FrontDoor(meridian_bin, tmp_path / "lookup.log", [a.web_url, b.web_url]).start()
    try:
        topic = f"persistent://geo/tls/{unique('front-door')}"
        # geo is on both clusters and migrates nowhere: its home is the first, a.
        answer = http_lookup(door, topic)
        assert answer["brokerUrlTls"] == a.service_url, answer
        assert answer["brokerUrl"] == f"pulsar://127.0.0.1:{a.broker_port}", answer
        assert answer["httpUrlTls"] == a.web_url, answer
        reply = lookup(door, topic)
        assert reply.first(2, b"").decode() == a.service_url, reply
    finally:
        door.stop()
    assert not door.errors(), door.errors()
