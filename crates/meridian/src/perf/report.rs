//! What `meridian perf` prints: one line per second while it runs, and a summary at the end,
//! as text or as one JSON object. Formatting only; the numbers come from [`super::stats`].

use std::fmt::Write;

use serde::Serialize;

use super::stats::{Latency, Window};

/// Bytes in the MB of "MB/s" (decimal, as network and disk figures are quoted).
const BYTES_PER_MB: f64 = 1_000_000.0;

/// One second's report.
pub struct Tick<'a> {
    /// Since the run started (warmup included).
    pub elapsed_s: f64,
    /// The length of the interval the windows cover.
    pub interval_s: f64,
    pub warmup: bool,
    pub publish: Option<&'a Window>,
    pub receive: Option<&'a Window>,
    /// Messages sent (less failed sends) and not yet received (end-to-end only).
    pub backlog: Option<u64>,
}

fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// `p50 1.23 p99 4.56 ms`, or dashes without samples.
fn percentiles(window: &Window) -> String {
    match window.latency() {
        Some(latency) => format!("p50 {:.2} p99 {:.2} ms", latency.p50, latency.p99),
        None => "p50 - p99 - ms".to_string(),
    }
}

/// The once-a-second line.
pub fn tick_line(tick: &Tick<'_>) -> String {
    let mut line = format!("{:7.1} s", tick.elapsed_s);
    if let Some(window) = tick.publish {
        let _ = write!(
            line,
            " | sent {:>9} msg/s {:8.2} MB/s  publish {}",
            grouped(rate(window.messages, tick.interval_s).round() as u64),
            rate(window.bytes, tick.interval_s) / BYTES_PER_MB,
            percentiles(window)
        );
    }
    if let Some(window) = tick.receive {
        let _ = write!(
            line,
            " | received {:>9} msg/s {:8.2} MB/s  end-to-end {}",
            grouped(rate(window.messages, tick.interval_s).round() as u64),
            rate(window.bytes, tick.interval_s) / BYTES_PER_MB,
            percentiles(window)
        );
    }
    if let Some(backlog) = tick.backlog {
        let _ = write!(line, " | backlog {}", grouped(backlog));
    }
    if tick.warmup {
        line.push_str(" (warmup)");
    }
    line
}

/// A number with thousands separators: 1234567 → "1,234,567".
pub fn grouped(number: u64) -> String {
    let digits = number.to_string();
    let mut groups: Vec<&str> = Vec::new();
    let mut end = digits.len();
    while end > 3 {
        groups.push(&digits[end - 3..end]);
        end -= 3;
    }
    groups.push(&digits[..end]);
    groups.reverse();
    groups.join(",")
}

/// Messages and bytes of one direction over the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Messages counted in the measured window (warmup excluded).
    pub messages: u64,
    pub bytes: u64,
    /// Length of the measured window for this direction.
    pub seconds: f64,
    pub msg_per_s: f64,
    pub mb_per_s: f64,
}

impl Throughput {
    pub fn new(window: &Window, seconds: f64) -> Throughput {
        Throughput {
            messages: window.messages,
            bytes: window.bytes,
            seconds,
            msg_per_s: rate(window.messages, seconds),
            mb_per_s: rate(window.bytes, seconds) / BYTES_PER_MB,
        }
    }
}

/// CPU time the broker process spent during the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerCpu {
    pub pid: u32,
    pub seconds: f64,
    /// Per message of the measured window (sent for produce and end-to-end, received for
    /// consume); `None` without messages.
    pub us_per_message: Option<f64>,
}

/// The end-of-run report. Fields that a mode does not measure are `null` in JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Summary<C: Serialize> {
    pub mode: &'static str,
    /// The run's settings, as given or defaulted.
    pub config: C,
    /// Ended by Ctrl-C before its duration or message count.
    pub interrupted: bool,
    pub warmup_s: f64,
    /// Messages the broker acknowledged, warmup included.
    pub sent: Option<u64>,
    /// Messages whose send failed (timeouts, broker errors).
    pub send_errors: Option<u64>,
    /// Messages of this run received, warmup included (consume: every message received).
    pub received: Option<u64>,
    /// End-to-end only: messages of earlier runs found in the subscription's backlog;
    /// acknowledged, not counted in `received` or in the latencies.
    pub received_other: Option<u64>,
    pub publish: Option<Throughput>,
    pub receive: Option<Throughput>,
    /// From the send call to the broker's receipt.
    pub publish_latency_ms: Option<Latency>,
    /// From the send call (end-to-end) or the publish time (consume) to reception.
    pub end_to_end_latency_ms: Option<Latency>,
    pub broker_cpu: Option<BrokerCpu>,
}

impl<C: Serialize> Summary<C> {
    /// The summary as text, a few lines.
    pub fn text(&self, heading: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{heading}");
        let _ = writeln!(
            out,
            "measured window after a {} s warmup{}",
            self.warmup_s,
            if self.interrupted {
                " (interrupted by Ctrl-C)"
            } else {
                ""
            }
        );
        if let Some(sent) = self.sent {
            let _ = write!(out, "sent      {:>12} messages", grouped(sent));
            if let Some(throughput) = &self.publish {
                let _ = write!(out, "  {}", throughput_text(throughput));
            }
            let _ = writeln!(
                out,
                "  {} send errors",
                grouped(self.send_errors.unwrap_or(0))
            );
        }
        if let Some(received) = self.received {
            let _ = write!(out, "received  {:>12} messages", grouped(received));
            if let Some(throughput) = &self.receive {
                let _ = write!(out, "  {}", throughput_text(throughput));
            }
            if let Some(other) = self.received_other.filter(|other| *other > 0) {
                let _ = write!(out, "  (+{} from earlier runs)", grouped(other));
            }
            if let (Some(sent), Some(_)) = (self.sent, self.received_other) {
                if sent > received {
                    let _ = write!(out, "  {} missing", grouped(sent - received));
                }
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "latency ms   {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "samples", "mean", "p50", "p95", "p99", "p99.9", "max"
        );
        for (name, latency) in [
            ("publish", &self.publish_latency_ms),
            ("end-to-end", &self.end_to_end_latency_ms),
        ] {
            match latency {
                Some(latency) => {
                    let _ = writeln!(
                        out,
                        "  {name:<10} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                        grouped(latency.samples),
                        latency.mean,
                        latency.p50,
                        latency.p95,
                        latency.p99,
                        latency.p99_9,
                        latency.max
                    );
                }
                None if self.mode_measures(name) => {
                    let _ = writeln!(out, "  {name:<10} {:>10}", "no samples");
                }
                None => {}
            }
        }
        if let Some(cpu) = &self.broker_cpu {
            let _ = write!(
                out,
                "broker CPU   {:.2} s in the measured window (pid {})",
                cpu.seconds, cpu.pid
            );
            if let Some(per_message) = cpu.us_per_message {
                let _ = write!(out, ", {per_message:.2} µs per message");
            }
            out.push('\n');
        }
        out
    }

    fn mode_measures(&self, latency: &str) -> bool {
        match latency {
            "publish" => self.sent.is_some(),
            _ => self.received.is_some(),
        }
    }
}

fn throughput_text(throughput: &Throughput) -> String {
    format!(
        "measured {} in {:.2} s: {} msg/s, {:.2} MB/s",
        grouped(throughput.messages),
        throughput.seconds,
        grouped(throughput.msg_per_s.round() as u64),
        throughput.mb_per_s
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }

    #[test]
    fn a_tick_shows_rates_percentiles_and_backlog() {
        let mut publish = Window::new();
        for _ in 0..2000 {
            publish.record(1000, 2_000);
        }
        let receive = Window::new();
        let line = tick_line(&Tick {
            elapsed_s: 3.0,
            interval_s: 2.0,
            warmup: true,
            publish: Some(&publish),
            receive: Some(&receive),
            backlog: Some(7),
        });
        assert!(line.contains("sent     1,000 msg/s"), "{line}");
        assert!(line.contains("1.00 MB/s"), "{line}");
        assert!(line.contains("publish p50 2.00 p99 2.00 ms"), "{line}");
        assert!(line.contains("end-to-end p50 - p99 - ms"), "{line}");
        assert!(line.contains("backlog 7"), "{line}");
        assert!(line.ends_with("(warmup)"), "{line}");
    }

    #[test]
    fn the_summary_serializes_absent_directions_as_null() {
        let mut window = Window::new();
        window.record(100, 1_500);
        let summary = Summary {
            mode: "produce",
            config: serde_json::json!({ "size": 100 }),
            interrupted: false,
            warmup_s: 0.0,
            sent: Some(1),
            send_errors: Some(0),
            received: None,
            received_other: None,
            publish: Some(Throughput::new(&window, 0.5)),
            receive: None,
            publish_latency_ms: window.latency(),
            end_to_end_latency_ms: None,
            broker_cpu: None,
        };
        let json = serde_json::to_value(&summary).expect("serializes");
        assert_eq!(json["sent"], 1);
        assert_eq!(json["publish"]["msg_per_s"], 2.0);
        assert!(json["received"].is_null());
        assert!(json["publish_latency_ms"]["p99_9"].as_f64().is_some());
        let text = summary.text("meridian perf produce");
        assert!(text.contains("  publish "), "{text}");
        assert!(!text.contains("end-to-end"), "{text}");
    }
}
