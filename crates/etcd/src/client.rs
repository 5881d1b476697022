//! A small etcd v3 client over etcd's JSON gRPC gateway (HTTP/1.1, `/v3/...`).
//!
//! Why the gateway and not gRPC: the metadata seam (`MetadataStore`) is synchronous, and the
//! gateway lets a blocking `ureq` call serve it without a second async runtime or a tonic build.
//! etcd 3.4 serves the gateway under both `/v3/` and `/v3beta/`; 3.5 and later only under
//! `/v3/`, so `/v3/` is used. Keys and values travel base64-encoded; 64-bit integers arrive as
//! JSON strings, and fields holding their default (0, false, empty) are omitted.
//!
//! Failover: requests go to the endpoint that last answered; when it cannot be reached the next
//! one is tried. A request that changes data is only retried on another endpoint when the
//! connection could not be opened (then etcd certainly did not see it). Once it was sent, a
//! failure is [`EtcdError::OutcomeUnknown`]: the caller must read back to learn whether it
//! applied. Writes therefore use a fresh connection each: a pooled socket that etcd closes just
//! as a write is sent on it (ureq checks pooled sockets before reuse, but that check can race)
//! would turn the write into "outcome unknown", where a refused connection is a clear "not
//! applied, try the next endpoint". Reads and lease renewals reuse pooled connections.
//!
//! Limits: every request has a deadline (`request_timeout`), every response body is read through
//! a byte limit (`max_response_bytes`), and transactions are checked against etcd's default of
//! 128 operations per branch before they are sent.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{EtcdError, Result};

/// etcd's default `--max-txn-ops`: the most compares, or operations per branch, in one txn.
pub const MAX_TXN_OPERATIONS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB); larger requests are refused before sending.
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of one request to one endpoint (connect, send and read the whole answer).
    pub request_timeout: Duration,
    /// Deadline for opening a connection; a dead endpoint costs at most this before the next.
    pub connect_timeout: Duration,
    /// The largest response body (or one watch message) accepted.
    pub max_response_bytes: usize,
    /// How long one watch request streams before it is re-opened from the last revision seen
    /// (bounds how long a silently dead connection can hold a watch).
    pub watch_reconnect_interval: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_response_bytes: 16 * 1024 * 1024,
            watch_reconnect_interval: Duration::from_secs(10),
        }
    }
}

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the last write to the key.
    pub mod_revision: u64,
    /// The revision that created the key (0 = absent).
    pub create_revision: u64,
    /// The lease the key is attached to (0 = none).
    pub lease: i64,
}

/// The result of a range read.
#[derive(Debug, Clone)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// The store's revision when the read was served.
    pub revision: u64,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key's last write was at this revision (0 = absent).
    ModRevision(String, u64),
    /// The key exists and holds exactly these bytes.
    Value(String, Vec<u8>),
}

/// An operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes the key, attached to `lease` when it is not 0.
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    /// Deletes the key (not an error when it is missing).
    Delete(String),
    /// Deletes every key in `[from, to)`: one operation however many keys it removes (the
    /// object-store log replaces up to thousands of index keys by one manifest at once).
    DeleteRange { from: String, to: String },
    /// Reads the key; its value is returned in [`TxnResult::reads`].
    Get(String),
}

/// The result of a transaction.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// The compares held and the success branch ran.
    pub succeeded: bool,
    /// The store's revision after the transaction (the `mod_revision` of keys it wrote).
    pub revision: u64,
    /// For every `Op::Get` of the branch that ran, in order: the key if it exists.
    pub reads: Vec<Option<KeyValue>>,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub key: String,
    /// The revision of the change.
    pub revision: u64,
    /// `false` for a put, `true` for a delete (or a lease expiry).
    pub deleted: bool,
}

/// A message of a watch stream.
#[derive(Debug)]
pub enum WatchMessage {
    /// Changes, in revision order.
    Events(Vec<WatchEvent>),
    /// The watch was cancelled because the revisions it asked for were compacted away; changes
    /// up to `compact_revision` (exclusive) can no longer be replayed.
    Compacted { compact_revision: u64 },
}

/// Splits `etcd://h1:2379,h2:2379/some/prefix` into the endpoints and the key prefix every key
/// of the URL's user lives under (as the chroot of Pulsar's `zk:host:2181/chroot`): `None`
/// without a path. Only the `etcd://` form takes a prefix.
pub fn split_chroot(url: &str) -> Result<(&str, Option<&str>)> {
    let Some(list) = url.strip_prefix("etcd://") else {
        return Ok((url, None));
    };
    let Some(slash) = list.find('/') else {
        return Ok((url, None));
    };
    let chroot = list[slash..].trim_matches('/');
    if chroot.is_empty() {
        return Ok((&url[..7 + slash], None));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
    if !chroot.chars().all(allowed)
        || chroot
            .split('/')
            .any(|part| part.is_empty() || part == ".." || part == ".")
    {
        return Err(EtcdError::Config(format!(
            "the key prefix {chroot:?} of {url:?} must be path segments of letters, digits, '-', '_' and '.'"
        )));
    }
    Ok((&url[..7 + slash], Some(chroot)))
}

/// Parses `etcd://h1:2379,h2:2379` (or a comma-separated list of `host:port` or
/// `http://host:port`) into gateway base URLs; a key prefix after the list
/// ([`split_chroot`]) is not part of them.
pub fn parse_endpoints(url: &str) -> Result<Vec<String>> {
    let (url, _) = split_chroot(url)?;
    let list = url.strip_prefix("etcd://").unwrap_or(url);
    let mut endpoints = Vec::new();
    for item in list.split(',') {
        let item = item.trim().trim_end_matches('/');
        if item.is_empty() {
            continue;
        }
        if item.starts_with("https://") {
            return Err(EtcdError::Config(format!(
                "etcd endpoint {item}: TLS is not supported yet (use http:// on a trusted network)"
            )));
        }
        let host_port = item.strip_prefix("http://").unwrap_or(item);
        if host_port.contains('/') || !host_port.contains(':') {
            return Err(EtcdError::Config(format!(
                "etcd endpoint {item:?} is not host:port (from {url:?})"
            )));
        }
        endpoints.push(format!("http://{host_port}"));
    }
    if endpoints.is_empty() {
        return Err(EtcdError::Config(format!(
            "no etcd endpoint in {url:?} (expected etcd://host:2379[,host:2379...])"
        )));
    }
    Ok(endpoints)
}

/// Whether a request may be sent again after it may have reached etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and renewals: safe to repeat on any failure.
    Always,
    /// Writes: only repeated when the connection could not be opened.
    BeforeSending,
}

/// A client of one etcd cluster (one or more endpoints). Cheap to share behind an `Arc`.
pub struct Client {
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last; tried first.
    preferred: AtomicUsize,
    /// Keeps idle connections: reads and lease renewals.
    pooled: ureq::Agent,
    /// One connection per request: writes (see the module comment).
    fresh: ureq::Agent,
    options: ClientOptions,
}

fn encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// The key just after every key starting with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: "\0" means "to the end of the keyspace".
    vec![0]
}

/// A 64-bit integer as the gateway writes it: a JSON string, a number, or absent (0).
fn int64<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }
    match Int::deserialize(deserializer)? {
        Int::Number(number) => Ok(number),
        Int::Text(text) => text.parse().map_err(serde::de::Error::custom),
    }
}

fn revision<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<u64, D::Error> {
    let value = int64(deserializer)?;
    u64::try_from(value).map_err(|_| serde::de::Error::custom(format!("negative revision {value}")))
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default, deserialize_with = "revision")]
    revision: u64,
}

#[derive(Deserialize)]
struct RawKeyValue {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "revision")]
    mod_revision: u64,
    #[serde(default, deserialize_with = "revision")]
    create_revision: u64,
    #[serde(default, deserialize_with = "int64")]
    lease: i64,
}

#[derive(Deserialize)]
struct RawRange {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<RawKeyValue>,
    #[serde(default)]
    more: bool,
}

#[derive(Deserialize)]
struct RawTxn {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<Value>,
}

#[derive(Deserialize)]
struct RawLease {
    #[serde(rename = "ID", default, deserialize_with = "int64")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "int64")]
    ttl: i64,
}

#[derive(Deserialize)]
struct RawStreamed<T> {
    result: Option<T>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type", default)]
    kind: String,
    kv: RawKeyValue,
}

#[derive(Deserialize)]
struct RawWatch {
    #[serde(default)]
    events: Vec<RawEvent>,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "revision")]
    compact_revision: u64,
    #[serde(default)]
    cancel_reason: String,
}

fn decode_key_value(operation: &'static str, raw: RawKeyValue) -> Result<KeyValue> {
    let bad = |what: &str, error: &dyn std::fmt::Display| EtcdError::BadResponse {
        operation,
        message: format!("{what} is not valid base64: {error}"),
    };
    let key = BASE64
        .decode(raw.key.as_bytes())
        .map_err(|error| bad("a key", &error))?;
    let key = String::from_utf8(key).map_err(|error| EtcdError::BadResponse {
        operation,
        message: format!("a key is not UTF-8: {error}"),
    })?;
    let value = BASE64
        .decode(raw.value.as_bytes())
        .map_err(|error| bad(&format!("the value of {key}"), &error))?;
    Ok(KeyValue {
        key,
        value,
        mod_revision: raw.mod_revision,
        create_revision: raw.create_revision,
        lease: raw.lease,
    })
}

fn parse<T: serde::de::DeserializeOwned>(operation: &'static str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|error| EtcdError::BadResponse {
        operation,
        message: format!(
            "{error} in {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    })
}

/// A write whose answer did not come back from `endpoint`.
fn outcome_unknown(
    operation: &'static str,
    endpoint: &str,
    what: &dyn std::fmt::Display,
) -> EtcdError {
    EtcdError::OutcomeUnknown {
        operation,
        message: format!("{endpoint}: {what} (the request may or may not have been applied)"),
    }
}

/// Reads at most `limit` bytes of `reader`; more is an error naming the operation.
fn read_bounded(operation: &'static str, reader: impl Read, limit: usize) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|error| EtcdError::OutcomeUnknown {
            operation,
            message: format!("reading the answer failed: {error}"),
        })?;
    if body.len() > limit {
        return Err(EtcdError::BadResponse {
            operation,
            message: format!("the answer is larger than the {limit}-byte limit"),
        });
    }
    Ok(body)
}

impl Client {
    /// A client of the endpoints in `url` (see [`parse_endpoints`]). Does not contact etcd.
    pub fn new(url: &str, options: ClientOptions) -> Result<Client> {
        let endpoints = parse_endpoints(url)?;
        if options.request_timeout.is_zero()
            || options.connect_timeout.is_zero()
            || options.watch_reconnect_interval.is_zero()
        {
            return Err(EtcdError::Config(
                "etcd timeouts and the watch reconnect interval must be above zero".to_string(),
            ));
        }
        if options.max_response_bytes < 64 * 1024 {
            return Err(EtcdError::Config(format!(
                "etcd max_response_bytes {} is below 64 KiB",
                options.max_response_bytes
            )));
        }
        let builder = || {
            ureq::AgentBuilder::new()
                .timeout_connect(options.connect_timeout)
                .timeout(options.request_timeout)
                .redirects(0)
        };
        Ok(Client {
            endpoints,
            preferred: AtomicUsize::new(0),
            pooled: builder().max_idle_connections_per_host(4).build(),
            fresh: builder().max_idle_connections(0).build(),
            options,
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sends one gateway request, failing over between endpoints, and returns the answer body.
    fn call(
        &self,
        operation: &'static str,
        path: &str,
        body: &Value,
        retry: Retry,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        let payload = body.to_string();
        if payload.len() > MAX_REQUEST_BYTES {
            return Err(EtcdError::TooLarge {
                operation,
                message: format!(
                    "the request is {} bytes, etcd accepts at most {MAX_REQUEST_BYTES}",
                    payload.len()
                ),
            });
        }
        let agent = match retry {
            Retry::Always => &self.pooled,
            Retry::BeforeSending => &self.fresh,
        };
        let first = self.preferred.load(Ordering::Relaxed) % self.endpoints.len();
        let mut failures = Vec::new();
        for attempt in 0..self.endpoints.len() {
            let index = (first + attempt) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            let mut request = agent
                .post(&format!("{endpoint}{path}"))
                .set("Content-Type", "application/json");
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            match request.send_string(&payload) {
                Ok(response) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    let answer = read_bounded(
                        operation,
                        response.into_reader(),
                        self.options.max_response_bytes,
                    );
                    return match answer {
                        // A read whose answer broke off changed nothing.
                        Err(EtcdError::OutcomeUnknown { message, .. })
                            if retry == Retry::Always =>
                        {
                            Err(EtcdError::Unavailable { operation, message })
                        }
                        answer => answer,
                    };
                }
                Err(ureq::Error::Status(status, response)) => {
                    let body = read_bounded(operation, response.into_reader(), 64 * 1024)
                        .unwrap_or_default();
                    let error = Self::status_error(operation, status, &body);
                    // gRPC "unavailable" (14) or "deadline exceeded" (4): this member cannot
                    // serve now (no leader, stopping); another may. For a write they may also
                    // mean "proposed, but not confirmed in time" ("request timed out"), so a
                    // write is not repeated: its outcome is unknown.
                    if let EtcdError::Rejected {
                        code: 14 | 4,
                        message,
                        ..
                    } = &error
                    {
                        if retry == Retry::Always {
                            failures.push(format!("{endpoint}: {error}"));
                            continue;
                        }
                        return Err(outcome_unknown(operation, endpoint, message));
                    }
                    self.preferred.store(index, Ordering::Relaxed);
                    return Err(error);
                }
                Err(ureq::Error::Transport(transport)) => {
                    let not_sent = matches!(
                        transport.kind(),
                        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns
                    );
                    if not_sent || retry == Retry::Always {
                        failures.push(format!("{endpoint}: {transport}"));
                        continue;
                    }
                    return Err(outcome_unknown(operation, endpoint, &transport));
                }
            }
        }
        Err(EtcdError::Unavailable {
            operation,
            message: failures.join("; "),
        })
    }

    fn status_error(operation: &'static str, status: u16, body: &[u8]) -> EtcdError {
        #[derive(Deserialize)]
        struct RawError {
            #[serde(default)]
            code: i64,
            #[serde(default)]
            message: String,
        }
        let parsed: Option<RawError> = serde_json::from_slice(body).ok();
        let (code, message) = match parsed {
            Some(error) => (error.code, error.message),
            None => (0, String::from_utf8_lossy(body).into_owned()),
        };
        if message.contains("requested lease not found") {
            return EtcdError::LeaseNotFound { operation };
        }
        EtcdError::Rejected {
            operation,
            code,
            message: format!("HTTP {status}: {message}"),
        }
    }

    /// Reads one key.
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let range = self.range(key.as_bytes(), None, 0, false)?;
        Ok(range.kvs.into_iter().next())
    }

    /// Reads keys in `[from, to)` (or just `from` when `to` is `None`), at most `limit` (0 = no
    /// limit) in key order; `keys_only` leaves values empty.
    pub fn range(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
        keys_only: bool,
    ) -> Result<RangeResult> {
        let mut body = json!({ "key": encode(from) });
        if let Some(to) = to {
            body["range_end"] = json!(encode(to));
        }
        if limit > 0 {
            body["limit"] = json!(limit.to_string());
        }
        if keys_only {
            body["keys_only"] = json!(true);
        }
        let answer = self.call("range", "/v3/kv/range", &body, Retry::Always, None)?;
        let raw: RawRange = parse("range", &answer)?;
        let kvs = raw
            .kvs
            .into_iter()
            .map(|kv| decode_key_value("range", kv))
            .collect::<Result<Vec<_>>>()?;
        Ok(RangeResult {
            kvs,
            more: raw.more,
            revision: raw.header.revision,
        })
    }

    /// Every key starting with `prefix`, in key order, read in pages of at most `page` keys
    /// (keys only when `keys_only`), so every response stays bounded however many keys match.
    pub fn scan_prefix(
        &self,
        prefix: &str,
        page: usize,
        keys_only: bool,
        mut visit: impl FnMut(&[KeyValue]),
    ) -> Result<()> {
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        loop {
            let result = self.range(&from, Some(&end), page.max(1), keys_only)?;
            visit(&result.kvs);
            match result.kvs.last() {
                Some(last) if result.more => {
                    // The smallest key after `last`.
                    from = last.key.as_bytes().to_vec();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<u64> {
        // A range of the empty key reads nothing but carries the header.
        Ok(self.range(b"\0", None, 1, true)?.revision)
    }

    /// Runs a transaction: if every compare holds, `success`, else `failure`.
    pub fn txn(&self, compares: &[Compare], success: &[Op], failure: &[Op]) -> Result<TxnResult> {
        for (what, count) in [
            ("compares", compares.len()),
            ("success operations", success.len()),
            ("failure operations", failure.len()),
        ] {
            if count > MAX_TXN_OPERATIONS {
                return Err(EtcdError::TooLarge {
                    operation: "txn",
                    message: format!(
                        "{count} {what}; etcd accepts at most {MAX_TXN_OPERATIONS} per transaction"
                    ),
                });
            }
        }
        let compares: Vec<Value> = compares
            .iter()
            .map(|compare| match compare {
                Compare::Absent(key) => json!({
                    "key": encode(key.as_bytes()), "result": "EQUAL", "target": "CREATE",
                    "create_revision": "0",
                }),
                Compare::ModRevision(key, revision) => json!({
                    "key": encode(key.as_bytes()), "result": "EQUAL", "target": "MOD",
                    "mod_revision": revision.to_string(),
                }),
                Compare::Value(key, value) => json!({
                    "key": encode(key.as_bytes()), "result": "EQUAL", "target": "VALUE",
                    "value": encode(value),
                }),
            })
            .collect();
        let branch = |ops: &[Op]| -> Vec<Value> {
            ops.iter()
                .map(|op| match op {
                    Op::Put { key, value, lease } => {
                        let mut put =
                            json!({ "key": encode(key.as_bytes()), "value": encode(value) });
                        if *lease != 0 {
                            put["lease"] = json!(lease.to_string());
                        }
                        json!({ "request_put": put })
                    }
                    Op::Delete(key) => {
                        json!({ "request_delete_range": { "key": encode(key.as_bytes()) } })
                    }
                    Op::DeleteRange { from, to } => json!({ "request_delete_range": {
                        "key": encode(from.as_bytes()), "range_end": encode(to.as_bytes()),
                    } }),
                    Op::Get(key) => json!({ "request_range": { "key": encode(key.as_bytes()) } }),
                })
                .collect()
        };
        let body = json!({
            "compare": compares,
            "success": branch(success),
            "failure": branch(failure),
        });
        let retry = if success
            .iter()
            .chain(failure)
            .all(|op| matches!(op, Op::Get(_)))
        {
            Retry::Always
        } else {
            Retry::BeforeSending
        };
        let answer = self.call("txn", "/v3/kv/txn", &body, retry, None)?;
        let raw: RawTxn = parse("txn", &answer)?;
        let mut reads = Vec::new();
        for response in raw.responses {
            if let Some(range) = response.get("response_range") {
                let range: RawRange = serde_json::from_value(range.clone()).map_err(|error| {
                    EtcdError::BadResponse {
                        operation: "txn",
                        message: format!("a read of the transaction: {error}"),
                    }
                })?;
                let kv = range.kvs.into_iter().next();
                reads.push(kv.map(|kv| decode_key_value("txn", kv)).transpose()?);
            }
        }
        Ok(TxnResult {
            succeeded: raw.succeeded,
            revision: raw.header.revision,
            reads,
        })
    }

    /// Grants a lease of `ttl` seconds; returns its id and the TTL etcd granted.
    pub fn lease_grant(&self, ttl: Duration) -> Result<(i64, Duration)> {
        let seconds = ttl.as_secs().max(1);
        let body = json!({ "TTL": seconds.to_string() });
        // A grant that is repeated after a lost answer only leaves an unused lease, which
        // expires by itself.
        let answer = self.call("lease grant", "/v3/lease/grant", &body, Retry::Always, None)?;
        let raw: RawLease = parse("lease grant", &answer)?;
        if raw.id == 0 || raw.ttl <= 0 {
            return Err(EtcdError::BadResponse {
                operation: "lease grant",
                message: format!("granted lease {} with TTL {}", raw.id, raw.ttl),
            });
        }
        Ok((raw.id, Duration::from_secs(raw.ttl.unsigned_abs())))
    }

    /// Renews a lease once. Returns the TTL from now, or `None` when etcd no longer has the
    /// lease (it expired or was revoked). `timeout` caps this call.
    pub fn lease_keepalive(&self, lease: i64, timeout: Duration) -> Result<Option<Duration>> {
        let body = json!({ "ID": lease.to_string() });
        let answer = self.call(
            "lease keepalive",
            "/v3/lease/keepalive",
            &body,
            Retry::Always,
            Some(timeout),
        )?;
        // The gateway answers a one-message stream: {"result": {...}} or {"error": {...}}.
        let line = answer
            .split(|byte| *byte == b'\n')
            .next()
            .unwrap_or_default();
        let streamed: RawStreamed<RawLease> = parse("lease keepalive", line)?;
        if let Some(error) = streamed.error {
            return Err(EtcdError::Rejected {
                operation: "lease keepalive",
                code: error.get("grpc_code").and_then(Value::as_i64).unwrap_or(0),
                message: error.to_string(),
            });
        }
        let result = streamed.result.ok_or_else(|| EtcdError::BadResponse {
            operation: "lease keepalive",
            message: "an answer without result".to_string(),
        })?;
        Ok((result.ttl > 0).then(|| Duration::from_secs(result.ttl.unsigned_abs())))
    }

    /// Revokes a lease, deleting every key attached to it. Revoking a lease that is already gone
    /// is not an error.
    pub fn lease_revoke(&self, lease: i64) -> Result<()> {
        let body = json!({ "ID": lease.to_string() });
        match self.call(
            "lease revoke",
            "/v3/lease/revoke",
            &body,
            Retry::Always,
            None,
        ) {
            Ok(_) | Err(EtcdError::LeaseNotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Watches every key starting with `prefix` from revision `start` on, for at most
    /// `watch_reconnect_interval`: `on_message` sees each message in order and returns `false`
    /// to stop. Returns `Ok` when the stream ended (time up, or stopped), an error when it could
    /// not be opened or broke; either way the caller re-opens from the revision after the last
    /// event it saw, so nothing is missed.
    pub fn watch_prefix(
        &self,
        prefix: &str,
        start: u64,
        mut on_message: impl FnMut(WatchMessage) -> bool,
    ) -> Result<()> {
        let operation = "watch";
        let body = json!({ "create_request": {
            "key": encode(prefix.as_bytes()),
            "range_end": encode(&prefix_end(prefix)),
            "start_revision": start.to_string(),
        }});
        let first = self.preferred.load(Ordering::Relaxed) % self.endpoints.len();
        let endpoint = &self.endpoints[first];
        // A connection of its own: a long stream, never worth pooling.
        let response = self
            .fresh
            .post(&format!("{endpoint}/v3/watch"))
            .set("Content-Type", "application/json")
            .timeout(self.options.watch_reconnect_interval)
            .send_string(&body.to_string());
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                // Try another endpoint next time.
                self.preferred.store(first + 1, Ordering::Relaxed);
                return Err(EtcdError::Unavailable {
                    operation,
                    message: format!("{endpoint}: {error}"),
                });
            }
        };
        let limit = self.options.max_response_bytes as u64;
        let mut reader = BufReader::new(response.into_reader());
        loop {
            let mut line = Vec::new();
            let read = (&mut reader).take(limit + 1).read_until(b'\n', &mut line);
            match read {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::TimedOut => return Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) => {
                    return Err(EtcdError::Unavailable {
                        operation,
                        message: format!("{endpoint}: the watch stream broke: {error}"),
                    })
                }
            }
            if line.len() as u64 > limit {
                return Err(EtcdError::BadResponse {
                    operation,
                    message: format!("a watch message is larger than the {limit}-byte limit"),
                });
            }
            if line.last() != Some(&b'\n') {
                // A message cut short by the end of the stream (timeout): re-open.
                return Ok(());
            }
            let streamed: RawStreamed<RawWatch> = parse(operation, &line)?;
            if let Some(error) = streamed.error {
                return Err(EtcdError::Rejected {
                    operation,
                    code: error.get("grpc_code").and_then(Value::as_i64).unwrap_or(0),
                    message: error.to_string(),
                });
            }
            let Some(result) = streamed.result else {
                continue;
            };
            if result.canceled {
                if result.compact_revision > 0 {
                    on_message(WatchMessage::Compacted {
                        compact_revision: result.compact_revision,
                    });
                    return Ok(());
                }
                return Err(EtcdError::Rejected {
                    operation,
                    code: 0,
                    message: format!("etcd cancelled the watch: {}", result.cancel_reason),
                });
            }
            if result.events.is_empty() {
                continue;
            }
            let mut events = Vec::with_capacity(result.events.len());
            for event in result.events {
                let deleted = event.kind == "DELETE";
                let kv = decode_key_value(operation, event.kv)?;
                events.push(WatchEvent {
                    key: kv.key,
                    revision: kv.mod_revision,
                    deleted,
                });
            }
            if !on_message(WatchMessage::Events(events)) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_refuse_bad_ones() {
        assert_eq!(
            parse_endpoints("etcd://a:2379,b:2380").expect("parse"),
            vec!["http://a:2379", "http://b:2380"]
        );
        assert_eq!(
            parse_endpoints("http://a:1/").expect("parse"),
            vec!["http://a:1"]
        );
        assert_eq!(
            parse_endpoints("etcd://a:2379,b:2380/tests/run-1").expect("parse"),
            vec!["http://a:2379".to_string(), "http://b:2380".to_string()]
        );
        assert_eq!(
            split_chroot("etcd://a:2379,b:2380/tests/run-1/").expect("split"),
            ("etcd://a:2379,b:2380", Some("tests/run-1"))
        );
        assert_eq!(
            split_chroot("etcd://a:1").expect("split"),
            ("etcd://a:1", None)
        );
        assert!(split_chroot("etcd://a:1/../x").is_err());
        assert!(split_chroot("etcd://a:1/a b").is_err());
        assert!(parse_endpoints("etcd://").is_err());
        assert!(parse_endpoints("etcd://a").is_err());
        assert!(parse_endpoints("https://a:1").is_err());
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
