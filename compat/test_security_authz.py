"""Authorization with the official client: one broker with tokens, `authorization_enabled` and
super-user role `admin`. Tenant admin roles are enforced on the tenant's namespaces and topics;
`produce` / `consume` grants on a namespace or a topic (REST and `meridian admin`) decide every
PRODUCER, SUBSCRIBE and lookup; a denial is AuthorizationError / 403 with a reason, an audit
entry, and nothing written; a grant revoked, or a tenant's admin roles changed, while a
producer or consumer is connected closes it at once (not at the next periodic check).
"""

from __future__ import annotations

import subprocess

import pulsar
import pytest

from helpers import unique, unique_topic
from test_security import Keys, await_audit, rest, start_secured


@pytest.fixture(scope="module")
def keys(meridian_bin, tmp_path_factory):
    return Keys(meridian_bin, tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secured(module_brokers, meridian_bin, keys, tmp_path_factory):
    extra = 'authorization_enabled = true\nsuper_user_roles = ["admin"]\n'
    return start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("authz"), extra)


def new_tenant(broker, keys, prefix: str, admin_role: str) -> str:
    """A tenant `<prefix>-…` whose admin role is `admin_role`, with namespace `ns` (created by
    that role)."""
    name = unique(prefix)
    body = {"adminRoles": [admin_role], "allowedClusters": ["standalone"]}
    assert rest(broker, "PUT", f"/admin/v2/tenants/{name}", keys.token("admin"), body)[0] in (200, 204)
    status, reply = rest(broker, "PUT", f"/admin/v2/namespaces/{name}/ns", keys.token(admin_role), {})
    assert status in (200, 204), reply
    return name


@pytest.fixture(scope="module")
def tenant(secured, keys):
    """Tenant `acme-…` whose admin role is `acme-admin`, with namespace `ns`."""
    return new_tenant(secured, keys, "acme", "acme-admin")


def client_as(client_factory, broker, keys, role):
    return client_factory(
        broker, operation_timeout_seconds=5,
        authentication=pulsar.AuthenticationToken(keys.token(role)),
    )


def in_counter(broker, keys, topic) -> int:
    path = "/admin/v2/" + topic.replace("://", "/") + "/stats"
    status, stats = rest(broker, "GET", path, keys.token("admin"))
    return stats["msgInCounter"] if status == 200 else 0


def test_tenant_admins_administer_their_tenant_only(secured, keys, tenant):
    tenant_admin = keys.token("acme-admin")
    status, reply = rest(secured, "GET", f"/admin/v2/namespaces/{tenant}/ns", tenant_admin)
    assert status == 200, reply
    for method, path in [
        ("PUT", "/admin/v2/tenants/intruded"),
        ("PUT", "/admin/v2/namespaces/public/intruded"),
        ("GET", "/admin/v2/brokers/health"),
    ]:
        status, reply = rest(secured, method, path, tenant_admin, {} if method == "PUT" else None)
        assert status == 403 and "acme-admin" in reply["reason"], (path, status, reply)
        await_audit(secured, "", action=method, resource=path, role="acme-admin", outcome="denied")
    assert rest(secured, "GET", "/admin/v2/tenants/intruded", keys.token("admin"))[0] == 404
    assert rest(secured, "GET", "/admin/v2/namespaces/public/intruded", keys.token("admin"))[0] == 404
    # A role with no grants at all reads nothing of the tenant.
    status, _ = rest(secured, "GET", f"/admin/v2/namespaces/{tenant}/ns", keys.token("nobody"))
    assert status == 403


def test_produce_and_consume_grants(secured, keys, tenant, meridian_bin, client_factory):
    topic = f"persistent://{tenant}/ns/{unique('orders')}"
    short = topic.removeprefix("persistent://")
    admin_cli = [str(meridian_bin), "admin", "--url", secured.web_url,
                 "--auth-token", keys.token("acme-admin")]
    subprocess.run(admin_cli + ["namespaces", "grant-permission", f"{tenant}/ns",
                                "--role", "writer", "--actions", "produce"], check=True, timeout=30)
    status, _ = rest(secured, "POST", f"/admin/v2/persistent/{short}/permissions/reader",
                     keys.token("acme-admin"), ["consume"])
    assert status in (200, 204)
    status, grants = rest(secured, "GET", f"/admin/v2/persistent/{short}/permissions",
                          keys.token("acme-admin"))
    assert grants == {"writer": ["produce"], "reader": ["consume"]}, grants

    writer = client_as(client_factory, secured, keys, "writer")
    reader = client_as(client_factory, secured, keys, "reader")
    consumer = reader.subscribe(topic, "s")
    writer.create_producer(topic).send(b"granted")
    assert consumer.receive(timeout_millis=10_000).data() == b"granted"

    with pytest.raises(pulsar.PulsarException) as denied:
        reader.create_producer(topic)
    assert "Authorization" in type(denied.value).__name__, denied.value
    await_audit(secured, "no produce permission", action="PRODUCER", role="reader",
                resource=topic, outcome="denied")
    with pytest.raises(pulsar.PulsarException) as denied:
        writer.subscribe(topic, "s2")
    assert "Authorization" in type(denied.value).__name__, denied.value
    await_audit(secured, "no consume permission", action="SUBSCRIBE", role="writer", outcome="denied")
    assert in_counter(secured, keys, topic) == 1


def test_a_valid_token_of_the_wrong_role_writes_nothing(secured, keys, tenant, client_factory):
    topic = f"persistent://{tenant}/ns/{unique('guarded')}"
    stranger = client_as(client_factory, secured, keys, "stranger")
    with pytest.raises(pulsar.PulsarException) as denied:
        stranger.create_producer(topic)
    assert "Authorization" in type(denied.value).__name__, denied.value
    await_audit(secured, "stranger", role="stranger", outcome="denied")
    assert rest(secured, "GET", "/admin/v2/" + topic.replace("://", "/") + "/stats",
                keys.token("admin"))[0] == 404
    # Not even in the namespace it has no grant in: public/default.
    with pytest.raises(pulsar.PulsarException):
        stranger.create_producer(unique_topic("public-guarded"))


def test_permission_revoked_while_connected_closes_the_producer(secured, keys, tenant, client_factory):
    topic = f"persistent://{tenant}/ns/{unique('revoked')}"
    short = topic.removeprefix("persistent://")
    acme_admin = keys.token("acme-admin")
    rest(secured, "POST", f"/admin/v2/persistent/{short}/permissions/temp", acme_admin, ["produce"])
    producer = client_as(client_factory, secured, keys, "temp").create_producer(
        topic, send_timeout_millis=3000
    )
    producer.send(b"while granted")
    status, _ = rest(secured, "DELETE", f"/admin/v2/persistent/{short}/permissions/temp", acme_admin)
    assert status in (200, 204)
    # The next periodic check closes the producer; its re-creation is refused.
    await_audit(secured, "no produce permission", action="PRODUCER", role="temp", outcome="denied")
    with pytest.raises(pulsar.PulsarException):
        producer.send(b"after revocation")
    assert in_counter(secured, keys, topic) == 1


@pytest.fixture(scope="module")
def slow_check(module_brokers, meridian_bin, keys, tmp_path_factory):
    """A broker whose periodic credentials check is an hour away: what closes a producer or
    consumer within the test is the policy change itself."""
    extra = 'authorization_enabled = true\nsuper_user_roles = ["admin"]\n'
    return start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("slow"),
                         extra, refresh_check_seconds=3600)


def test_revocation_takes_effect_at_once(slow_check, keys, client_factory):
    admin = keys.token("admin")
    tenant = unique("rev")
    body = {"adminRoles": ["rev-admin"], "allowedClusters": ["standalone"]}
    assert rest(slow_check, "PUT", f"/admin/v2/tenants/{tenant}", admin, body)[0] in (200, 204)
    assert rest(slow_check, "PUT", f"/admin/v2/namespaces/{tenant}/ns", admin, {})[0] in (200, 204)
    topic = f"persistent://{tenant}/ns/{unique('revoked')}"
    short = topic.removeprefix("persistent://")
    grant = f"/admin/v2/persistent/{short}/permissions/temp"
    assert rest(slow_check, "POST", grant, admin, ["produce", "consume"])[0] in (200, 204)
    temp = client_as(client_factory, slow_check, keys, "temp")
    producer = temp.create_producer(topic, send_timeout_millis=3000)
    consumer = temp.subscribe(topic, "s")
    producer.send(b"while granted")
    assert consumer.receive(timeout_millis=10_000).data() == b"while granted"
    # A tenant admin connected as a producer loses the role.
    tenant_admin = client_as(client_factory, slow_check, keys, "rev-admin").create_producer(
        topic, send_timeout_millis=3000
    )
    tenant_admin.send(b"as tenant admin")

    assert rest(slow_check, "DELETE", grant, admin)[0] in (200, 204)
    await_audit(slow_check, "no produce permission", action="PRODUCER", role="temp", outcome="denied")
    await_audit(slow_check, "no consume permission", action="SUBSCRIBE", role="temp", outcome="denied")
    with pytest.raises(pulsar.PulsarException):
        producer.send(b"after revocation")

    body["adminRoles"] = []
    assert rest(slow_check, "POST", f"/admin/v2/tenants/{tenant}", admin, body)[0] in (200, 204)
    await_audit(slow_check, "no produce permission", action="PRODUCER", role="rev-admin", outcome="denied")
    with pytest.raises(pulsar.PulsarException):
        tenant_admin.send(b"after the role changed")
    assert in_counter(slow_check, keys, topic) == 2
