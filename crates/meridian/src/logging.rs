//! The broker's log on stderr: plain text for people (colour only at a terminal), or one JSON
//! object per line for machines (`--log-format json`, or `log_format = "json"` in the
//! configuration file of `meridian standalone`).
//!
//! A JSON line holds `time` (RFC 3339, UTC), `level`, `target`, `message`, the event's fields,
//! the fields of the spans it happened in, `cluster` once `meridian standalone` knows it, and
//! `tenant` and `namespace` derived from a `topic` field (or from the `log` field the storage
//! names a topic's log with, which then also gives `topic`).

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; colour codes only when stderr is a terminal and NO_COLOR is unset.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The cluster name JSON lines carry, set once the configuration is loaded.
static CLUSTER: OnceLock<String> = OnceLock::new();

pub fn set_cluster(name: &str) {
    let _ = CLUSTER.set(name.to_string());
}

/// Installs the global subscriber. The level filter comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            // Logs go to stderr so that command output (`--output json`) stays clean on stdout.
            .with_writer(std::io::stderr)
            // Colour codes only for a person at a terminal (and not when NO_COLOR asks for
            // none), never in a log file or a pipe.
            .with_ansi(
                std::io::stderr().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty()),
            )
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(JsonLines)
            .init(),
    }
}

/// Field values as JSON: numbers and booleans as such, everything else as its text.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            Value::String(format!("{value:?}")),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_string(), Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
}

/// A span's fields, kept in its extensions for the events inside it.
struct SpanFields(Map<String, Value>);

struct JsonLines;

impl<S> Layer<S> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attributes: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        context: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attributes.record(&mut fields);
        if let Some(span) = context.span(id) {
            span.extensions_mut().insert(SpanFields(fields.0));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        context: Context<'_, S>,
    ) {
        if let Some(span) = context.span(id) {
            let mut fields = Fields::default();
            values.record(&mut fields);
            if let Some(known) = span.extensions_mut().get_mut::<SpanFields>() {
                known.0.extend(fields.0);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
        let line = json_line(event, &context);
        // One write per line, so that lines of different threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

fn json_line<S>(event: &Event<'_>, context: &Context<'_, S>) -> String
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut time = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut time));
    let metadata = event.metadata();
    let mut object = Map::new();
    object.insert("time".into(), Value::String(time));
    object.insert("level".into(), Value::String(metadata.level().to_string()));
    object.insert(
        "target".into(),
        Value::String(metadata.target().to_string()),
    );
    if let Some(cluster) = CLUSTER.get() {
        object.insert("cluster".into(), Value::String(cluster.clone()));
    }
    if let Some(scope) = context.event_scope(event) {
        for span in scope.from_root() {
            if let Some(fields) = span.extensions().get::<SpanFields>() {
                object.extend(fields.0.clone());
            }
        }
    }
    let mut fields = Fields::default();
    event.record(&mut fields);
    object.extend(fields.0);
    // The storage names a log by its topic (field `log`): such lines carry the topic too, so
    // that a shipper filtering on `topic` also finds the storage's lines about it.
    let named = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_str)
            .and_then(|name| meridian_broker::TopicName::parse(name).ok())
    };
    let topic = named("topic").or_else(|| named("log"));
    if let Some(topic) = topic {
        object
            .entry("topic")
            .or_insert_with(|| Value::String(topic.to_string()));
        object
            .entry("tenant")
            .or_insert_with(|| Value::String(topic.tenant.clone()));
        object
            .entry("namespace")
            .or_insert_with(|| Value::String(topic.namespace_name()));
    }
    let mut line = Value::Object(object).to_string();
    line.push('\n');
    line
}
