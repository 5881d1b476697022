// Meridian console: draws each page from the broker's REST API and redraws it every few
// seconds. Every value is put on the page as a DOM text node or attribute (never as HTML), so
// topic, subscription and consumer names (user input) are shown as text whatever they hold.
"use strict";

(function () {
  const REFRESH_MS = 2000;
  // A refresh waits at least this many times as long as the previous one took: a broker with
  // many topics (large stats answers) is asked less often instead of continuously.
  const REFRESH_BACKOFF = 5;
  // Rows drawn per table at most: a namespace of thousands of topics would otherwise redraw
  // thousands of rows every refresh. The rest are counted below the table.
  const MAX_ROWS = 200;
  const view = document.getElementById("view");
  const errorBox = document.getElementById("error");
  const updated = document.getElementById("updated");
  const clusterLabel = document.getElementById("cluster");
  const pauseButton = document.getElementById("pause");
  // With authentication on, the REST API needs a token: the console asks for one once (a
  // super-user's shows every page) and keeps it in this tab's sessionStorage only.
  const TOKEN_KEY = "meridian.console.token";
  let awaitingToken = false;

  // ---------------------------------------------------------------- building the page

  /** An element with attributes and children; strings and numbers become text nodes. */
  function h(tag, attributes, ...children) {
    const element = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") element.className = value;
      else element.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      element.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return element;
  }

  /** A link inside the console: each path segment is URL-encoded, so a name cannot break out. */
  function link(text, ...segments) {
    return h("a", { href: "#/" + segments.map(encodeURIComponent).join("/") }, text);
  }

  /**
   * A table. `columns` are `[title, key, numeric]`; each row is `{ attributes, cells }` with
   * `cells[key]` a string, number or node. Cells carry `data-col` so that tests and people
   * using the browser's inspector can find a value by its column.
   */
  function table(columns, rows, empty) {
    if (rows.length === 0) return h("p", { class: "muted" }, empty);
    const shown = rows.slice(0, MAX_ROWS);
    const drawn = h(
      "table",
      {},
      h("thead", {}, h("tr", {}, columns.map(([title, , numeric]) => h("th", { class: numeric ? "num" : "" }, title)))),
      h(
        "tbody",
        {},
        shown.map((row) =>
          h(
            "tr",
            row.attributes || {},
            columns.map(([, key, numeric]) =>
              h("td", { class: numeric ? "num" : "name", "data-col": key }, row.cells[key] ?? "")
            )
          )
        )
      )
    );
    if (shown.length === rows.length) return drawn;
    return h(
      "div",
      {},
      drawn,
      h(
        "p",
        { class: "muted", "data-truncated": String(rows.length) },
        `The first ${count(shown.length)} of ${count(rows.length)} rows; the REST API lists them all.`
      )
    );
  }

  function panel(title, ...children) {
    return h("section", { class: "panel" }, h("h2", {}, title), children);
  }

  function card(label, value, key) {
    return h("div", { class: "card", "data-card": key }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
  }

  function badge(text, tone) {
    return h("span", { class: "badge " + tone }, text);
  }

  // ---------------------------------------------------------------- formatting

  const integerFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const rateFormat = new Intl.NumberFormat("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });

  function count(value) {
    return integerFormat.format(Number(value) || 0);
  }

  function rate(value) {
    return rateFormat.format(Number(value) || 0);
  }

  function bytes(value) {
    let amount = Number(value) || 0;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = 0;
    while (amount >= 1024 && unit < units.length - 1) {
      amount /= 1024;
      unit += 1;
    }
    return (unit === 0 ? count(amount) : rate(amount)) + " " + units[unit];
  }

  function seconds(value) {
    let total = Math.max(0, Math.round(Number(value) || 0));
    if (total < 60) return total + " s";
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    total %= 60;
    return hours > 0 ? `${hours} h ${minutes} min` : `${minutes} min ${total} s`;
  }

  function ago(timestampMs) {
    if (!timestampMs) return "never";
    return seconds((Date.now() - timestampMs) / 1000) + " ago";
  }

  function since(text) {
    return text ? String(text).replace("T", " ").replace(/\.\d+/, "") : "";
  }

  function linkState(replicator) {
    const state = replicator.state || (replicator.connected ? "Started" : "Disconnected");
    if (state.startsWith("Stopped")) return badge(state, "bad");
    if (!replicator.connected) return badge(state, "warn");
    return badge(state, "good");
  }

  // ---------------------------------------------------------------- the REST API

  async function api(path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, { headers, cache: "no-store" });
    const text = await response.text();
    let body = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      // Not JSON: the text itself is the answer (or the reason).
    }
    if (!response.ok) {
      const reason = body && body.reason ? body.reason : text;
      const error = new Error(`${path} answered ${response.status}: ${reason}`);
      error.needsToken = response.status === 401;
      throw error;
    }
    return body;
  }

  /** `path` under the API with each segment URL-encoded. */
  function apiPath(prefix, ...segments) {
    return prefix + "/" + segments.map(encodeURIComponent).join("/");
  }

  /** Every loaded topic's stats (`/admin/v2/broker-stats/topics`) as `[name, stats]` pairs. */
  async function loadedTopics() {
    const byNamespace = await api("/admin/v2/broker-stats/topics");
    const topics = [];
    for (const bundles of Object.values(byNamespace || {})) {
      for (const domains of Object.values(bundles)) {
        for (const perTopic of Object.values(domains)) {
          for (const [name, stats] of Object.entries(perTopic)) topics.push([name, stats]);
        }
      }
    }
    topics.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    return topics;
  }

  /** `persistent://t/ns/x` → `["t", "ns", "x"]`. */
  function splitTopic(name) {
    const rest = name.replace(/^[a-z-]+:\/\//, "");
    const parts = rest.split("/");
    return [parts[0], parts[1], parts.slice(2).join("/")];
  }

  function topicLink(name) {
    const [tenant, namespace, topic] = splitTopic(name);
    return link(name, "topic", tenant, namespace, topic);
  }

  function backlogOf(stats) {
    return Object.values(stats.subscriptions || {}).reduce((sum, subscription) => sum + (subscription.msgBacklog || 0), 0);
  }

  function replicationBacklogOf(stats) {
    return Object.values(stats.replication || {}).reduce((sum, replicator) => sum + (replicator.replicationBacklog || 0), 0);
  }

  let localCluster = null;

  async function knowLocalCluster() {
    if (localCluster !== null) return;
    try {
      const configuration = await api("/admin/v2/brokers/configuration/runtime");
      localCluster = (configuration && configuration.cluster_name) || "";
    } catch (_) {
      localCluster = "";
    }
    clusterLabel.textContent = localCluster ? "cluster " + localCluster : "";
  }

  // ---------------------------------------------------------------- pages

  /** Clusters, the replication links from this one with their lag and backlog, replicated
   * subscriptions, and the topics this broker cannot serve. */
  async function clustersPage() {
    await knowLocalCluster();
    const [names, topics, health] = await Promise.all([
      api("/admin/v2/clusters"),
      loadedTopics(),
      api("/admin/v2/brokers/health?details=true"),
    ]);
    const clusters = await Promise.all(names.map((name) => api(apiPath("/admin/v2/clusters", name)).then((data) => [name, data || {}])));

    const links = new Map();
    const linkRows = [];
    const syncRows = [];
    for (const [topic, stats] of topics) {
      for (const [remote, replicator] of Object.entries(stats.replication || {})) {
        const total = links.get(remote) || { topics: 0, connected: 0, stopped: 0, backlog: 0, delay: 0, rateOut: 0, rateIn: 0, throughputOut: 0 };
        total.topics += 1;
        total.connected += replicator.connected ? 1 : 0;
        total.stopped += String(replicator.state || "").startsWith("Stopped") ? 1 : 0;
        total.backlog += replicator.replicationBacklog || 0;
        total.delay = Math.max(total.delay, replicator.replicationDelayInSeconds || 0);
        total.rateOut += replicator.msgRateOut || 0;
        total.rateIn += replicator.msgRateIn || 0;
        total.throughputOut += replicator.msgThroughputOut || 0;
        links.set(remote, total);
        linkRows.push({
          attributes: { "data-topic": topic, "data-link": remote },
          cells: {
            topic: topicLink(topic),
            remote,
            state: linkState(replicator),
            backlog: count(replicator.replicationBacklog),
            lag: seconds(replicator.replicationDelayInSeconds),
            rateOut: rate(replicator.msgRateOut),
            throughputOut: bytes(replicator.msgThroughputOut) + "/s",
            sent: count(replicator.msgOutCount),
            rateIn: rate(replicator.msgRateIn),
          },
        });
      }
      for (const [subscription, subscriptionStats] of Object.entries(stats.subscriptions || {})) {
        for (const [remote, sync] of Object.entries(subscriptionStats.replicatedSubscriptionSync || {})) {
          syncRows.push(syncRow(topic, subscription, remote, sync));
        }
      }
    }

    const clusterRows = clusters.map(([name, data]) => {
      const total = links.get(name);
      const local = name === localCluster;
      let status;
      if (local) status = badge("this cluster", "plain");
      else if (!total) status = badge("no replicated topics", "plain");
      else if (total.stopped > 0) status = badge(`${total.stopped} stopped`, "bad");
      else if (total.connected < total.topics) status = badge(`${total.topics - total.connected} disconnected`, "warn");
      else status = badge("connected", "good");
      return {
        attributes: { "data-cluster": name },
        cells: {
          name,
          status,
          serviceUrl: data.serviceUrl || "",
          brokerServiceUrl: data.brokerServiceUrl || "",
          topics: total ? count(total.topics) : "",
          backlog: total ? count(total.backlog) : "",
          lag: total ? seconds(total.delay) : "",
          rateOut: total ? rate(total.rateOut) : "",
          throughputOut: total ? bytes(total.throughputOut) + "/s" : "",
          rateIn: total ? rate(total.rateIn) : "",
        },
      };
    });

    const unavailable = (health && health.unavailableTopics) || [];
    return h(
      "div",
      {},
      h("h1", {}, "Clusters and replication"),
      h("p", { class: "muted" }, "Links from this cluster to each other cluster, summed over this broker's loaded topics. Lag is the age of the oldest entry the remote still lacks."),
      unavailable.length === 0
        ? null
        : panel(
            "Topics this broker cannot serve",
            table(
              [["Topic", "topic"], ["Kind", "kind"], ["Reason", "reason"]],
              unavailable.map((failure) => ({
                attributes: { "data-topic": failure.topic },
                cells: { topic: failure.topic, kind: badge(failure.kind, "bad"), reason: failure.reason },
              })),
              ""
            )
          ),
      panel(
        "Clusters",
        table(
          [
            ["Cluster", "name"],
            ["Link", "status"],
            ["Service URL", "serviceUrl"],
            ["Broker URL", "brokerServiceUrl"],
            ["Topics", "topics", true],
            ["Backlog (entries)", "backlog", true],
            ["Lag", "lag", true],
            ["Out msg/s", "rateOut", true],
            ["Out", "throughputOut", true],
            ["In msg/s", "rateIn", true],
          ],
          clusterRows,
          "No clusters registered."
        )
      ),
      panel(
        "Replication links by topic",
        table(
          [
            ["Topic", "topic"],
            ["To cluster", "remote"],
            ["State", "state"],
            ["Backlog (entries)", "backlog", true],
            ["Lag", "lag", true],
            ["Out msg/s", "rateOut", true],
            ["Out", "throughputOut", true],
            ["Sent", "sent", true],
            ["In msg/s", "rateIn", true],
          ],
          linkRows,
          "No loaded topic replicates to another cluster."
        )
      ),
      panel(
        "Replicated subscriptions",
        syncTable(syncRows, true)
      )
    );
  }

  function syncRow(topic, subscription, remote, sync) {
    const waiting = sync.unsentForMs || 0;
    return {
      attributes: { "data-topic": topic, "data-subscription": subscription, "data-remote": remote },
      cells: {
        topic: topicLink(topic),
        subscription,
        remote,
        state: sync.lastError
          ? badge("failing", "bad")
          : waiting > 0
            ? badge("sending", "warn")
            : badge("in sync", "good"),
        lastSent: ago(sync.lastSentTimestamp),
        unsent: seconds(waiting / 1000),
        lastReceived: ago(sync.lastReceivedTimestamp),
        failures: count(sync.failedAttempts),
        lastError: sync.lastError || "",
      },
    };
  }

  function syncTable(rows, withTopic) {
    const columns = [
      ["Subscription", "subscription"],
      ["Cluster", "remote"],
      ["State", "state"],
      ["Last sent", "lastSent", true],
      ["Unsent for", "unsent", true],
      ["Last received", "lastReceived", true],
      ["Failed attempts", "failures", true],
      ["Last error", "lastError"],
    ];
    if (withTopic) columns.unshift(["Topic", "topic"]);
    return table(columns, rows, "No replicated subscription on a loaded topic.");
  }

  /** Tenants, their namespaces, and each namespace's loaded topics summed. */
  async function tenantsPage() {
    await knowLocalCluster();
    const [tenants, topics] = await Promise.all([api("/admin/v2/tenants"), loadedTopics()]);
    const namespaces = await Promise.all(tenants.map((tenant) => api(apiPath("/admin/v2/namespaces", tenant)).then((names) => [tenant, names || []])));
    const totals = new Map();
    for (const [name, stats] of topics) {
      const [tenant, namespace] = splitTopic(name);
      const key = tenant + "/" + namespace;
      const total = totals.get(key) || { topics: 0, rateIn: 0, rateOut: 0, backlog: 0, storage: 0 };
      total.topics += 1;
      total.rateIn += stats.msgRateIn || 0;
      total.rateOut += stats.msgRateOut || 0;
      total.backlog += backlogOf(stats);
      total.storage += stats.storageSize || 0;
      totals.set(key, total);
    }
    return h(
      "div",
      {},
      h("h1", {}, "Tenants"),
      namespaces.map(([tenant, names]) =>
        panel(
          tenant,
          table(
            [
              ["Namespace", "namespace"],
              ["Loaded topics", "topics", true],
              ["In msg/s", "rateIn", true],
              ["Out msg/s", "rateOut", true],
              ["Backlog (messages)", "backlog", true],
              ["Storage", "storage", true],
            ],
            names.map((qualified) => {
              const local = qualified.includes("/") ? qualified.slice(qualified.indexOf("/") + 1) : qualified;
              const total = totals.get(tenant + "/" + local) || { topics: 0, rateIn: 0, rateOut: 0, backlog: 0, storage: 0 };
              return {
                attributes: { "data-namespace": tenant + "/" + local },
                cells: {
                  namespace: link(tenant + "/" + local, "namespace", tenant, local),
                  topics: count(total.topics),
                  rateIn: rate(total.rateIn),
                  rateOut: rate(total.rateOut),
                  backlog: count(total.backlog),
                  storage: bytes(total.storage),
                },
              };
            }),
            "No namespaces."
          )
        )
      )
    );
  }

  /** A namespace's topics with their rates and backlogs (loaded topics; others are listed). */
  async function namespacePage(tenant, namespace) {
    await knowLocalCluster();
    const [names, partitioned, replication, topics, health] = await Promise.all([
      api(apiPath("/admin/v2/persistent", tenant, namespace)),
      api(apiPath("/admin/v2/persistent", tenant, namespace, "partitioned")),
      api(apiPath("/admin/v2/namespaces", tenant, namespace, "replication")).catch(() => []),
      loadedTopics(),
      api("/admin/v2/brokers/health?details=true"),
    ]);
    const loaded = new Map(topics);
    const failures = new Map(((health && health.unavailableTopics) || []).map((failure) => [failure.topic, failure]));
    const rows = names.map((name) => {
      const stats = loaded.get(name);
      const failure = failures.get(name);
      const cells = { topic: topicLink(name) };
      if (failure) {
        // Not idle: the broker cannot serve it. The reason is on the clusters page too.
        cells.producers = h("span", { title: failure.reason }, badge("unavailable (" + failure.kind + ")", "bad"));
      } else if (stats) {
        Object.assign(cells, {
          producers: count((stats.publishers || []).length),
          subscriptions: count(Object.keys(stats.subscriptions || {}).length),
          rateIn: rate(stats.msgRateIn),
          rateOut: rate(stats.msgRateOut),
          backlog: count(backlogOf(stats)),
          storage: bytes(stats.storageSize),
          replicationBacklog: count(replicationBacklogOf(stats)),
        });
      } else {
        cells.producers = h("span", { class: "muted" }, "not loaded");
      }
      return { attributes: { "data-topic": name }, cells };
    });
    return h(
      "div",
      {},
      h("div", { class: "crumbs" }, link("Tenants", "tenants"), " / ", tenant, " / ", namespace),
      h("h1", {}, tenant + "/" + namespace),
      h("p", { class: "muted" }, "Replication clusters: ", (replication || []).join(", ") || "none"),
      partitioned.length === 0
        ? null
        : panel(
            "Partitioned topics",
            h(
              "ul",
              {},
              partitioned.map((name) => {
                const [, , topic] = splitTopic(name);
                return h("li", {}, link(name, "partitioned", tenant, namespace, topic));
              })
            )
          ),
      panel(
        "Topics",
        table(
          [
            ["Topic", "topic"],
            ["Producers", "producers", true],
            ["Subscriptions", "subscriptions", true],
            ["In msg/s", "rateIn", true],
            ["Out msg/s", "rateOut", true],
            ["Backlog (messages)", "backlog", true],
            ["Storage", "storage", true],
            ["Replication backlog", "replicationBacklog", true],
          ],
          rows,
          "No topics."
        )
      )
    );
  }

  /** One topic (or a partitioned topic, summed): producers, subscriptions with their
   * consumers, replicated-subscription sync per cluster, replication links. */
  async function topicPage(tenant, namespace, topic, partitioned) {
    await knowLocalCluster();
    const stats = partitioned
      ? await api(apiPath("/admin/v2/persistent", tenant, namespace, topic, "partitioned-stats") + "?perPartition=false")
      : await api(apiPath("/admin/v2/persistent", tenant, namespace, topic, "stats"));
    const name = `persistent://${tenant}/${namespace}/${topic}`;
    const subscriptions = Object.entries(stats.subscriptions || {});
    const replication = Object.entries(stats.replication || {});
    return h(
      "div",
      {},
      h("div", { class: "crumbs" }, link("Tenants", "tenants"), " / ", link(tenant + "/" + namespace, "namespace", tenant, namespace)),
      h("h1", {}, name, partitioned ? ` (${count(stats.metadata && stats.metadata.partitions)} partitions)` : ""),
      h(
        "div",
        { class: "cards" },
        card("In msg/s", rate(stats.msgRateIn), "rateIn"),
        card("Out msg/s", rate(stats.msgRateOut), "rateOut"),
        card("Backlog (messages)", count(backlogOf(stats)), "backlog"),
        card("Storage", bytes(stats.storageSize), "storage"),
        card("Messages in", count(stats.msgInCounter), "msgIn"),
        card("Messages out", count(stats.msgOutCounter), "msgOut")
      ),
      panel(
        "Producers",
        table(
          [
            ["Producer", "name"],
            ["In msg/s", "rateIn", true],
            ["In", "throughputIn", true],
            ["Access mode", "mode"],
            ["Address", "address"],
            ["Connected since", "since"],
          ],
          (stats.publishers || []).map((publisher) => ({
            attributes: { "data-producer": publisher.producerName },
            cells: {
              name: publisher.producerName,
              rateIn: rate(publisher.msgRateIn),
              throughputIn: bytes(publisher.msgThroughputIn) + "/s",
              mode: publisher.accessMode || "",
              address: publisher.address || "",
              since: since(publisher.connectedSince),
            },
          })),
          "No producers connected."
        )
      ),
      h("h2", {}, "Subscriptions"),
      subscriptions.length === 0 ? h("p", { class: "muted" }, "No subscriptions.") : null,
      subscriptions.map(([subscription, subscriptionStats]) => subscriptionPanel(name, subscription, subscriptionStats)),
      panel(
        "Replication",
        table(
          [
            ["To cluster", "remote"],
            ["State", "state"],
            ["Backlog (entries)", "backlog", true],
            ["Lag", "lag", true],
            ["Out msg/s", "rateOut", true],
            ["Sent", "sent", true],
            ["In msg/s", "rateIn", true],
            ["Received", "received", true],
            ["Outbound connection", "outbound"],
          ],
          replication.map(([remote, replicator]) => ({
            attributes: { "data-link": remote },
            cells: {
              remote,
              state: linkState(replicator),
              backlog: count(replicator.replicationBacklog),
              lag: seconds(replicator.replicationDelayInSeconds),
              rateOut: rate(replicator.msgRateOut),
              sent: count(replicator.msgOutCount),
              rateIn: rate(replicator.msgRateIn),
              received: count(replicator.msgInCount),
              outbound: replicator.outboundConnection || "",
            },
          })),
          "This topic does not replicate."
        )
      )
    );
  }

  function subscriptionPanel(topic, subscription, stats) {
    const sync = Object.entries(stats.replicatedSubscriptionSync || {});
    return h(
      "section",
      { class: "panel", "data-subscription": subscription },
      h(
        "h3",
        {},
        subscription,
        " ",
        badge(stats.type || "", "plain"),
        stats.isReplicated ? [" ", badge("replicated", "good")] : null
      ),
      table(
        [
          ["Backlog (messages)", "backlog", true],
          ["Out msg/s", "rateOut", true],
          ["Unacked", "unacked", true],
          ["Redelivered msg/s", "rateRedeliver", true],
          ["Delayed", "delayed", true],
          ["Expired", "expired", true],
        ],
        [
          {
            attributes: { "data-counters": subscription },
            cells: {
              backlog: count(stats.msgBacklog),
              rateOut: rate(stats.msgRateOut),
              unacked: count(stats.unackedMessages),
              rateRedeliver: rate(stats.msgRateRedeliver),
              delayed: count(stats.msgDelayed),
              expired: count(stats.totalMsgExpired),
            },
          },
        ],
        ""
      ),
      h("h3", {}, "Consumers"),
      table(
        [
          ["Consumer", "name"],
          ["Out msg/s", "rateOut", true],
          ["Delivered", "delivered", true],
          ["Unacked", "unacked", true],
          ["Permits", "permits", true],
          ["Address", "address"],
          ["Connected since", "since"],
        ],
        (stats.consumers || []).map((consumer) => ({
          attributes: { "data-consumer": consumer.consumerName },
          cells: {
            name: [consumer.consumerName, stats.activeConsumerName === consumer.consumerName && stats.type === "Failover" ? [" ", badge("active", "good")] : null],
            rateOut: rate(consumer.msgRateOut),
            delivered: count(consumer.msgOutCounter),
            unacked: count(consumer.unackedMessages),
            permits: count(consumer.availablePermits),
            address: consumer.address || "",
            since: since(consumer.connectedSince),
          },
        })),
        "No consumers connected."
      ),
      stats.isReplicated
        ? [h("h3", {}, "Sync with other clusters"), syncTable(sync.map(([remote, state]) => syncRow(topic, subscription, remote, state)), false)]
        : null
    );
  }

  // ---------------------------------------------------------------- routing and refresh

  /** The page the location's hash names, as `[name, segments]`. */
  function route() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").filter((part) => part !== "").map(decodeURIComponent);
    return [parts[0] || "clusters", parts.slice(1)];
  }

  function render([page, segments]) {
    switch (page) {
      case "tenants":
        return tenantsPage();
      case "namespace":
        return namespacePage(segments[0], segments[1]);
      case "topic":
        return topicPage(segments[0], segments[1], segments.slice(2).join("/"), false);
      case "partitioned":
        return topicPage(segments[0], segments[1], segments.slice(2).join("/"), true);
      default:
        return clustersPage();
    }
  }

  let renders = 0;
  let busy = false;
  let again = false;
  let paused = false;
  let lastDurationMs = 0;

  async function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    const started = Date.now();
    const hash = location.hash;
    const current = route();
    for (const item of document.querySelectorAll("header nav a")) {
      item.classList.toggle("active", item.dataset.nav === (current[0] === "clusters" ? "clusters" : "tenants"));
    }
    try {
      const page = await render(current);
      if (hash === location.hash) {
        view.replaceChildren(page);
        errorBox.hidden = true;
        renders += 1;
        view.dataset.renders = String(renders);
        view.dataset.route = hash;
        updated.textContent = "updated " + new Date().toLocaleTimeString("en-GB");
      }
    } catch (error) {
      errorBox.textContent = "Could not refresh: " + (error && error.message ? error.message : String(error));
      errorBox.hidden = false;
      if (error && error.needsToken) {
        awaitingToken = true;
        view.replaceChildren(tokenForm());
      }
    } finally {
      busy = false;
      lastDurationMs = Date.now() - started;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  /** Asks for the token the REST API needs; refreshes with it once given. */
  function tokenForm() {
    const input = h("input", { id: "token", type: "password", autocomplete: "off", size: 60 });
    const form = h(
      "form",
      { id: "token-form" },
      h("p", {}, "This broker needs a token (authentication is on). A super-user's token shows every page; it is kept in this tab only."),
      input,
      " ",
      h("button", { type: "submit" }, "Use token")
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      awaitingToken = false;
      refresh();
    });
    return form;
  }

  pauseButton.addEventListener("click", () => {
    paused = !paused;
    pauseButton.textContent = paused ? "Resume" : "Pause";
    if (!paused) refresh();
  });
  window.addEventListener("hashchange", refresh);
  function tick() {
    const due = !paused && !awaitingToken && document.visibilityState !== "hidden";
    Promise.resolve(due ? refresh() : null).finally(() =>
      setTimeout(tick, Math.max(REFRESH_MS, REFRESH_BACKOFF * lastDurationMs))
    );
  }
  tick();
})();
