"""Token authentication with the official client: one broker with `authentication_enabled` and
an HS256 secret key made by `meridian tokens`, and an audit log.

Every bypass attempt (no token, expired, forged signature, `alg: none`, another algorithm,
commands before CONNECT, REST without credentials) is refused with the right error, leaves an
audit entry, and writes nothing. A long-lived connection whose token expires is challenged
(AUTH_CHALLENGE): a client with a token supplier refreshes and keeps working; one whose token
cannot be refreshed is disconnected.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pulsar
import pytest

import broker_process
import pulsar_frames
from broker_process import HEALTH_PATH, BrokerProcess
from helpers import unique_topic, wait_until


def meridian(binary, *args: str) -> str:
    return subprocess.run(
        [str(binary), *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


class SecuredBroker(BrokerProcess):
    """A broker whose health check needs a token, with a TOML config of any values."""

    def __init__(self, binary, base_dir, name, config_text: str, token: str):
        super().__init__(binary, base_dir, name, None)
        self.config_path = self.base_dir / "meridian.toml"
        self.config_path.write_text(config_text)
        self.token = token

    def _health_status(self):
        request = urllib.request.Request(
            self.web_url + HEALTH_PATH, headers={"Authorization": f"Bearer {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status, f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            return error.code, f"HTTP {error.code}"
        except OSError as error:
            return None, repr(error)


class Keys:
    def __init__(self, binary, directory):
        self.binary = binary
        self.secret = directory / "secret.key"
        meridian(binary, "tokens", "create-secret-key", "--output", str(self.secret))
        self.other_secret = directory / "other.key"
        meridian(binary, "tokens", "create-secret-key", "--output", str(self.other_secret))

    def token(self, role: str, expiry: str | None = None, secret=None) -> str:
        args = ["tokens", "create", "--secret-key", f"file://{secret or self.secret}"]
        args += ["--subject", role]
        if expiry:
            args += ["--expiry-time", expiry]
        return meridian(self.binary, *args)


@pytest.fixture(scope="module")
def keys(meridian_bin, tmp_path_factory):
    return Keys(meridian_bin, tmp_path_factory.mktemp("keys"))


def start_secured(module_brokers, meridian_bin, keys, base_dir, extra_config: str = "",
                  refresh_check_seconds: int = 1):
    """A broker with token authentication (the `keys` secret), an audit log, a credentials
    check every `refresh_check_seconds` and `extra_config`, stopped with the module's brokers."""
    audit = base_dir / "audit.log"
    config = (
        "authentication_enabled = true\n"
        f'token_secret_key = "file://{keys.secret}"\n'
        f'audit_log_file = "{audit}"\n'
        f"authentication_refresh_check_seconds = {refresh_check_seconds}\n"
    ) + extra_config
    broker = SecuredBroker(meridian_bin, base_dir, base_dir.name, config, keys.token("admin"))
    broker.audit_path = audit
    module_brokers.brokers.append(broker)
    broker_process.KNOWN_BROKERS.append(broker)
    broker.start()
    return broker


@pytest.fixture(scope="module")
def secured(module_brokers, meridian_bin, keys, tmp_path_factory):
    return start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("secured"))


def audit_lines(broker) -> list[dict]:
    if not broker.audit_path.exists():
        return []
    return [json.loads(line) for line in broker.audit_path.read_text().splitlines()]


def await_audit(broker, what: str, **fields) -> dict:
    """Waits for an audit line with these fields (and `reason` containing `what`)."""
    found = []

    def present():
        found[:] = [
            line for line in audit_lines(broker)
            if all(line.get(k) == v for k, v in fields.items()) and what in (line.get("reason") or "")
        ]
        return bool(found)

    wait_until(present, f"an audit line {fields} with reason containing {what!r}")
    return found[-1]


def rest(broker, method: str, path: str, token: str | None = None, body: dict | None = None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(broker.web_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            return response.status, (json.loads(text) if text.startswith(("{", "[")) else text)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode() or "{}")


def topic_exists(broker, admin_token: str, topic: str) -> bool:
    path = "/admin/v2/" + topic.replace("://", "/") + "/stats"
    return rest(broker, "GET", path, admin_token)[0] == 200


def client_for(client_factory, broker, token=None, **kwargs):
    if token is not None:
        kwargs["authentication"] = pulsar.AuthenticationToken(token)
    kwargs.setdefault("operation_timeout_seconds", 5)
    return client_factory(broker, **kwargs)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_valid_token_produces_and_consumes(secured, keys, client_factory):
    topic = unique_topic("auth-ok")
    client = client_for(client_factory, secured, keys.token("alice", "1h"))
    consumer = client.subscribe(topic, "s")
    producer = client.create_producer(topic)
    producer.send(b"hello")
    assert consumer.receive(timeout_millis=10_000).data() == b"hello"


def bad_tokens(keys) -> dict:
    good = keys.token("alice")
    header, body, _ = good.split(".")
    return {
        "expired": (keys.token("alice", "1s"), "expired"),
        "forged signature": (keys.token("alice", secret=keys.other_secret), "signature"),
        "alg none": (
            b64(b'{"alg":"none"}') + "." + b64(b'{"sub":"admin"}') + ".",
            "invalid token",
        ),
        "tampered claims": (header + "." + b64(b'{"sub":"admin"}') + "." + good.split(".")[2], "signature"),
        "garbage": ("not-a-jwt", "invalid token"),
    }


@pytest.mark.parametrize(
    "case", ["no token", "expired", "forged signature", "alg none", "tampered claims", "garbage"]
)
def test_bad_credentials_are_refused_audited_and_write_nothing(secured, keys, client_factory, case):
    if case == "no token":
        token, reason = None, "not accepted"
    else:
        token, reason = bad_tokens(keys)[case]
        if case == "expired":
            wait_until(lambda: _expired(token), "the token expired")
    topic = unique_topic("auth-bad")
    # The official client retries a refused CONNECT until its operation timeout.
    client = client_for(client_factory, secured, token, operation_timeout_seconds=2)
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic)
    line = await_audit(secured, reason, action="CONNECT", outcome="unauthenticated")
    assert line["address"].startswith("127.0.0.1:")
    assert not topic_exists(secured, keys.token("admin"), topic)
    assert_connect_refused(secured, token)


AUTHENTICATION_ERROR = 3


def assert_connect_refused(broker, token: str | None) -> None:
    """On the wire the refusal is ERROR(AuthenticationError), then the connection closes."""
    with pulsar_frames.RawConnection(broker.broker_port) as raw:
        raw.send(connect_with_token(token))
        frame = raw.read_frame()
        assert frame is not None and frame.name == "ERROR", frame
        assert frame.first(2) == AUTHENTICATION_ERROR, frame.body
        assert raw.read_frame() is None, "the connection stays open after refused credentials"


def connect_with_token(token: str | None) -> bytes:
    body = pulsar_frames.field_string(1, "compat-raw-socket") + pulsar_frames.field_varint(4, 20)
    if token is not None:
        body += pulsar_frames.field_bytes(3, token.encode()) + pulsar_frames.field_string(5, "token")
    return pulsar_frames.simple_frame(pulsar_frames.base_command(pulsar_frames.CONNECT, body))


def _expired(token: str) -> bool:
    body = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    # The broker compares whole seconds: expired once the current second is past `exp`.
    return claims["exp"] < int(time.time())


def test_commands_before_connect_are_refused(secured, keys):
    topic = unique_topic("auth-raw")
    with pulsar_frames.RawConnection(secured.broker_port) as raw:
        raw.send(pulsar_frames.producer_frame(topic, producer_id=1, request_id=1))
        frame = raw.read_frame()
        assert frame is not None and frame.name == "ERROR", frame
        assert raw.read_frame() is None, "the connection stays open after a command before CONNECT"
    await_audit(secured, "before CONNECT", action="PRODUCER", outcome="unauthenticated")
    assert not topic_exists(secured, keys.token("admin"), topic)


def test_rest_needs_a_valid_bearer_token(secured, keys):
    tenant = f"t-{int(time.time() * 1000)}"
    body = {"adminRoles": [], "allowedClusters": ["standalone"]}
    status, reply = rest(secured, "PUT", f"/admin/v2/tenants/{tenant}", None, body)
    assert status == 401 and "Bearer" in reply["reason"], (status, reply)
    await_audit(secured, "authentication required", action="PUT",
                resource=f"/admin/v2/tenants/{tenant}", outcome="unauthenticated")
    forged = keys.token("admin", secret=keys.other_secret)
    status, reply = rest(secured, "PUT", f"/admin/v2/tenants/{tenant}", forged, body)
    assert status == 401 and "signature" in reply["reason"], (status, reply)
    admin = keys.token("admin")
    assert rest(secured, "GET", f"/admin/v2/tenants/{tenant}", admin)[0] == 404
    # Metrics stay open, as in Pulsar.
    assert rest(secured, "GET", "/metrics")[0] == 200
    # With a valid token the mutation is served, and audited.
    assert rest(secured, "PUT", f"/admin/v2/tenants/{tenant}", admin, body)[0] in (200, 204)
    await_audit(secured, "", action="PUT", resource=f"/admin/v2/tenants/{tenant}",
                outcome="allowed", role="admin")


def test_expiring_token_is_refreshed_through_auth_challenge(secured, keys, client_factory):
    issued = []

    def supplier():
        token = keys.token("alice", "3s")
        issued.append(token)
        return token

    topic = unique_topic("auth-refresh")
    client = client_factory(
        secured, operation_timeout_seconds=5,
        authentication=pulsar.AuthenticationToken(supplier),
    )
    producer = client.create_producer(topic)
    consumer = client.subscribe(topic, "s")
    first = len(issued)
    # The broker challenges once the first token has expired; the client answers with a new one.
    wait_until(lambda: len(issued) > first and _expired(issued[first - 1]),
               "the client was asked for a fresh token after the first expired", timeout_s=30)
    producer.send(b"after refresh")
    assert consumer.receive(timeout_millis=10_000).data() == b"after refresh"
    refusals = [line for line in audit_lines(secured)
                if line.get("role") == "alice" and line["outcome"] == "unauthenticated"]
    assert refusals == []


def test_expired_token_that_cannot_be_refreshed_disconnects(secured, keys, client_factory):
    token = keys.token("carol", "3s")
    topic = unique_topic("auth-expire")
    client = client_factory(secured, operation_timeout_seconds=5,
                            authentication=pulsar.AuthenticationToken(token))
    producer = client.create_producer(topic, send_timeout_millis=3000)
    producer.send(b"before expiry")
    # The client answers the challenge with the same, expired token: refused, disconnected.
    await_audit(secured, "expired", role="carol", outcome="unauthenticated", action="AUTH_RESPONSE")
    with pytest.raises(pulsar.PulsarException):
        producer.send(b"after expiry")
    admin = keys.token("admin")
    stats = rest(secured, "GET", "/admin/v2/" + topic.replace("://", "/") + "/stats", admin)[1]
    assert stats["msgInCounter"] == 1, stats


def test_connections_per_role_are_limited(module_brokers, meridian_bin, keys, client_factory, tmp_path_factory):
    broker = start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("capped"),
                           "max_connections_per_role = 2\n")
    topic = unique_topic("capped")
    first_client = client_for(client_factory, broker, keys.token("capped"))
    first_client.create_producer(topic)
    second = client_for(client_factory, broker, keys.token("capped")).create_producer(topic)
    with pytest.raises(pulsar.PulsarException):
        client_for(client_factory, broker, keys.token("capped")).create_producer(topic)
    line = await_audit(broker, "already holds 2 connections", action="CONNECT", outcome="denied")
    assert line["role"] == "capped"
    # Another role is not counted with it; a closed connection frees its place.
    client_for(client_factory, broker, keys.token("other")).create_producer(topic).send(b"other")
    first_client.close()
    third = client_for(client_factory, broker, keys.token("capped")).create_producer(topic)
    third.send(b"third")
    second.send(b"second")
