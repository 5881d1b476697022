//! Where the object store is and how to talk to it: `s3://bucket/prefix`, endpoint, region,
//! addressing style, credentials, timeouts and size limits.
//!
//! The setting names in error messages are the ones `docs/cluster.md` gives the broker's flags
//! (`--storage`, `--s3-endpoint`, `--s3-region`, `--s3-path-style`, `--s3-access-key-file`).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use url::Url;

use crate::error::ConfigError;

/// Environment variable holding the access key id when no credentials file is given.
pub const ACCESS_KEY_ID_ENV: &str = "MERIDIAN_S3_ACCESS_KEY_ID";
/// Environment variable holding the secret access key when no credentials file is given.
pub const SECRET_ACCESS_KEY_ENV: &str = "MERIDIAN_S3_SECRET_ACCESS_KEY";

/// The longest key S3 accepts, in bytes (prefix included).
pub const MAX_KEY_BYTES: usize = 1024;

/// `s3://bucket/prefix`: the bucket, and the key prefix every object of this store lives under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the whole bucket.
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://bucket` or `s3://bucket/some/prefix` (a trailing `/` is ignored).
    pub fn parse(text: &str) -> Result<S3Location, ConfigError> {
        let rest = text.strip_prefix("s3://").ok_or_else(|| {
            ConfigError::new("storage", format!("`{text}` does not start with s3://"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        validate_bucket_name(bucket)
            .map_err(|detail| ConfigError::new("storage", format!("`{text}`: {detail}")))?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.starts_with('/') || prefix.contains("//") {
            return Err(ConfigError::new(
                "storage",
                format!("`{text}`: the prefix has an empty path segment"),
            ));
        }
        if prefix.len() > MAX_KEY_BYTES / 2 || prefix.chars().any(char::is_control) {
            return Err(ConfigError::new(
                "storage",
                format!(
                    "`{text}`: the prefix must be at most {} bytes without control characters",
                    MAX_KEY_BYTES / 2
                ),
            ));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// S3's bucket naming rules (3–63 characters: lowercase letters, digits, `-` and `.`, starting
/// and ending with a letter or digit).
fn validate_bucket_name(bucket: &str) -> Result<(), String> {
    let valid_chars = bucket.bytes().all(|byte| {
        byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.'
    });
    let ends_ok = bucket
        .bytes()
        .next()
        .zip(bucket.bytes().last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && valid_chars && ends_ok {
        Ok(())
    } else {
        Err(format!(
            "bucket name `{bucket}` must be 3 to 63 lowercase letters, digits, `-` or `.`, \
             starting and ending with a letter or digit"
        ))
    }
}

/// An access key id and its secret. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    secret_access_key: String,
}

impl Credentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        }
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// Reads a credentials file: one line `ACCESS_KEY_ID:SECRET_ACCESS_KEY` (the s3fs
    /// convention); blank lines and lines starting with `#` are ignored, surrounding whitespace
    /// is trimmed.
    pub fn from_file(path: &Path) -> Result<Credentials, ConfigError> {
        const MAX_FILE_BYTES: u64 = 64 * 1024;
        let setting = "s3-access-key-file";
        let size = std::fs::metadata(path)
            .map_err(|error| ConfigError::new(setting, format!("{}: {error}", path.display())))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(ConfigError::new(
                setting,
                format!(
                    "{}: {size} bytes, more than {MAX_FILE_BYTES}",
                    path.display()
                ),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::new(setting, format!("{}: {error}", path.display())))?;
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'));
        let (Some(line), None) = (lines.next(), lines.next()) else {
            return Err(ConfigError::new(
                setting,
                format!(
                    "{}: expected exactly one line ACCESS_KEY_ID:SECRET_ACCESS_KEY",
                    path.display()
                ),
            ));
        };
        match line.split_once(':') {
            Some((id, secret)) if !id.trim().is_empty() && !secret.trim().is_empty() => {
                Ok(Credentials::new(id.trim(), secret.trim()))
            }
            _ => Err(ConfigError::new(
                setting,
                format!(
                    "{}: expected ACCESS_KEY_ID:SECRET_ACCESS_KEY, both non-empty",
                    path.display()
                ),
            )),
        }
    }

    /// Reads `MERIDIAN_S3_ACCESS_KEY_ID` and `MERIDIAN_S3_SECRET_ACCESS_KEY`.
    pub fn from_env() -> Result<Credentials, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Credentials::from_file`] when a file is given, else [`Credentials::from_env`].
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Credentials, ConfigError> {
        match file {
            Some(path) => Credentials::from_file(path),
            None => Credentials::from_env(),
        }
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Credentials, ConfigError> {
        let read = |name: &str| {
            lookup(name)
                .filter(|value| !value.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "s3-access-key-file",
                        format!(
                            "no credentials file given and {name} is not set \
                         (set {ACCESS_KEY_ID_ENV} and {SECRET_ACCESS_KEY_ENV}, or give a file)"
                        ),
                    )
                })
        };
        Ok(Credentials::new(
            read(ACCESS_KEY_ID_ENV)?.trim(),
            read(SECRET_ACCESS_KEY_ENV)?.trim(),
        ))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Everything [`ObjectStore::new`](crate::ObjectStore::new) needs.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub location: S3Location,
    /// `http://host:port` or `https://host:port` of the S3 API.
    pub endpoint: Url,
    /// The SigV4 signing region (`us-east-1` for most self-hosted stores).
    pub region: String,
    /// `true`: `endpoint/bucket/key` (SeaweedFS, MinIO, Garage); `false`: virtual-hosted
    /// `bucket.endpoint/key` (AWS).
    pub path_style: bool,
    pub credentials: Credentials,
    /// Longest wait for a TCP (and TLS) connection. Default 2 s.
    pub connect_timeout: Duration,
    /// Longest time one request may take from connecting to the last byte of the response.
    /// Default 30 s.
    pub request_timeout: Duration,
    /// Largest response body read (a GET of a whole object, a list page, an error document);
    /// a larger one fails with `Invalid` before it is read. Default 256 MiB.
    pub max_response_bytes: u64,
    /// Keys asked for per list request (S3 answers at most 1,000). Default 1,000.
    pub list_page_keys: usize,
}

impl S3Config {
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 256 << 20;
    pub const DEFAULT_LIST_PAGE_KEYS: usize = 1000;

    /// A configuration with default timeouts and limits. `storage` is `s3://bucket/prefix`,
    /// `endpoint` an `http(s)://` URL.
    pub fn new(
        storage: &str,
        endpoint: &str,
        region: &str,
        path_style: bool,
        credentials: Credentials,
    ) -> Result<S3Config, ConfigError> {
        let location = S3Location::parse(storage)?;
        let mut endpoint = Url::parse(endpoint)
            .map_err(|error| ConfigError::new("s3-endpoint", format!("`{endpoint}`: {error}")))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(ConfigError::new(
                "s3-endpoint",
                format!("`{endpoint}` must be an http:// or https:// URL with a host"),
            ));
        }
        if endpoint.query().is_some() || endpoint.fragment().is_some() {
            return Err(ConfigError::new(
                "s3-endpoint",
                format!("`{endpoint}` must not have a query or fragment"),
            ));
        }
        // The bucket (path style) is joined onto the endpoint's path, which must end in `/`.
        if !endpoint.path().ends_with('/') {
            let path = format!("{}/", endpoint.path());
            endpoint.set_path(&path);
        }
        if region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ConfigError::new(
                "s3-region",
                format!("`{region}` must be non-empty letters, digits and `-`"),
            ));
        }
        if credentials.access_key_id.is_empty() || credentials.secret_access_key.is_empty() {
            return Err(ConfigError::new(
                "s3-access-key-file",
                "the access key id and the secret must both be non-empty",
            ));
        }
        Ok(S3Config {
            location,
            endpoint,
            region: region.to_string(),
            path_style,
            credentials,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_response_bytes: Self::DEFAULT_MAX_RESPONSE_BYTES,
            list_page_keys: Self::DEFAULT_LIST_PAGE_KEYS,
        })
    }

    /// Checks the timeouts and limits (after a caller changed them).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(ConfigError::new(
                "s3-request-timeout",
                "timeouts must be greater than zero",
            ));
        }
        if self.max_response_bytes == 0 {
            return Err(ConfigError::new(
                "s3-max-response-bytes",
                "must be greater than zero",
            ));
        }
        if !(1..=1000).contains(&self.list_page_keys) {
            return Err(ConfigError::new(
                "s3-list-page-keys",
                format!("{} is not within 1..=1000", self.list_page_keys),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_bad_ones_name_the_setting() {
        assert_eq!(
            S3Location::parse("s3://meridian-data/us-east/").expect("parse"),
            S3Location {
                bucket: "meridian-data".into(),
                prefix: "us-east".into()
            }
        );
        let bare = S3Location::parse("s3://bucket").expect("parse");
        assert_eq!(bare.prefix, "");
        assert_eq!(bare.to_string(), "s3://bucket");
        for bad in [
            "http://bucket/x",
            "s3://B/x",
            "s3://ab",
            "s3://bucket//x",
            "s3://-x-/y",
        ] {
            let error = S3Location::parse(bad).expect_err(bad);
            assert_eq!(error.setting, "storage", "{bad}");
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn config_checks_endpoint_and_region() {
        let credentials = Credentials::new("id", "secret");
        let config = S3Config::new(
            "s3://bucket/p",
            "http://127.0.0.1:8333",
            "us-east-1",
            true,
            credentials.clone(),
        )
        .expect("config");
        assert_eq!(config.endpoint.as_str(), "http://127.0.0.1:8333/");
        let error = S3Config::new("s3://bucket", "ftp://x", "r", true, credentials.clone())
            .expect_err("scheme");
        assert_eq!(error.setting, "s3-endpoint");
        let error =
            S3Config::new("s3://bucket", "http://x", "", true, credentials).expect_err("region");
        assert_eq!(error.setting, "s3-region");
    }

    #[test]
    fn credentials_come_from_a_file_or_the_environment_and_never_show_the_secret() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("s3.key");
        std::fs::write(&path, "# meridian\n  AKID:se:cret  \n").expect("write");
        let credentials = Credentials::from_file(&path).expect("read");
        assert_eq!(credentials, Credentials::new("AKID", "se:cret"));
        assert!(!format!("{credentials:?}").contains("se:cret"));
        std::fs::write(&path, "AKID\n").expect("write");
        let error = Credentials::from_file(&path).expect_err("no secret");
        assert!(
            error
                .to_string()
                .contains("ACCESS_KEY_ID:SECRET_ACCESS_KEY"),
            "{error}"
        );

        let from_env = Credentials::from_lookup(|name| match name {
            ACCESS_KEY_ID_ENV => Some("id".into()),
            SECRET_ACCESS_KEY_ENV => Some("secret".into()),
            _ => None,
        })
        .expect("env");
        assert_eq!(from_env, Credentials::new("id", "secret"));
        let error =
            Credentials::from_lookup(|name| (name == ACCESS_KEY_ID_ENV).then(|| "id".to_string()))
                .expect_err("no secret");
        assert!(error.to_string().contains(SECRET_ACCESS_KEY_ENV), "{error}");
    }
}
