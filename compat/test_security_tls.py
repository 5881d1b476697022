"""TLS with the official client: one broker with `pulsar+ssl://` and HTTPS ports (certificates
made at test time with `openssl`, signed by a test CA), mutual TLS (client certificates from the
same CA required) and token authentication. Produce, consume and admin over TLS; a client that
does not trust the CA, or has no client certificate, is refused; a certificate replaced on disk
is served to the next connection without a restart.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pulsar
import pytest

from broker_process import free_port
from helpers import unique_topic, wait_until
from test_security import Keys, await_audit, rest, start_secured, topic_exists


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=meridian-test-ca",
            cwd=directory)


def make_server_cert(directory, name: str, common_name: str,
                     names: str = "IP:127.0.0.1,DNS:localhost") -> None:
    """`name`.pem / `name`.key for `names` (127.0.0.1 and localhost), signed by the test CA
    (also used as a client certificate)."""
    (directory / "san.ext").write_text(f"subjectAltName={names}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
            cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext",
            cwd=directory)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    make_ca(directory)
    make_server_cert(directory, "server", "meridian-first")
    make_server_cert(directory, "client", "alice")
    return directory


@pytest.fixture(scope="module")
def keys(meridian_bin, tmp_path_factory):
    return Keys(meridian_bin, tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secured(module_brokers, meridian_bin, keys, certs, tmp_path_factory):
    broker_tls, web_tls = free_port(), free_port()
    extra = (
        f"broker_port_tls = {broker_tls}\n"
        f"web_port_tls = {web_tls}\n"
        f'tls_certificate_file_path = "{certs / "server.pem"}"\n'
        f'tls_key_file_path = "{certs / "server.key"}"\n'
        f'tls_trust_certs_file_path = "{certs / "ca.pem"}"\n'
        "tls_require_trusted_client_cert_on_connect = true\n"
    )
    broker = start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("tls"), extra)
    broker.tls_service_url = f"pulsar+ssl://127.0.0.1:{broker_tls}"
    broker.tls_web_url = f"https://127.0.0.1:{web_tls}"
    broker.web_tls_port = web_tls
    return broker


def https(broker, path: str, token: str, ca, client_cert=None) -> tuple[int, object]:
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if client_cert is not None:
        context.load_cert_chain(client_cert / "client.pem", client_cert / "client.key")
    request = urllib.request.Request(broker.tls_web_url + path,
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return response.status, json.loads(response.read().decode() or "null")


def served_certificate(port: int, certs) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(certs / "client.pem", certs / "client.key")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


def pem_to_der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_produce_consume_and_admin_over_tls_with_a_token(secured, keys, certs, client_factory):
    topic = unique_topic("tls")
    client = pulsar.Client(
        secured.tls_service_url,
        authentication=pulsar.AuthenticationToken(keys.token("alice")),
        tls_trust_certs_file_path=str(certs / "ca.pem"),
        tls_validate_hostname=True,
        tls_certificate_file_path=str(certs / "client.pem"),
        tls_private_key_file_path=str(certs / "client.key"),
        operation_timeout_seconds=10,
    )
    try:
        consumer = client.subscribe(topic, "s")
        client.create_producer(topic).send(b"over tls")
        assert consumer.receive(timeout_millis=10_000).data() == b"over tls"
    finally:
        client.close()
    status, stats = https(secured, "/admin/v2/" + topic.replace("://", "/") + "/stats",
                          keys.token("admin"), certs / "ca.pem", certs)
    assert status == 200 and stats["msgInCounter"] == 1, stats


@pytest.mark.parametrize("missing", ["trust in the CA", "a client certificate"])
def test_a_client_without_trust_or_certificate_is_refused(secured, keys, certs, missing):
    topic = unique_topic("tls-refused")
    settings = {"tls_trust_certs_file_path": str(certs / "ca.pem")}
    if missing == "a client certificate":
        ca, client_cert = certs / "ca.pem", None
    else:
        settings = {"tls_certificate_file_path": str(certs / "client.pem"),
                    "tls_private_key_file_path": str(certs / "client.key")}
        ca, client_cert = None, certs  # the system's trust store does not hold the test CA
    client = pulsar.Client(
        secured.tls_service_url,
        authentication=pulsar.AuthenticationToken(keys.token("alice")),
        operation_timeout_seconds=3,
        **settings,
    )
    try:
        with pytest.raises(pulsar.PulsarException):
            client.create_producer(topic)
    finally:
        client.close()
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https(secured, "/admin/v2/clusters", keys.token("admin"), ca, client_cert)
    assert not topic_exists(secured, keys.token("admin"), topic)


def test_a_replaced_certificate_is_served_without_a_restart(secured, certs):
    assert served_certificate(secured.web_tls_port, certs) == pem_to_der(certs / "server.pem")
    make_server_cert(certs, "renewed", "meridian-renewed")
    (certs / "renewed.key").replace(certs / "server.key")
    (certs / "renewed.pem").replace(certs / "server.pem")
    wait_until(lambda: served_certificate(secured.web_tls_port, certs)
               == pem_to_der(certs / "server.pem"),
               "the renewed certificate is served")


def test_a_client_certificate_authenticates_with_its_cn_as_the_role(module_brokers, meridian_bin, keys, certs,
                                                                    tmp_path_factory):
    """`tls_authentication_enabled` (Pulsar's AuthenticationProviderTls): the Python client's
    AuthenticationTLS connects as the certificate's CN (`alice`), whose permissions decide."""
    broker_tls = free_port()
    extra = (
        f"broker_port_tls = {broker_tls}\n"
        f'tls_certificate_file_path = "{certs / "server.pem"}"\n'
        f'tls_key_file_path = "{certs / "server.key"}"\n'
        f'tls_trust_certs_file_path = "{certs / "ca.pem"}"\n'
        "tls_require_trusted_client_cert_on_connect = true\n"
        "tls_authentication_enabled = true\n"
        'authorization_enabled = true\nsuper_user_roles = ["admin"]\n'
    )
    broker = start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("tls-roles"), extra)
    topic = unique_topic("cn-role")

    def alice():
        return pulsar.Client(
            f"pulsar+ssl://127.0.0.1:{broker_tls}",
            authentication=pulsar.AuthenticationTLS(str(certs / "client.pem"), str(certs / "client.key")),
            tls_trust_certs_file_path=str(certs / "ca.pem"),
            operation_timeout_seconds=5,
        )

    client = alice()
    try:
        with pytest.raises(pulsar.PulsarException):
            client.create_producer(topic)
        # Refused at the lookup: the role is the certificate's CN.
        await_audit(broker, "role 'alice' has no produce or consume permission", role="alice", outcome="denied")
    finally:
        client.close()
    grant = "/admin/v2/namespaces/public/default/permissions/alice"
    assert rest(broker, "POST", grant, keys.token("admin"), ["produce"])[0] in (200, 204)
    client = alice()
    try:
        client.create_producer(topic).send(b"as alice")
    finally:
        client.close()


def test_meridian_admin_and_client_present_a_client_certificate(secured, keys, certs, meridian_bin):
    """Mutual TLS from our own tools: `--tls-cert-file` / `--tls-key-file` (both ports require
    a client certificate here)."""
    topic = unique_topic("mtls-cli")
    trust = ["--tls-trust-cert-path", str(certs / "ca.pem")]
    mine = ["--tls-cert-file", str(certs / "client.pem"), "--tls-key-file", str(certs / "client.key")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(meridian_bin), *args], capture_output=True, text=True, timeout=60)

    admin = ["admin", "--url", secured.tls_web_url, "--auth-token", keys.token("admin"), *trust]
    without = run(*admin, "clusters", "list")
    assert without.returncode != 0 and "cannot reach" in without.stderr, without.stderr
    listed = run(*admin, *mine, "clusters", "list")
    assert listed.returncode == 0 and "standalone" in listed.stdout, listed.stderr

    client = ["client", "--url", secured.tls_service_url, "--auth-token", keys.token("admin"), *trust]
    assert run(*client, "produce", topic, "-m", "no certificate").returncode != 0
    sent = run(*client, *mine, "produce", topic, "-m", "with a certificate")
    assert sent.returncode == 0, sent.stderr
    status, stats = https(secured, "/admin/v2/" + topic.replace("://", "/") + "/stats",
                          keys.token("admin"), certs / "ca.pem", certs)
    assert status == 200 and stats["msgInCounter"] == 1, stats


def test_our_tools_check_that_the_certificate_names_the_host(module_brokers, meridian_bin, keys, certs,
                                                              tmp_path_factory):
    """A broker whose certificate names only `localhost`: `https://localhost` is accepted,
    `https://127.0.0.1` is refused (the address is not in the certificate), both trusting the CA."""
    make_server_cert(certs, "dns-only", "localhost", names="DNS:localhost")
    web_tls = free_port()
    extra = (
        f"web_port_tls = {web_tls}\n"
        f'tls_certificate_file_path = "{certs / "dns-only.pem"}"\n'
        f'tls_key_file_path = "{certs / "dns-only.key"}"\n'
    )
    start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("tls-names"), extra)

    def admin(host: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(meridian_bin), "admin", "--url", f"https://{host}:{web_tls}",
             "--auth-token", keys.token("admin"), "--tls-trust-cert-path", str(certs / "ca.pem"),
             "clusters", "list"],
            capture_output=True, text=True, timeout=60)

    by_name = admin("localhost")
    assert by_name.returncode == 0 and "standalone" in by_name.stdout, by_name.stderr
    by_address = admin("127.0.0.1")
    assert by_address.returncode != 0, by_address.stdout
    assert 'not valid for name "127.0.0.1"' in by_address.stderr, by_address.stderr
    assert "use a name it carries" in by_address.stderr, by_address.stderr
