//! The audit log: one JSON object per line, appended, for every admin mutation and every
//! authentication or authorization failure:
//! `{"time":"2026-12-01T12:00:00.123Z","role":"alice","address":"127.0.0.1:50000",
//! "action":"PRODUCER","resource":"persistent://t/n/x","outcome":"denied","reason":"..."}`.
//!
//! Lines are written whole with one `write` on a file opened for appending, so concurrent
//! writers never interleave inside a line; fields are cut to bounded lengths first.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::AuthError;

/// Longest field kept (a resource or reason longer than this is cut).
const MAX_FIELD_BYTES: usize = 1024;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done (an admin mutation that succeeded).
    Allowed,
    /// Credentials refused.
    Unauthenticated,
    /// Authenticated, but not allowed.
    Denied,
    /// Allowed, but the operation itself failed.
    Failed,
}

/// One audited event.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// The authenticated role, if any.
    pub role: Option<&'a str>,
    /// The client's address.
    pub address: &'a str,
    /// The protocol command (`CONNECT`, `PRODUCER`, ...) or `METHOD /path`.
    pub action: &'a str,
    /// The topic, namespace, tenant or path acted on.
    pub resource: &'a str,
    pub outcome: Outcome,
    pub reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    role: Option<&'a str>,
    address: &'a str,
    action: &'a str,
    resource: &'a str,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn cut(text: &str) -> &str {
    if text.len() <= MAX_FIELD_BYTES {
        return text;
    }
    let mut end = MAX_FIELD_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The audit log file.
pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<AuditLog, AuthError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|error| AuthError::Audit(format!("{}: {error}", parent.display())))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| AuthError::Audit(format!("{}: {error}", path.display())))?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    pub fn write(&self, event: &AuditEvent<'_>) {
        let line = Line {
            time: rfc3339_now(),
            role: event.role.map(cut),
            address: cut(event.address),
            action: cut(event.action),
            resource: cut(event.resource),
            outcome: event.outcome,
            reason: event.reason.map(cut),
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = file.write_all(text.as_bytes()) {
            tracing::error!(%error, "writing the audit log failed");
        }
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn rfc3339_now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_423), (2025, 12, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn lines_are_appended_as_json() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit/audit.log");
        let log = AuditLog::open(&path).expect("open");
        let long = "x".repeat(5000);
        for resource in ["persistent://t/n/a", long.as_str()] {
            log.write(&AuditEvent {
                role: Some("alice"),
                address: "127.0.0.1:1",
                action: "PRODUCER",
                resource,
                outcome: Outcome::Denied,
                reason: Some("no produce permission"),
            });
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["outcome"], "denied");
        assert_eq!(lines[0]["role"], "alice");
        assert_eq!(
            lines[1]["resource"].as_str().map(str::len),
            Some(MAX_FIELD_BYTES)
        );
    }
}
