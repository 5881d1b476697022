"""The web console (`/console`) in a real headless Chromium, against two clusters replicating
both ways with traffic from the official client.

Each page is loaded through the DevTools protocol (`browser.py`); the test awaits the page's
own signal that it drew itself from the REST API (`#view[data-route]` equal to the location's
hash), then compares what the page shows with what the REST API answers for the same thing:
topic names, backlogs, counters, consumer names, the replication link to the other cluster and
the replicated subscription's sync state. Every page must load without a console error, an
uncaught exception or a browser error (a failed request, a Content-Security-Policy violation).
Names are user input: a consumer, a topic and a subscription named like HTML must show as
text and create no element.

`MERIDIAN_CONSOLE_SCREENSHOT=<file.png>` saves the replication view (scripts/console-screenshot.sh
regenerates docs/images/console-replication.png with it); by default nothing is written.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pulsar
import pytest

from browser import Browser
from helpers import corrupt_segments, receive_n, unique
from replication_harness import (
    REPLICATION_TIMEOUT_S,
    await_condition,
    clusters_factory,  # noqa: F401 (fixture)
    topic_path,
)

HOSTILE_CONSUMER = '<img src=x id="consumer-injected">&amp;'
HOSTILE_TOPIC_LOCAL = '<b id="topic-injected">orders&amp;"\''  # no '/': it would separate names
HOSTILE_SUBSCRIPTION = "<script>window.injected = 1</script>"
PAGE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium for the module; each test opens its pages in the same tab."""
    chromium = Browser(tmp_path_factory.mktemp("chromium"))
    yield chromium
    chromium.close()


class Console:
    """The console of one cluster, opened in the module's browser."""

    def __init__(self, browser: Browser, web_url: str):
        self.browser = browser
        self.web_url = web_url
        # The tab may still show an earlier test's console, polling a broker that has stopped:
        # leave it, then forget what it reported (the round trip drains its last events).
        browser.navigate("about:blank")
        browser.evaluate("1")
        browser.problems.clear()

    def open(self, *segments: str) -> None:
        """Loads `#/<segments>` and waits until the page drew it; fails on any problem seen."""
        hash_part = "#/" + "/".join(quote(segment, safe="") for segment in segments)
        self.browser.navigate(f"{self.web_url}/console{hash_part}")
        await_condition(
            lambda: self.browser.evaluate(
                "(() => { const view = document.getElementById('view');"
                " return !!view && view.dataset.route === location.hash; })()"
            ),
            PAGE_TIMEOUT_S,
            f"the console drew {hash_part} (error banner: {self.error_banner()!r})",
        )
        self.assert_clean()

    def error_banner(self) -> str:
        return self.browser.evaluate(
            "(() => { const box = document.getElementById('error');"
            " return box && !box.hidden ? box.innerText : ''; })()"
        ) or ""

    def assert_clean(self) -> None:
        assert self.browser.problems == [], "the page logged problems"
        assert self.error_banner() == ""
        injected = self.browser.evaluate(
            "document.querySelectorAll('#view img, #view script, #view b').length"
            " + (window.injected ? 1000 : 0)"
        )
        assert injected == 0, "a name was rendered as HTML"

    def find(self, **attributes: str):
        """The element whose `data-<key>` attributes equal `attributes`: for a table row,
        `{column: text}` of its cells; otherwise its text. None while there is none."""
        return self.browser.evaluate(
            f"""(() => {{
              const wanted = Object.entries({json.dumps(attributes)});
              const element = [...document.querySelectorAll('#view *')].find((candidate) =>
                wanted.every(([key, value]) => candidate.getAttribute('data-' + key) === value));
              if (!element) return null;
              if (element.tagName !== 'TR') return element.innerText;
              return Object.fromEntries([...element.children].map((cell) => [cell.dataset.col, cell.innerText]));
            }})()"""
        )

    def await_shows(self, what: str, expected: dict, **attributes: str) -> dict:
        """Waits (across the page's refreshes) until the row has `expected` cells."""
        seen = [None]

        def check():
            seen[0] = self.find(**attributes)
            return seen[0] if seen[0] and all(seen[0].get(key) == value for key, value in expected.items()) else None

        try:
            row = await_condition(check, PAGE_TIMEOUT_S, what)
        except AssertionError as error:
            raise AssertionError(f"{error}\nlast row seen: {seen[0]}\nexpected: {expected}") from None
        self.assert_clean()
        return row


def number(value: int) -> str:
    """A count as the console writes it (thousands separated by commas)."""
    return f"{value:,}"


def backlog_of(stats: dict) -> int:
    return sum(subscription["msgBacklog"] for subscription in stats["subscriptions"].values())


def test_console_pages_show_what_the_rest_api_reports(browser, clusters_factory):
    clusters = clusters_factory(("a", "b"))
    namespace = clusters.create_replicated_namespace(f"{unique('console')}/ns", ["a", "b"])
    topic = f"persistent://{namespace}/orders"
    tenant, local_namespace = namespace.split("/")

    # Traffic on a: 20 messages, a replicated Shared subscription that acknowledges 5.
    consumer = clusters.client("a").subscribe(
        topic, "billing", consumer_type=pulsar.ConsumerType.Shared, consumer_name=HOSTILE_CONSUMER,
        replicate_subscription_state_enabled=True,
    )
    producer = clusters.client("a").create_producer(topic, producer_name="console-orders")
    for counter in range(20):
        producer.send(f"order {counter}".encode())
    for message in receive_n(consumer, 20)[:5]:
        consumer.acknowledge(message)

    # A topic and a subscription named like HTML, in a namespace that does not replicate.
    hostile_topic = f"persistent://public/default/{HOSTILE_TOPIC_LOCAL}"
    clusters.client("a").subscribe(hostile_topic, HOSTILE_SUBSCRIPTION)
    hostile_producer = clusters.client("a").create_producer(hostile_topic)
    for counter in range(3):
        hostile_producer.send(b"x")

    def settled(cluster: str, backlog: int, sent: int):
        def check():
            stats = clusters.stats(cluster, topic)
            subscription = stats["subscriptions"].get("billing")
            if subscription is None or subscription["msgBacklog"] != backlog:
                return None
            if cluster == "a":
                link = stats["replication"]["b"]
                sync = subscription["replicatedSubscriptionSync"].get("b", {})
                if link["msgOutCount"] != sent or not link["connected"] or link["replicationBacklog"] != 0:
                    return None
                if not sync.get("lastSentTimestamp") or sync.get("unsentForMs") != 0:
                    return None
            return stats
        return await_condition(check, REPLICATION_TIMEOUT_S, f"{cluster}: backlog {backlog}, {sent} replicated")

    stats = settled("a", 15, 20)
    settled("b", 15, 20)
    console = Console(browser, clusters["a"].web_url)
    # The files come with a policy that lets the page load nothing from anywhere else.
    for path, kind in (("/console", "text/html"), ("/console/app.js", "text/javascript"),
                       ("/console/style.css", "text/css")):
        with urllib.request.urlopen(clusters["a"].web_url + path, timeout=20) as reply:
            assert reply.headers["Content-Type"].startswith(kind), path
            policy = reply.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'self';" in policy, policy

    # The replication view: clusters, the link to b with its counters, the synced subscription.
    console.open()
    console.await_shows("cluster b's link", {"name": "b", "status": "connected", "topics": "1", "backlog": "0"}, cluster="b")
    link = stats["replication"]["b"]
    console.await_shows(
        "the link a -> b of the topic",
        {"topic": topic, "remote": "b", "state": link["state"], "backlog": number(link["replicationBacklog"]),
         "sent": number(link["msgOutCount"]), "lag": "0 s"},
        topic=topic, link="b",
    )
    console.await_shows(
        "billing's sync state towards b", {"subscription": "billing", "remote": "b", "state": "in sync"},
        topic=topic, subscription="billing", remote="b",
    )
    if os.environ.get("MERIDIAN_CONSOLE_SCREENSHOT"):
        browser.screenshot(Path(os.environ["MERIDIAN_CONSOLE_SCREENSHOT"]))

    # Live: more traffic shows up on the open page by itself.
    for counter in range(20, 27):
        producer.send(f"order {counter}".encode())
    stats = settled("a", 22, 27)
    console.await_shows(
        "the page refreshed with 27 messages sent to b", {"sent": number(27)}, topic=topic, link="b"
    )

    # Tenants → namespaces → topics.
    console.open("tenants")
    console.await_shows(
        "the namespace's loaded topics and backlog",
        {"namespace": namespace, "topics": "1", "backlog": number(backlog_of(stats))},
        namespace=namespace,
    )
    console.open("namespace", tenant, local_namespace)
    console.await_shows(
        "the topic's row",
        {"topic": topic, "producers": number(len(stats["publishers"])), "subscriptions": "1",
         "backlog": number(backlog_of(stats))},
        topic=topic,
    )
    assert "Replication clusters: a, b" in browser.evaluate("document.getElementById('view').innerText")

    # The topic: its subscription with the consumer, the sync state per cluster, the link.
    console.open("topic", tenant, local_namespace, "orders")
    subscription = stats["subscriptions"]["billing"]
    section = await_condition(lambda: console.find(subscription="billing"), PAGE_TIMEOUT_S, "billing's section")
    assert "replicated" in section and "Shared" in section
    consumer_row = console.await_shows(
        "the consumer, named as it chose",
        {"name": HOSTILE_CONSUMER, "delivered": number(subscription["consumers"][0]["msgOutCounter"])},
        consumer=HOSTILE_CONSUMER,
    )
    assert consumer_row["unacked"] == number(subscription["consumers"][0]["unackedMessages"])
    console.await_shows(
        "billing's counters",
        {"backlog": number(subscription["msgBacklog"]), "unacked": number(subscription["unackedMessages"])},
        counters="billing",
    )
    console.await_shows(
        "billing's sync towards b", {"remote": "b", "state": "in sync", "unsent": "0 s"},
        topic=topic, subscription="billing", remote="b",
    )
    console.await_shows(
        "the topic's link to b", {"remote": "b", "sent": number(27), "backlog": "0"}, link="b"
    )
    assert console.find(card="backlog") == f"Backlog (messages)\n{number(backlog_of(stats))}"

    # The hostile names, shown as text; a partitioned topic, summed over its partitions.
    clusters.create_partitioned_topic("a", "persistent://public/default/sharded", 2)
    console.open("namespace", "public", "default")
    console.await_shows("the HTML-named topic", {"topic": hostile_topic}, topic=hostile_topic)
    console.await_shows("a partition", {"producers": "not loaded"}, topic="persistent://public/default/sharded-partition-1")
    console.open("partitioned", "public", "default", "sharded")
    assert browser.evaluate("document.querySelector('h1').innerText") == "persistent://public/default/sharded (2 partitions)"
    console.open("topic", "public", "default", HOSTILE_TOPIC_LOCAL)
    section = await_condition(
        lambda: console.find(subscription=HOSTILE_SUBSCRIPTION), PAGE_TIMEOUT_S, "the HTML-named subscription"
    )
    assert section.startswith(HOSTILE_SUBSCRIPTION)
    assert browser.evaluate("document.querySelector('h1').innerText") == hostile_topic

    # Cluster b: the subscription a synced, with when b last received its state.
    stats_b = settled("b", 22, 27)
    console_b = Console(browser, clusters["b"].web_url)
    console_b.open("topic", tenant, local_namespace, "orders")
    row = console_b.await_shows(
        "b's copy of billing, synced from a", {"remote": "a"}, topic=topic, subscription="billing", remote="a"
    )
    assert row["lastReceived"].endswith(" ago"), row
    assert "replicated" in console_b.find(subscription="billing")
    console_b.await_shows(
        "b's backlog of billing", {"backlog": number(stats_b["subscriptions"]["billing"]["msgBacklog"])},
        counters="billing",
    )


# Names a user may choose that are awkward in URLs and pages: an escaped slash, quotes,
# unicode beyond the BMP, a lone percent, a long name.
AWKWARD_TOPICS = ["a%2Fb", "q\"'`<>", "caf\u00e9-\u6f22\u5b57-\U0001F600", "100%", "long-" + "x" * 180]
MANY_TOPICS = 230


def test_console_shows_awkward_names_and_bounds_a_namespace_of_many_topics(browser, broker_factory):
    broker = broker_factory.start()

    def create(local: str) -> None:
        path = "/admin/v2/persistent/public/default/" + quote(local, safe="")
        request = urllib.request.Request(broker.web_url + path, method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                assert reply.status in (200, 204), local
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{local!r}: {error.code} {error.read()!r}") from None

    for local in AWKWARD_TOPICS:
        create(local)
    console = Console(browser, broker.web_url)
    console.open("namespace", "public", "default")
    for local in AWKWARD_TOPICS:
        name = f"persistent://public/default/{local}"
        console.await_shows(f"the row of {local!r}", {"topic": name}, topic=name)
    for local in AWKWARD_TOPICS:
        console.open("topic", "public", "default", local)
        assert browser.evaluate("document.querySelector('h1').innerText") == f"persistent://public/default/{local}"

    # Many topics: the page draws a bounded number of rows and says how many there are.
    for index in range(MANY_TOPICS):
        create(f"many-{index:04}")
    total = MANY_TOPICS + len(AWKWARD_TOPICS)
    console.open("namespace", "public", "default")
    note = await_condition(lambda: console.find(truncated=str(total)), PAGE_TIMEOUT_S, "the count of rows not drawn")
    assert note == f"The first 200 of {total} rows; the REST API lists them all."
    assert browser.evaluate("document.querySelectorAll('#view tr[data-topic]').length") == 200


@pytest.mark.allow_broker_errors(r"topic cannot be loaded")
def test_console_marks_a_topic_the_broker_cannot_serve(browser, broker_factory):
    broker = broker_factory.start()
    local = unique("broken")
    name = f"persistent://public/default/{local}"
    client = pulsar.Client(broker.service_url, operation_timeout_seconds=20)
    try:
        client.create_producer(name).send(b"one")
    finally:
        client.close()
    broker.stop()
    assert corrupt_segments(broker.data_dir, local) > 0
    broker.start()
    # A client's attempt (here its stats) meets the broken log: the broker now lists it.
    path = f"{broker.web_url}/admin/v2/persistent/public/default/{local}/stats"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(path, timeout=20)

    console = Console(browser, broker.web_url)
    console.open()
    row = console.await_shows("the broken topic in the clusters page", {"kind": "loadFailed"}, topic=name)
    assert "cannot be opened" in row["reason"], row
    # On its namespace's page it is not shown as an idle, unloaded topic.
    console.open("namespace", "public", "default")
    console.await_shows("the broken topic's row", {"producers": "unavailable (loadFailed)"}, topic=name)


def test_console_asks_for_a_token_when_authentication_is_on(browser, module_brokers, meridian_bin,
                                                              tmp_path_factory):
    from test_security import Keys, rest, start_secured

    keys = Keys(meridian_bin, tmp_path_factory.mktemp("console-keys"))
    broker = start_secured(module_brokers, meridian_bin, keys, tmp_path_factory.mktemp("console-secured"),
                           'authorization_enabled = true\nsuper_user_roles = ["admin"]\n')
    # The data stays behind authentication; the console's static files are open.
    assert rest(broker, "GET", "/admin/v2/clusters")[0] == 401
    # sessionStorage is per origin: this broker's port has none yet.
    browser.navigate(f"{broker.web_url}/console#/")
    await_condition(lambda: browser.evaluate("!!document.getElementById('token-form')"),
                    PAGE_TIMEOUT_S, "the console to ask for a token")
    assert "answered 401" in browser.evaluate("document.getElementById('error').innerText")
    token = json.dumps(keys.token("admin"))
    browser.evaluate(
        f"document.getElementById('token').value = {token};"
        " document.getElementById('token-form').requestSubmit(); 1"
    )
    await_condition(
        lambda: browser.evaluate(
            "(() => { const view = document.getElementById('view');"
            " return view.dataset.route === location.hash && !document.getElementById('token-form'); })()"
        ),
        PAGE_TIMEOUT_S, "the clusters page drawn with the token",
    )
    assert "standalone" in browser.evaluate("document.getElementById('view').innerText")
    browser.evaluate("sessionStorage.clear(); 1")
    browser.navigate("about:blank")
