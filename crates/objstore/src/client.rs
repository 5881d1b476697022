//! A small synchronous S3 client: `rusty-s3` signs each request (SigV4, as a presigned URL),
//! `ureq` sends it. One [`ObjectStore`] is one bucket and key prefix; it is `Send + Sync` and
//! keeps a pool of connections, so share one per process.
//!
//! Every call is bounded: a connect timeout, a timeout for the whole request including the
//! response body, and a largest response body. Nothing is retried here: an error that
//! [`is_retryable`](ObjectStoreError::is_retryable) may be retried by the caller, which knows
//! its own deadline (a producer's send timeout, for instance).

use std::io::Read;

use base64::Engine;
use std::time::Duration;

use crate::config::{S3Config, S3Location, MAX_KEY_BYTES};
use crate::error::{ObjectStoreError, Result};
use rusty_s3::{Bucket, S3Action, UrlStyle};

/// How long a signed request stays valid: the clock of this host and the store's may differ by
/// up to this much.
const SIGNATURE_VALIDITY: Duration = Duration::from_secs(300);
/// The header that carries a PUT body's CRC32C (big-endian, base64), checked by the store.
const CHECKSUM_HEADER: &str = "x-amz-checksum-crc32c";
/// The largest error document read from a failed request; the rest is not needed.
const MAX_ERROR_BODY_BYTES: u64 = 64 * 1024;
/// The largest list page accepted (1,000 keys of 1 KiB each plus XML).
const MAX_LIST_PAGE_BYTES: u64 = 4 << 20;

/// One object's size and entity tag, from a HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: Option<String>,
}

/// One key found by a listing; `key` is relative to the store's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    pub key: String,
    pub size: u64,
    /// When the object was stored, in ms since the Unix epoch, by the store's clock (S3's
    /// `LastModified`); `None` when the store sent a time this client cannot read.
    pub last_modified_ms: Option<u64>,
}

/// An ISO 8601 UTC time as S3 lists it (`2026-12-02T01:10:25.000Z`, fraction optional) in ms
/// since the Unix epoch; `None` for anything else.
pub fn parse_s3_time_ms(text: &str) -> Option<u64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date_parts = date.splitn(3, '-').map(|part| part.parse::<i64>().ok());
    let (year, month, day) = (
        date_parts.next()??,
        date_parts.next()??,
        date_parts.next()??,
    );
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut clock_parts = clock.splitn(3, ':').map(|part| part.parse::<i64>().ok());
    let (hour, minute, second) = (
        clock_parts.next()??,
        clock_parts.next()??,
        clock_parts.next()??,
    );
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&hour)
        && (0..60).contains(&minute)
        && (0..=60).contains(&second)
        && fraction.bytes().all(|byte| byte.is_ascii_digit());
    if !valid || year < 1970 {
        return None;
    }
    let millis: i64 = format!("{fraction:0<3}").get(..3)?.parse().ok()?;
    // Days from 1970-01-01 to the civil date (the proleptic Gregorian calendar).
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    u64::try_from(seconds * 1000 + millis).ok()
}

/// One page of a listing. `next` is the token that asks for the following page, `None` on the
/// last page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectSummary>,
    pub next: Option<String>,
}

/// The bytes at the end of an object and the object's whole size (from a suffix range read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectTail {
    pub bytes: Vec<u8>,
    pub object_size: u64,
}

/// A bucket and key prefix of an S3-compatible store. Keys given to and returned by its
/// methods are relative to the prefix of its `s3://bucket/prefix` location.
pub struct ObjectStore {
    location: S3Location,
    bucket: Bucket,
    credentials: rusty_s3::Credentials,
    region: String,
    agent: ureq::Agent,
    /// The longest a request may take (`request_timeout`); a caller may ask for less.
    request_timeout: Duration,
    max_response_bytes: u64,
    list_page_keys: usize,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("location", &self.location.to_string())
            .field("endpoint", &self.bucket.base_url().as_str())
            .finish_non_exhaustive()
    }
}

impl ObjectStore {
    pub fn new(config: &S3Config) -> Result<ObjectStore, crate::ConfigError> {
        config.validate()?;
        let style = if config.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            config.endpoint.clone(),
            style,
            config.location.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|error| {
            crate::ConfigError::new("s3-endpoint", format!("{}: {error}", config.endpoint))
        })?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(config.connect_timeout)
            .timeout(config.request_timeout)
            .redirects(0)
            .max_idle_connections_per_host(16)
            .build();
        Ok(ObjectStore {
            location: config.location.clone(),
            bucket,
            credentials: rusty_s3::Credentials::new(
                config.credentials.access_key_id.clone(),
                config.credentials.secret_access_key().to_string(),
            ),
            region: config.region.clone(),
            agent,
            request_timeout: config.request_timeout,
            max_response_bytes: config.max_response_bytes,
            list_page_keys: config.list_page_keys,
        })
    }

    /// The `s3://bucket/prefix` this store works in.
    pub fn location(&self) -> &S3Location {
        &self.location
    }

    /// Stores `bytes` under `key`, replacing any object there. Durable when it returns (S3's
    /// PUT is). The request carries the body's CRC32C (`x-amz-checksum-crc32c`), which the
    /// store checks before storing anything: a body damaged on the way is refused (`Invalid`,
    /// S3's `BadDigest`), never stored.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.put_with_checksum(key, bytes, crc32c::crc32c(bytes))
    }

    /// [`ObjectStore::put`] with the body's CRC32C given by a caller that knows it already
    /// (combined from the checksums of its records, say, so that damage in memory since they
    /// were checked is caught too).
    pub fn put_with_checksum(&self, key: &str, bytes: &[u8], crc32c: u32) -> Result<()> {
        self.put_checked(key, bytes, crc32c, self.request_timeout)
    }

    /// [`ObjectStore::put`] that gives up after `timeout` (at most the store's
    /// `request_timeout`) with `Unavailable`: for a caller with a deadline of its own, so that
    /// one attempt against a store that accepts connections and never answers does not outlast
    /// it. The PUT may still have stored the object (a timeout is an unknown outcome).
    pub fn put_within(&self, key: &str, bytes: &[u8], timeout: Duration) -> Result<()> {
        self.put_checked(key, bytes, crc32c::crc32c(bytes), timeout)
    }

    fn put_checked(&self, key: &str, bytes: &[u8], crc32c: u32, timeout: Duration) -> Result<()> {
        // ureq reads a zero timeout as "none": the shortest real one instead.
        let timeout = timeout
            .min(self.request_timeout)
            .max(Duration::from_millis(1));
        let full_key = self.full_key("put", key)?;
        let checksum = base64::engine::general_purpose::STANDARD.encode(crc32c.to_be_bytes());
        let mut action = self.bucket.put_object(Some(&self.credentials), &full_key);
        // Signed: stores refuse unsigned x-amz-* headers.
        action
            .headers_mut()
            .insert(CHECKSUM_HEADER, checksum.clone());
        let url = action.sign(SIGNATURE_VALIDITY);
        let request = self
            .agent
            .request_url("PUT", &url)
            .timeout(timeout)
            .set(CHECKSUM_HEADER, &checksum)
            .set("Content-Type", "application/octet-stream");
        let response = self.finish("put", key, request.send_bytes(bytes))?;
        self.drain(response);
        Ok(())
    }

    /// The whole object at `key` (at most `max_response_bytes`).
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let response = self.finish("get", key, self.object_request("get", "GET", key)?.call())?;
        self.read_body("get", key, response, self.max_response_bytes)
    }

    /// `length` bytes of the object at `key` from `offset`; fewer if the object ends first.
    /// A range starting at or past the end of the object fails with `Invalid`.
    pub fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let operation = "ranged get";
        let last = offset
            .checked_add(length.saturating_sub(1))
            .ok_or_else(|| {
                self.invalid(operation, key, format!("range {offset}+{length} overflows"))
            })?;
        let range = format!("bytes={offset}-{last}");
        let Some((response, start, _)) = self.ranged_request(operation, key, &range, length)?
        else {
            return Err(self.invalid(
                operation,
                key,
                format!("{range} starts at or past the end of the object (HTTP 416)"),
            ));
        };
        if start != offset {
            return Err(self.invalid(
                operation,
                key,
                format!("asked for {range}, the store answered from byte {start}"),
            ));
        }
        self.read_body(operation, key, response, length)
    }

    /// The last `length` bytes of the object at `key` (all of it if it is shorter) and the
    /// object's size, in one request.
    pub fn get_tail(&self, key: &str, length: u64) -> Result<ObjectTail> {
        let operation = "tail get";
        let range = format!("bytes=-{length}");
        let Some((response, start, object_size)) =
            self.ranged_request(operation, key, &range, length)?
        else {
            // Only an empty object has no last bytes.
            return Ok(ObjectTail {
                bytes: Vec::new(),
                object_size: 0,
            });
        };
        let bytes = self.read_body(operation, key, response, length)?;
        if start.checked_add(bytes.len() as u64) != Some(object_size) {
            return Err(self.invalid(
                operation,
                key,
                format!(
                    "{} bytes from offset {start} do not end an object of {object_size} bytes",
                    bytes.len()
                ),
            ));
        }
        Ok(ObjectTail { bytes, object_size })
    }

    /// The size and entity tag of the object at `key`.
    pub fn head(&self, key: &str) -> Result<ObjectInfo> {
        let response = self.finish(
            "head",
            key,
            self.object_request("head", "HEAD", key)?.call(),
        )?;
        let size = response
            .header("Content-Length")
            .and_then(|value| value.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                self.invalid("head", key, "response without a Content-Length".to_string())
            })?;
        Ok(ObjectInfo {
            size,
            etag: response.header("ETag").map(str::to_string),
        })
    }

    /// Removes the object at `key`. Removing a key that does not exist succeeds (S3's rule).
    pub fn delete(&self, key: &str) -> Result<()> {
        let request = self.object_request("delete", "DELETE", key)?;
        let response = self.finish("delete", key, request.call())?;
        self.drain(response);
        Ok(())
    }

    /// One page (at most `list_page_keys` keys, in key order) of the keys starting with
    /// `prefix`; pass the previous page's `next` to get the following one.
    pub fn list_page(&self, prefix: &str, continuation: Option<&str>) -> Result<ListPage> {
        let operation = "list";
        let full_prefix = self.full_prefix(prefix);
        let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
        action.with_prefix(full_prefix.as_str());
        action.with_max_keys(self.list_page_keys);
        if let Some(token) = continuation {
            action.with_continuation_token(token);
        }
        let url = action.sign(SIGNATURE_VALIDITY);
        let response = self.finish(
            operation,
            prefix,
            self.agent.request_url("GET", &url).call(),
        )?;
        let body = self.read_body(operation, prefix, response, MAX_LIST_PAGE_BYTES)?;
        let text = String::from_utf8(body)
            .map_err(|_| self.invalid(operation, prefix, "list response is not UTF-8".into()))?;
        let parsed = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|error| {
            self.invalid(
                operation,
                prefix,
                format!("unparsable list response: {error}"),
            )
        })?;
        let objects = parsed
            .contents
            .into_iter()
            .map(|content| {
                let key = self.relative_key(&content.key).ok_or_else(|| {
                    self.invalid(
                        operation,
                        prefix,
                        format!("listed key `{}` is outside the prefix", content.key),
                    )
                })?;
                Ok(ObjectSummary {
                    key,
                    size: content.size,
                    last_modified_ms: parse_s3_time_ms(&content.last_modified),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ListPage {
            objects,
            next: parsed
                .next_continuation_token
                .filter(|token| !token.is_empty()),
        })
    }

    /// Every key starting with `prefix`, in key order, page after page. More than
    /// `max_objects` keys fail with `Invalid` (a listing is never unbounded).
    pub fn list(&self, prefix: &str, max_objects: usize) -> Result<Vec<ObjectSummary>> {
        let mut objects = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let page = self.list_page(prefix, continuation.as_deref())?;
            objects.extend(page.objects);
            if objects.len() > max_objects {
                return Err(self.invalid(
                    "list",
                    prefix,
                    format!("more than {max_objects} keys under the prefix"),
                ));
            }
            match page.next {
                Some(token) if Some(&token) != continuation.as_ref() => continuation = Some(token),
                Some(_) => {
                    return Err(self.invalid(
                        "list",
                        prefix,
                        "the store returned the same continuation token twice".into(),
                    ))
                }
                None => return Ok(objects),
            }
        }
    }

    /// Creates the bucket; succeeds if this account already owns it. For tests and a first
    /// start; production buckets are usually made by an operator.
    pub fn create_bucket(&self) -> Result<()> {
        let operation = "create bucket";
        let url = self
            .bucket
            .create_bucket(&self.credentials)
            .sign(SIGNATURE_VALIDITY);
        let request = self.agent.request_url("PUT", &url);
        // Outside us-east-1, S3 wants the region named in the body.
        let result = if self.region == "us-east-1" {
            request.call()
        } else {
            request.send_string(&format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.region
            ))
        };
        match result {
            Err(ureq::Error::Status(409, response)) => {
                let (code, message) = self.error_document(response);
                if code == "BucketAlreadyOwnedByYou" {
                    Ok(())
                } else {
                    Err(self.invalid(operation, "", format!("HTTP 409 {code}: {message}")))
                }
            }
            other => self
                .finish(operation, "", other)
                .map(|response| self.drain(response)),
        }
    }

    /// A GET with a `Range` header for at most `length` bytes: the partial response, its first
    /// byte's offset and the object's size (from `Content-Range`); `None` when the store answers
    /// 416 (the range is not within the object). A store that ignores the header (200, the
    /// whole object) is refused: every S3-compatible store serves ranges.
    fn ranged_request(
        &self,
        operation: &'static str,
        key: &str,
        range: &str,
        length: u64,
    ) -> Result<Option<(ureq::Response, u64, u64)>> {
        if length == 0 || length > self.max_response_bytes {
            return Err(self.invalid(
                operation,
                key,
                format!(
                    "length {length} is not within 1..={}",
                    self.max_response_bytes
                ),
            ));
        }
        let result = self
            .object_request(operation, "GET", key)?
            .set("Range", range)
            .call();
        if let Err(ureq::Error::Status(416, response)) = result {
            self.drain(response);
            return Ok(None);
        }
        let response = self.finish(operation, key, result)?;
        let status = response.status();
        match content_range(&response) {
            Some((start, object_size)) if status == 206 => Ok(Some((response, start, object_size))),
            _ => Err(self.invalid(
                operation,
                key,
                format!("asked for {range}, got HTTP {status} without a usable Content-Range"),
            )),
        }
    }

    /// A signed request of `method` (GET, HEAD or DELETE) on the object at `key`.
    fn object_request(
        &self,
        operation: &'static str,
        method: &str,
        key: &str,
    ) -> Result<ureq::Request> {
        let full_key = self.full_key(operation, key)?;
        let credentials = Some(&self.credentials);
        let url = match method {
            "GET" => self
                .bucket
                .get_object(credentials, &full_key)
                .sign(SIGNATURE_VALIDITY),
            "HEAD" => self
                .bucket
                .head_object(credentials, &full_key)
                .sign(SIGNATURE_VALIDITY),
            "DELETE" => self
                .bucket
                .delete_object(credentials, &full_key)
                .sign(SIGNATURE_VALIDITY),
            _ => return Err(self.invalid(operation, key, format!("no such method {method}"))),
        };
        Ok(self.agent.request_url(method, &url))
    }

    /// The object key for `key`: the prefix, `/`, then `key`.
    fn full_key(&self, operation: &'static str, key: &str) -> Result<String> {
        let full_key = self.full_prefix(key);
        if key.is_empty()
            || key.starts_with('/')
            || full_key.len() > MAX_KEY_BYTES
            || key.chars().any(char::is_control)
        {
            return Err(self.invalid(
                operation,
                key,
                format!(
                    "a key must be non-empty, not start with `/`, have no control characters, \
                     and be at most {MAX_KEY_BYTES} bytes with the prefix"
                ),
            ));
        }
        Ok(full_key)
    }

    fn full_prefix(&self, key: &str) -> String {
        if self.location.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.location.prefix)
        }
    }

    fn relative_key(&self, full_key: &str) -> Option<String> {
        if self.location.prefix.is_empty() {
            return Some(full_key.to_string());
        }
        full_key
            .strip_prefix(self.location.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .map(str::to_string)
    }

    /// The object's full `bucket` / `key` names for error messages.
    fn names(&self, key: &str) -> (String, String) {
        (self.location.bucket.clone(), self.full_prefix(key))
    }

    pub(crate) fn invalid(
        &self,
        operation: &'static str,
        key: &str,
        detail: String,
    ) -> ObjectStoreError {
        let (bucket, key) = self.names(key);
        ObjectStoreError::Invalid {
            operation,
            bucket,
            key,
            detail,
        }
    }

    pub(crate) fn corrupt(&self, key: &str, detail: String) -> ObjectStoreError {
        let (bucket, key) = self.names(key);
        ObjectStoreError::Corrupt {
            bucket,
            key,
            detail,
        }
    }

    fn unavailable(&self, operation: &'static str, key: &str, detail: String) -> ObjectStoreError {
        let (bucket, key) = self.names(key);
        ObjectStoreError::Unavailable {
            operation,
            bucket,
            key,
            detail,
        }
    }

    /// Turns ureq's outcome into a response of status 2xx or a sorted error.
    fn finish(
        &self,
        operation: &'static str,
        key: &str,
        result: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response> {
        match result {
            Ok(response) if (200..300).contains(&response.status()) => Ok(response),
            Ok(response) | Err(ureq::Error::Status(_, response)) => {
                Err(self.status_error(operation, key, response))
            }
            Err(ureq::Error::Transport(transport)) => {
                let detail = transport.to_string();
                match transport.kind() {
                    ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                        Err(self.invalid(operation, key, detail))
                    }
                    _ => Err(self.unavailable(operation, key, detail)),
                }
            }
        }
    }

    fn status_error(
        &self,
        operation: &'static str,
        key: &str,
        response: ureq::Response,
    ) -> ObjectStoreError {
        let status = response.status();
        let (code, message) = self.error_document(response);
        let detail = format!("HTTP {status} {code}: {message}");
        let (bucket, key) = self.names(key);
        match status {
            404 => ObjectStoreError::NotFound {
                bucket,
                key,
                detail,
            },
            401 | 403 => ObjectStoreError::Denied {
                operation,
                bucket,
                key,
                detail,
            },
            408 | 429 | 500..=599 => ObjectStoreError::Unavailable {
                operation,
                bucket,
                key,
                detail,
            },
            _ => ObjectStoreError::Invalid {
                operation,
                bucket,
                key,
                detail,
            },
        }
    }

    /// The `Code` and `Message` of an S3 error document (empty when there is none, as for a
    /// HEAD).
    fn error_document(&self, response: ureq::Response) -> (String, String) {
        let mut body = Vec::new();
        // A failure to read the error document leaves the status code to speak.
        let _ = response
            .into_reader()
            .take(MAX_ERROR_BODY_BYTES)
            .read_to_end(&mut body);
        let text = String::from_utf8_lossy(&body);
        let element = |name: &str| {
            let open = format!("<{name}>");
            let close = format!("</{name}>");
            text.split_once(open.as_str())
                .and_then(|(_, rest)| rest.split_once(close.as_str()))
                .map(|(value, _)| value.trim().to_string())
                .unwrap_or_default()
        };
        (element("Code"), element("Message"))
    }

    /// Reads and drops a small response body, so that the connection goes back to the pool
    /// (a TLS handshake saved per request); a body too large for that just closes it.
    fn drain(&self, response: ureq::Response) {
        let mut sink = Vec::new();
        let _ = response
            .into_reader()
            .take(MAX_ERROR_BODY_BYTES)
            .read_to_end(&mut sink);
    }

    /// The response body, refused with `Invalid` if it is longer than `limit` bytes.
    fn read_body(
        &self,
        operation: &'static str,
        key: &str,
        response: ureq::Response,
        limit: u64,
    ) -> Result<Vec<u8>> {
        let declared = response
            .header("Content-Length")
            .and_then(|value| value.trim().parse::<u64>().ok());
        if let Some(declared) = declared.filter(|declared| *declared > limit) {
            return Err(self.invalid(
                operation,
                key,
                format!("response of {declared} bytes is larger than the limit of {limit}"),
            ));
        }
        let capacity = usize::try_from(declared.unwrap_or(0).min(limit)).unwrap_or(0);
        let mut body = Vec::with_capacity(capacity);
        response
            .into_reader()
            .take(limit.saturating_add(1))
            .read_to_end(&mut body)
            .map_err(|error| {
                self.unavailable(operation, key, format!("reading the response: {error}"))
            })?;
        if body.len() as u64 > limit {
            return Err(self.invalid(
                operation,
                key,
                format!("response is larger than the limit of {limit} bytes"),
            ));
        }
        if let Some(declared) = declared.filter(|declared| *declared != body.len() as u64) {
            return Err(self.unavailable(
                operation,
                key,
                format!(
                    "response ended after {} of its {declared} bytes",
                    body.len()
                ),
            ));
        }
        Ok(body)
    }
}

/// `(first byte, object size)` from a `Content-Range: bytes first-last/size` header.
fn content_range(response: &ureq::Response) -> Option<(u64, u64)> {
    let value = response.header("Content-Range")?.trim();
    let (range, size) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (first, _last) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, size.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::parse_s3_time_ms;

    #[test]
    fn s3_listing_times_are_read_as_unix_milliseconds() {
        assert_eq!(parse_s3_time_ms("1970-01-01T00:00:00.000Z"), Some(0));
        // `date -u -d 2026-12-02T01:10:25Z +%s` = 1796173825
        assert_eq!(
            parse_s3_time_ms("2026-12-02T01:10:25.123Z"),
            Some(1_796_173_825_123)
        );
        assert_eq!(
            parse_s3_time_ms("2024-02-29T23:59:59Z"),
            Some(1_709_251_199_000)
        );
        for bad in [
            "",
            "2026-12-02",
            "2026-13-02T00:00:00Z",
            "2026-12-02T01:10:25",
            "x",
        ] {
            assert_eq!(parse_s3_time_ms(bad), None, "{bad}");
        }
    }
}
