"""A hostile review of issue 15's security, with the official client and raw frames: each test
is an attack that once got through (or a check that it is still refused), on one broker with
tokens, authorization, super-user `admin`, replicator role `repl` and an audit log.

- Tokens: one not valid yet (`nbf`), one whose `exp` is a fraction of a second in the past, and
  one without the configured audience were accepted.
- A replicator role was a super-user in disguise: on topic paths it could delete topics, grant
  permissions and move cursors; with the configure-once header, anything at all.
- A tenant admin could post another cluster's replicated subscription state (forged
  replication traffic that moves cursors).
- A producer of any role could store marker entries (written by brokers only; never
  delivered, so the messages vanished).
- Any authenticated role read the credentials in cluster records (`authenticationParameters`).
- HTTP lookup skipped its check when the tenant was percent-encoded.

Tests marked "Held" are attacks that were already refused, kept as regression checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import ssl
import time
import urllib.error
import urllib.request

import pulsar
import pytest

import broker_process
import pulsar_frames
from helpers import unique, wait_until
from test_security import (
    Keys, SecuredBroker, assert_connect_refused, audit_lines, await_audit, b64,
    connect_with_token, rest, start_secured, topic_exists,
)
from test_security_authz import new_tenant
from test_security_tls import make_ca, make_server_cert

AUTHORIZATION_ERROR = 4
PROPAGATED = "x-meridian-propagated-from"


@pytest.fixture(scope="module")
def keys(meridian_bin, tmp_path_factory):
    return Keys(meridian_bin, tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secured(module_brokers, meridian_bin, keys, tmp_path_factory):
    extra = (
        'authorization_enabled = true\nsuper_user_roles = ["admin"]\n'
        'replicator_roles = ["repl"]\n'
    )
    return start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("review"), extra)


@pytest.fixture(scope="module")
def tenant(secured, keys):
    """Tenant `rv-…` administered by `rv-admin`, namespace `ns`, where `writer` may produce."""
    name = new_tenant(secured, keys, "rv", "rv-admin")
    path = f"/admin/v2/namespaces/{name}/ns/permissions/writer"
    assert rest(secured, "POST", path, keys.token("admin"), ["produce"])[0] in (200, 204)
    return name


def hs256(keys, claims: dict | bytes) -> str:
    """A token signed with the broker's own secret key, with exactly these claims (a dict, or
    the claims' JSON text as it is)."""
    text = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = b64(b'{"alg":"HS256"}') + "." + b64(text)
    secret = keys.secret.read_bytes()
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def refused_on_connect(broker, token: str, reason: str) -> None:
    """CONNECT with `token` gets ERROR(AuthenticationError) and a closed connection, REST 401,
    and both are audited with `reason`."""
    assert_connect_refused(broker, token)
    await_audit(broker, reason, action="CONNECT", outcome="unauthenticated")
    status, reply = rest(broker, "GET", "/admin/v2/clusters", token)
    assert status == 401 and reason in reply["reason"], (status, reply)
    await_audit(broker, reason, action="GET", resource="/admin/v2/clusters", outcome="unauthenticated")


def test_a_token_not_valid_yet_is_refused_and_writes_nothing(secured, keys, tenant, client_factory):
    token = hs256(keys, {"sub": "writer", "nbf": int(time.time()) + 3600})
    refused_on_connect(secured, token, "not valid yet")
    topic = f"persistent://{tenant}/ns/{unique('nbf')}"
    client = client_factory(secured, operation_timeout_seconds=2,
                            authentication=pulsar.AuthenticationToken(token))
    with pytest.raises(pulsar.PulsarException):
        client.create_producer(topic).send(b"too early")
    assert not topic_exists(secured, keys.token("admin"), topic)


def test_an_expiry_in_fractional_seconds_is_enforced(secured, keys):
    # RFC 7519 allows fractions; a number the broker could not read as whole used to mean
    # "never expires" (on CONNECT and on long-lived connections alike).
    refused_on_connect(secured, hs256(keys, {"sub": "writer", "exp": time.time() - 60.5}), "expired")
    refused_on_connect(secured, hs256(keys, {"sub": "writer", "exp": "tomorrow"}), "not a number")
    fresh = hs256(keys, {"sub": "writer", "exp": time.time() + 3600.5})
    assert rest(secured, "GET", "/admin/v2/clusters", fresh)[0] == 200


def test_a_token_without_the_configured_audience_is_refused(module_brokers, meridian_bin, keys, tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("audience")
    audit = base_dir / "audit.log"
    config = (
        f'authentication_enabled = true\ntoken_secret_key = "file://{keys.secret}"\n'
        f'audit_log_file = "{audit}"\ntoken_audience = "meridian-rv"\n'
    )
    probe = hs256(keys, {"sub": "admin", "aud": "meridian-rv"})
    broker = SecuredBroker(meridian_bin, base_dir, base_dir.name, config, probe)
    broker.audit_path = audit
    module_brokers.brokers.append(broker)
    broker_process.KNOWN_BROKERS.append(broker)
    broker.start()
    refused_on_connect(broker, hs256(keys, {"sub": "admin"}), "audience")
    refused_on_connect(broker, hs256(keys, {"sub": "admin", "aud": "elsewhere"}), "audience")
    assert rest(broker, "GET", "/admin/v2/clusters", probe)[0] == 200
    listed = hs256(keys, {"sub": "admin", "aud": ["elsewhere", "meridian-rv"]})
    assert rest(broker, "GET", "/admin/v2/clusters", listed)[0] == 200


def test_a_replicator_role_is_not_a_super_user(secured, keys, tenant):
    admin, repl = keys.token("admin"), keys.token("repl")
    local = unique("guarded")
    topic_path = f"/admin/v2/persistent/{tenant}/ns/{local}"
    assert rest(secured, "PUT", topic_path, admin)[0] in (200, 204)
    writers = rest(secured, "GET", f"/admin/v2/namespaces/{tenant}/ns/permissions", admin)[1]
    # What replication needs still works: read and create topics.
    assert rest(secured, "GET", f"{topic_path}/partitions", repl)[0] == 200
    created = f"/admin/v2/persistent/{tenant}/ns/{unique('replicated')}"
    assert rest(secured, "PUT", created, repl)[0] in (200, 204)
    # Nothing else on topics.
    for method, path, body in [
        ("DELETE", topic_path, None),
        ("POST", f"{topic_path}/permissions/repl-friend", ["produce", "consume"]),
        ("POST", f"{topic_path}/terminate", None),
    ]:
        status, reply = rest(secured, method, path, repl, body)
        assert status == 403 and "repl" in reply["reason"], (method, path, status, reply)
        await_audit(secured, "repl", action=method, resource=path, role="repl", outcome="denied")
    assert topic_exists(secured, admin, f"persistent://{tenant}/ns/{local}")
    status, grants = rest(secured, "GET", f"{topic_path}/permissions", admin)
    assert status == 200 and "repl-friend" not in grants, grants
    # With the configure-once header: what configure-once writes, not everything.
    headers = {PROPAGATED: "elsewhere"}
    for method, path, body in [
        ("DELETE", f"/admin/v2/namespaces/{tenant}/ns/permissions/writer", None),
        ("POST", f"/admin/v2/namespaces/{tenant}/ns/permissions/repl-friend", ["produce"]),
        ("DELETE", topic_path, None),
        ("DELETE", "/admin/v2/clusters/standalone", None),
    ]:
        status, reply = rest_with(secured, method, path, repl, body, headers)
        assert status == 403 and "configure-once" in reply["reason"], (method, path, status, reply)
        await_audit(secured, "configure-once", action=method, resource=path, role="repl", outcome="denied")
    assert rest(secured, "GET", f"/admin/v2/namespaces/{tenant}/ns/permissions", admin)[1] == writers
    assert topic_exists(secured, admin, f"persistent://{tenant}/ns/{local}")
    assert rest(secured, "GET", "/admin/v2/clusters/standalone", admin)[0] == 200
    pushed = unique("pushed")
    body = {"adminRoles": [], "allowedClusters": ["standalone"]}
    status, reply = rest_with(secured, "PUT", f"/admin/v2/tenants/{pushed}", repl, body, headers)
    assert status in (200, 204), (status, reply)


def rest_with(broker, method, path, token, body, headers):
    """`rest` with extra request headers."""
    all_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}", **headers}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(broker.web_url + path, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode() or "{}")


def backlog(broker, keys, topic: str, subscription: str) -> int:
    path = "/admin/v2/" + topic.replace("://", "/") + "/stats"
    status, stats = rest(broker, "GET", path, keys.token("admin"))
    assert status == 200, stats
    return stats["subscriptions"][subscription]["msgBacklog"]


def test_a_tenant_admin_cannot_post_replicated_subscription_state(secured, keys, tenant, client_factory):
    admin = keys.token("admin")
    cluster = {"serviceUrl": "http://127.0.0.1:9", "brokerServiceUrl": "pulsar://127.0.0.1:9"}
    assert rest(secured, "PUT", "/admin/v2/clusters/west", admin, cluster)[0] in (200, 204, 409)
    topic = f"persistent://{tenant}/ns/{unique('state')}"
    client = client_factory(secured, operation_timeout_seconds=5,
                            authentication=pulsar.AuthenticationToken(admin))
    client.subscribe(topic, "billing").close()
    producer = client.create_producer(topic)
    for index in range(5):
        producer.send(f"m{index}".encode())
    assert backlog(secured, keys, topic, "billing") == 5
    # "west acknowledged everything this cluster wrote", said by the tenant's admin.
    end = "18446744073709551615:0"
    state = {"cluster": "west", "acks": {"origins": {"standalone": {"ackedBelow": end, "ranges": []}}}}
    path = "/admin/v2/" + topic.replace("://", "/") + "/subscription/billing/replicatedSubscriptionState"
    status, reply = rest(secured, "POST", path, keys.token("rv-admin"), state)
    assert status == 403 and "replicated subscription state" in reply["reason"], (status, reply)
    await_audit(secured, "replicated subscription state", action="POST", resource=path,
                role="rv-admin", outcome="denied")
    assert backlog(secured, keys, topic, "billing") == 5
    # The replicator role may (replication posts these).
    assert rest(secured, "POST", path, keys.token("repl"), state)[0] != 403


def test_a_marker_from_a_non_replicator_is_refused(secured, keys, tenant):
    topic = f"persistent://{tenant}/ns/{unique('marker')}"
    with pulsar_frames.RawConnection(secured.broker_port) as raw:
        raw.send(connect_with_token(keys.token("writer")))
        assert raw.read_frame().name == "CONNECTED"
        raw.send(pulsar_frames.producer_frame(topic, producer_id=1, request_id=1))
        frame = raw.read_frame()
        assert frame is not None and frame.name == "PRODUCER_SUCCESS", frame
        name = frame.first(2).decode()
        snapshot_marker = pulsar_frames.field_varint(20, 12)  # marker_type
        raw.send(pulsar_frames.send_frame(1, 0, b"\x08\x01", producer_name=name,
                                          metadata_fields=snapshot_marker))
        frame = raw.read_frame()
        assert frame is not None and frame.name == "SEND_ERROR", frame
        assert frame.first(3) == AUTHORIZATION_ERROR, frame.body
        # An ordinary message on the same producer is stored.
        raw.send(pulsar_frames.send_frame(1, 1, b"ordinary", producer_name=name))
        frame = raw.read_frame()
        assert frame is not None and frame.name == "SEND_RECEIPT", frame
    await_audit(secured, "may not replicate", action="SEND", resource=topic, role="writer", outcome="denied")
    path = "/admin/v2/" + topic.replace("://", "/") + "/internalStats"
    wait_until(lambda: rest(secured, "GET", path, keys.token("admin"))[1]["numberOfEntries"] == 1,
               "one entry stored, not two")


def test_frames_after_a_refused_connect_are_not_served(secured, keys, tenant):
    """Held: CONNECT with a forged token followed at once, in the same write, by PRODUCER and
    SEND: the broker answers ERROR, closes, and creates nothing."""
    topic = f"persistent://{tenant}/ns/{unique('pipelined')}"
    forged = keys.token("admin", secret=keys.other_secret)
    with pulsar_frames.RawConnection(secured.broker_port) as raw:
        raw.send(connect_with_token(forged)
                 + pulsar_frames.producer_frame(topic, producer_id=1, request_id=1)
                 + pulsar_frames.send_frame(1, 0, b"smuggled"))
        frame = raw.read_frame()
        assert frame is not None and frame.name == "ERROR", frame
        assert raw.read_frame() is None, "the connection stays open after refused credentials"
    assert not topic_exists(secured, keys.token("admin"), topic)


def test_an_encoded_path_does_not_skip_the_lookup_check(secured, keys, tenant):
    """HTTP lookup checked the raw path: `%72v-…` is not a valid tenant name, so the check
    waved it through, and the handler, which decodes it, looked the topic up for anyone."""
    local = unique("hidden")
    admin = keys.token("admin")
    assert rest(secured, "PUT", f"/admin/v2/persistent/{tenant}/ns/{local}", admin)[0] in (200, 204)
    plain = f"/lookup/v2/topic/persistent/{tenant}/ns/{local}"
    encoded = f"/lookup/v2/topic/persistent/%{ord(tenant[0]):02x}{tenant[1:]}/ns/{local}"
    assert rest(secured, "GET", plain, admin)[0] == 200
    assert rest(secured, "GET", encoded, admin)[0] == 200, "the handler decodes the path"
    for path in (plain, encoded):
        status, reply = rest(secured, "GET", path, keys.token("stranger"))
        assert status == 403 and "stranger" in reply["reason"], (path, status, reply)
        await_audit(secured, "stranger", action="GET", resource=path, role="stranger", outcome="denied")
    # And decoding works both ways: the tenant's admin may use the encoded path.
    status, _ = rest(secured, "GET", f"/admin/v2/namespaces/%{ord(tenant[0]):02x}{tenant[1:]}/ns/permissions",
                     keys.token("rv-admin"))
    assert status == 200


AUTH_CHALLENGE = 36


def test_an_unanswered_auth_challenge_closes_the_connection(secured, keys, tenant):
    """Held: a client that announced it refreshes credentials but never answers AUTH_CHALLENGE
    is disconnected once its token has expired (the broker checks every second here)."""
    token = hs256(keys, {"sub": "writer", "exp": int(time.time()) + 3})
    supports_auth_refresh = pulsar_frames.field_bytes(10, pulsar_frames.field_varint(1, 1))
    topic = f"persistent://{tenant}/ns/{unique('challenge')}"
    with pulsar_frames.RawConnection(secured.broker_port, timeout_s=30) as raw:
        # CONNECT as `connect_with_token` makes it, with the feature flags.
        body = (pulsar_frames.field_string(1, "compat-raw-socket") + pulsar_frames.field_varint(4, 20)
                + pulsar_frames.field_bytes(3, token.encode()) + pulsar_frames.field_string(5, "token")
                + supports_auth_refresh)
        connect = pulsar_frames.simple_frame(pulsar_frames.base_command(pulsar_frames.CONNECT, body))
        raw.send(connect)
        assert raw.read_frame().name == "CONNECTED"
        raw.send(pulsar_frames.producer_frame(topic, producer_id=1, request_id=1))
        assert raw.read_frame().name == "PRODUCER_SUCCESS"
        frames = []
        while (frame := raw.read_frame()) is not None:
            frames.append(frame.command_type)
        assert AUTH_CHALLENGE in frames, frames
        assert frames[-1] == pulsar_frames.ERROR, frames
    await_audit(secured, "not refreshed in time", action="AUTH_REFRESH", role="writer",
                outcome="unauthenticated")


def test_oversized_and_deeply_nested_tokens_are_refused_and_never_audited(secured, keys):
    """Held: a token nested 5,000 levels deep (signed with the right key), one over the 16 KiB
    limit, and a 1 MiB Authorization header are refused without harm; and no audit line holds
    any token, refused or valid."""
    nested = hs256(keys, b"[" * 5000 + b"]" * 5000)
    huge = hs256(keys, {"sub": "writer", "pad": "x" * 20_000})
    expired = hs256(keys, {"sub": "writer", "exp": int(time.time()) - 5})
    stranger = keys.token("stranger")
    for token, reason in [(nested, "invalid token"), (huge, "at most"), (expired, "expired")]:
        status, reply = rest(secured, "GET", "/admin/v2/clusters", token)
        assert status == 401 and reason in reply["reason"], (status, reply)
        with pulsar_frames.RawConnection(secured.broker_port) as raw:
            raw.send(connect_with_token(token))
            assert raw.read_frame().name == "ERROR"
    assert rest(secured, "GET", "/admin/v2/tenants", stranger)[0] == 403
    giant = urllib.request.Request(secured.web_url + "/admin/v2/clusters",
                                   headers={"Authorization": "Bearer " + "a" * (1 << 20)})
    try:
        with urllib.request.urlopen(giant, timeout=10) as response:
            raise AssertionError(f"a 1 MiB header was served: {response.status}")
    except urllib.error.HTTPError as error:
        assert error.code in (401, 431), error.code
    except (ConnectionError, OSError):
        pass  # closed without an answer: refused too
    assert rest(secured, "GET", "/admin/v2/clusters", keys.token("admin"))[0] == 200
    await_audit(secured, "stranger", role="stranger", outcome="denied")
    text = secured.audit_path.read_text()
    for token in (nested, huge, expired, stranger, keys.token("admin")):
        assert token.split(".")[2] not in text, "a token's signature is in the audit log"


def test_cluster_credentials_are_for_super_users_only(secured, keys):
    """Any authenticated role may read cluster records, and a record carries the token this
    cluster replicates with (`authenticationParameters`): a role with no rights at all read a
    replicator's or super-user's token there."""
    secret = hs256(keys, {"sub": "admin", "note": "replication credentials"})
    name = unique("peer")
    record = {"serviceUrl": "http://127.0.0.1:9", "brokerServiceUrl": "pulsar://127.0.0.1:9",
              "authenticationPlugin": "org.apache.pulsar.client.impl.auth.AuthenticationToken",
              "authenticationParameters": f"token:{secret}"}
    assert rest(secured, "PUT", f"/admin/v2/clusters/{name}", keys.token("admin"), record)[0] in (200, 204)
    status, full = rest(secured, "GET", f"/admin/v2/clusters/{name}", keys.token("admin"))
    assert status == 200 and full["authenticationParameters"] == f"token:{secret}", full
    for role in ("stranger", "repl", "rv-admin"):
        status, seen = rest(secured, "GET", f"/admin/v2/clusters/{name}", keys.token(role))
        assert status == 200 and seen["serviceUrl"] == record["serviceUrl"], (role, status, seen)
        assert "authenticationParameters" not in seen and secret not in json.dumps(seen), (role, seen)
    assert name in rest(secured, "GET", "/admin/v2/clusters", keys.token("stranger"))[1]


def test_commands_on_another_connections_consumer_or_a_forbidden_topic_change_nothing(
        secured, keys, tenant, client_factory):
    """Held: consumer ids belong to their connection, so ACK, SEEK, UNSUBSCRIBE, REDELIVER and
    GET_LAST_MESSAGE_ID naming another client's consumer id act on nothing; SUBSCRIBE without
    consume, and LOOKUP and PARTITIONED_METADATA without any grant, are refused."""
    topic = f"persistent://{tenant}/ns/{unique('victim')}"
    admin = client_factory(secured, operation_timeout_seconds=5,
                           authentication=pulsar.AuthenticationToken(keys.token("admin")))
    victim = admin.subscribe(topic, "billing")  # consumer id 0 or 1 on its connection
    producer = admin.create_producer(topic)
    ids = [producer.send(f"m{index}".encode()) for index in range(3)]
    assert backlog(secured, keys, topic, "billing") == 3
    frame_of = pulsar_frames.simple_frame
    command = pulsar_frames.base_command
    varint = pulsar_frames.field_varint
    position = (ids[-1].ledger_id(), ids[-1].entry_id())
    with pulsar_frames.RawConnection(secured.broker_port) as raw:
        raw.send(connect_with_token(keys.token("writer")))  # may produce, not consume
        assert raw.read_frame().name == "CONNECTED"
        for consumer_id in (0, 1):
            raw.send(pulsar_frames.ack_frame(consumer_id, [position]))
            raw.send(frame_of(command(20, varint(1, consumer_id))))  # REDELIVER
            for kind, request_id in ((12, 10), (28, 11), (29, 12)):  # UNSUBSCRIBE, SEEK, GET_LAST
                body = varint(1, consumer_id) + varint(2, request_id + consumer_id * 10)
                if kind == 28:
                    body += pulsar_frames.field_bytes(3, varint(1, position[0]) + varint(2, position[1]))
                raw.send(frame_of(command(kind, body)))
                frame = raw.read_frame()
                assert frame is not None and frame.name == "ERROR", frame
                assert b"no such consumer" in frame.first(3), frame.body
        raw.send(pulsar_frames.subscribe_frame(topic, "billing", consumer_id=5, request_id=30))
        frame = raw.read_frame()
        assert frame.name == "ERROR" and frame.first(2) == AUTHORIZATION_ERROR, frame
    await_audit(secured, "no consume permission", action="SUBSCRIBE", role="writer", outcome="denied")
    with pulsar_frames.RawConnection(secured.broker_port) as raw:
        raw.send(connect_with_token(keys.token("stranger")))
        assert raw.read_frame().name == "CONNECTED"
        raw.send(pulsar_frames.lookup_frame(topic, request_id=2))
        frame = raw.read_frame()
        assert frame.name == "LOOKUP_RESPONSE" and frame.first(6) == AUTHORIZATION_ERROR, frame
        raw.send(pulsar_frames.partitioned_metadata_frame(topic, request_id=1))
        frame = raw.read_frame()
        assert frame.name == "PARTITIONED_METADATA_RESPONSE" and frame.first(4) == AUTHORIZATION_ERROR, frame
    assert backlog(secured, keys, topic, "billing") == 3
    assert victim.receive(timeout_millis=10_000).data() == b"m0"


def test_every_rest_path_family_needs_credentials_and_rights(secured, keys, tenant, client_factory):
    """Held: each REST path family, without a token (401) and with a role that has no rights
    there (403, audited), changes nothing; the open paths stay open."""
    local = unique("rest")
    topic = f"persistent://{tenant}/ns/{local}"
    admin = client_factory(secured, operation_timeout_seconds=5,
                           authentication=pulsar.AuthenticationToken(keys.token("admin")))
    admin.subscribe(topic, "billing").close()
    admin.create_producer(topic).send(b"kept")
    t = f"/admin/v2/persistent/{tenant}/ns/{local}"
    n = f"/admin/v2/namespaces/{tenant}/ns"
    families = [
        ("PUT", f"/admin/v2/tenants/{unique('new')}", {"adminRoles": [], "allowedClusters": ["standalone"]}),
        ("DELETE", f"/admin/v2/tenants/{tenant}", None),
        ("GET", "/admin/v2/tenants", None),
        ("PUT", f"/admin/v2/namespaces/{tenant}/{unique('ns')}", {}),
        ("POST", f"{n}/retention", {"retentionTimeInMinutes": 1, "retentionSizeInMB": 1}),
        ("POST", f"{n}/permissions/stranger", ["produce", "consume"]),
        ("GET", f"{n}/permissions", None),
        ("DELETE", t, None),
        ("GET", f"{t}/stats", None),
        ("POST", f"{t}/subscription/billing/skip_all", None),
        ("POST", f"{t}/subscription/billing/resetcursor/0", None),
        ("DELETE", f"{t}/subscription/billing", None),
        ("POST", f"{t}/permissions/stranger", ["consume"]),
        ("PUT", "/admin/v2/clusters/elsewhere", {"serviceUrl": "http://127.0.0.1:9"}),
        ("GET", "/admin/v2/brokers/health", None),
        ("GET", "/admin/v2/brokers/configuration/runtime", None),
        ("GET", "/admin/v2/broker-stats/topics", None),
        ("POST", f"/admin/v2/tenants/{tenant}/migration", {}),
        ("GET", f"/lookup/v2/topic/persistent/{tenant}/ns/{local}", None),
    ]
    stranger = keys.token("stranger")
    for method, path, body in families:
        status, reply = rest(secured, method, path, None, body)
        assert status == 401, (method, path, status, reply)
        status, reply = rest(secured, method, path, stranger, body)
        assert status == 403 and "stranger" in reply["reason"], (method, path, status, reply)
        await_audit(secured, "stranger", action=method, resource=path, role="stranger", outcome="denied")
    admin_token = keys.token("admin")
    assert rest(secured, "GET", f"/admin/v2/tenants/{tenant}", admin_token)[0] == 200
    assert "stranger" not in rest(secured, "GET", f"{n}/permissions", admin_token)[1]
    assert "stranger" not in rest(secured, "GET", f"{t}/permissions", admin_token)[1]
    assert backlog(secured, keys, topic, "billing") == 1
    for path in ("/metrics", "/status.html", "/console", "/console/app.js"):
        assert rest_status(secured, path) == 200, path
    assert rest(secured, "GET", "/admin/v2/clusters", stranger)[0] == 200


def rest_status(broker, path: str) -> int:
    with urllib.request.urlopen(broker.web_url + path, timeout=10) as response:
        return response.status


def test_a_reader_stops_when_its_permission_is_revoked(secured, keys, tenant, client_factory):
    """Held: a reader (a non-durable subscription) is closed like a consumer when its role
    loses consume, and reads nothing produced after that."""
    topic = f"persistent://{tenant}/ns/{unique('read')}"
    grant = "/admin/v2/" + topic.replace("://", "/") + "/permissions/reader-role"
    admin = keys.token("admin")
    assert rest(secured, "POST", grant, admin, ["consume"])[0] in (200, 204)
    writer = client_factory(secured, operation_timeout_seconds=5,
                            authentication=pulsar.AuthenticationToken(admin)).create_producer(topic)
    writer.send(b"before")
    client = client_factory(secured, operation_timeout_seconds=3,
                            authentication=pulsar.AuthenticationToken(keys.token("reader-role")))
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    assert reader.read_next(timeout_millis=10_000).data() == b"before"
    assert rest(secured, "DELETE", grant, admin)[0] in (200, 204)
    await_audit(secured, "no consume permission", action="SUBSCRIBE", role="reader-role", outcome="denied")
    writer.send(b"after")
    with pytest.raises(pulsar.Timeout):
        reader.read_next(timeout_millis=3000)
    with pytest.raises(pulsar.PulsarException):
        client.create_reader(topic, pulsar.MessageId.earliest)


def test_a_refused_client_certificate_is_audited(module_brokers, meridian_bin, keys, tmp_path_factory):
    """With mutual TLS, a client without a certificate from the trusted CAs fails the TLS
    handshake: an authentication failure, which was only a debug log line and not audited."""
    certs = tmp_path_factory.mktemp("certs")
    make_ca(certs)
    make_server_cert(certs, "server", "meridian-review")
    broker_tls, web_tls = broker_process.free_port(), broker_process.free_port()
    extra = (
        f"broker_port_tls = {broker_tls}\nweb_port_tls = {web_tls}\n"
        f'tls_certificate_file_path = "{certs / "server.pem"}"\n'
        f'tls_key_file_path = "{certs / "server.key"}"\n'
        f'tls_trust_certs_file_path = "{certs / "ca.pem"}"\n'
        "tls_require_trusted_client_cert_on_connect = true\n"
    )
    broker = start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("mtls"), extra)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    def tls_lines():
        return [line for line in audit_lines(broker) if line["action"] == "TLS"]

    for refused, port in enumerate((broker_tls, web_tls), start=1):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with context.wrap_socket(plain, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"x")
                    tls.recv(1)  # TLS 1.3: the refusal arrives after the client's handshake
        # One line per refused handshake (the first port's line is already there).
        wait_until(lambda: len(tls_lines()) >= refused, f"{refused} TLS audit line(s)")
    lines = tls_lines()
    assert len(lines) == 2, lines
    for line in lines:
        assert line["address"].startswith("127.0.0.1:"), line
        assert line["outcome"] == "unauthenticated", line
        assert "no client certificate" in (line.get("reason") or ""), line


def test_path_tricks_do_not_leave_the_tenant(secured, keys, tenant):
    """Held: a tenant's admin cannot reach another tenant's namespace through `..`, encoded
    slashes, v1 paths, another case or a trailing slash; a producer granted in one namespace
    cannot reach another's topics through a partition suffix or another domain."""
    admin, tenant_admin = keys.token("admin"), keys.token("rv-admin")
    public = "/admin/v2/namespaces/public/default/permissions"
    before = rest(secured, "GET", public, admin)[1]
    for method, path in [
        ("GET", f"/admin/v2/namespaces/{tenant}/../public/default/permissions"),
        ("POST", f"/admin/v2/namespaces/{tenant}/../../public/default/permissions/rv-admin"),
        ("POST", f"/admin/v2/namespaces/{tenant}/..%2F..%2Fpublic%2Fdefault/permissions/rv-admin"),
        ("POST", f"/admin/v2/namespaces/{tenant}%2F..%2Fpublic/default/permissions/rv-admin"),
        ("POST", "/admin/namespaces/public/default/permissions/rv-admin"),
        ("POST", "/admin/v2/NAMESPACES/public/default/permissions/rv-admin"),
        ("POST", "/admin/v2/namespaces/public/default/permissions/rv-admin/"),
    ]:
        status, reply = rest(secured, method, path, tenant_admin, ["produce"] if method == "POST" else None)
        assert status >= 400, (path, status, reply)
    assert rest(secured, "GET", public, admin)[1] == before
    with pulsar_frames.RawConnection(secured.broker_port) as raw:
        raw.send(connect_with_token(keys.token("writer")))
        assert raw.read_frame().name == "CONNECTED"
        for request_id, topic in enumerate([
            f"persistent://public/default/{unique('x')}-partition-0",
            f"public/default/{unique('short')}",
            f"non-persistent://{tenant}/ns/{unique('np')}",
            f"persistent://{tenant}/../public/default/{unique('dots')}",
        ]):
            raw.send(pulsar_frames.producer_frame(topic, producer_id=request_id, request_id=request_id))
            frame = raw.read_frame()
            assert frame is not None and frame.name == "ERROR", (topic, frame)
    status, topics = rest(secured, "GET", "/admin/v2/persistent/public/default", admin)
    assert status == 200 and not any("-partition-0" in t or "short-" in t for t in topics), topics
