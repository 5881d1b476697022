//! What `meridian perf` prints: one line per second while it runs, and a summary at the end,
//! as text or as one JSON object. Formatting only; the numbers come from [`super::stats`].

use std::fmt::Write;

use serde::Serialize;

use super::broker_cpu::BrokerSample;
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

/// What the broker process did during the measured window: CPU time, and what costs it
/// (context switches, read/write system calls, minor page faults), in all and per message.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerCpu {
    pub pid: u32,
    pub seconds: f64,
    /// Per message of the measured window (sent for produce and end-to-end, received for
    /// consume); `None` without messages.
    pub us_per_message: Option<f64>,
    /// Time on a CPU by the threads' `schedstat`, in nanoseconds where `seconds` counts 10 ms
    /// ticks; without the threads that ended within the window (`threads_ended`).
    pub running_seconds: f64,
    pub running_us_per_message: Option<f64>,
    pub threads_ended: usize,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    /// `syscr` + `syscw` of `/proc/PID/io` (the read and write families of system calls:
    /// `recvfrom`, `fdatasync`, `futex` and `epoll_wait` are not among them); `None` if that
    /// file could not be read.
    pub read_write_syscalls: Option<u64>,
    pub minor_faults: u64,
    /// The four counts above divided by the messages; `None` without messages.
    pub per_message: Option<BrokerCountsPerMessage>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BrokerCountsPerMessage {
    pub voluntary_switches: f64,
    pub involuntary_switches: f64,
    pub read_write_syscalls: Option<f64>,
    pub minor_faults: f64,
}

impl BrokerCpu {
    /// The difference of two samples of process `pid` taken around a window of `messages`.
    pub fn between(pid: u32, before: &BrokerSample, after: &BrokerSample, messages: u64) -> Self {
        let syscalls = |sample: &BrokerSample| Some(sample.read_syscalls? + sample.write_syscalls?);
        let seconds = (after.cpu_seconds - before.cpu_seconds).max(0.0);
        let voluntary_switches = after
            .voluntary_switches
            .saturating_sub(before.voluntary_switches);
        let involuntary_switches = after
            .involuntary_switches
            .saturating_sub(before.involuntary_switches);
        let read_write_syscalls = syscalls(after)
            .zip(syscalls(before))
            .map(|(after, before)| after.saturating_sub(before));
        let minor_faults = after.minor_faults.saturating_sub(before.minor_faults);
        let running_seconds = (after.running_seconds - before.running_seconds).max(0.0);
        let threads_ended = before
            .threads
            .iter()
            .filter(|thread| !after.threads.contains(thread))
            .count();
        let per = |count: u64| count as f64 / messages as f64;
        let us_per_message = |seconds: f64| (messages > 0).then(|| seconds * 1e6 / messages as f64);
        BrokerCpu {
            pid,
            seconds,
            us_per_message: us_per_message(seconds),
            running_seconds,
            running_us_per_message: us_per_message(running_seconds),
            threads_ended,
            voluntary_switches,
            involuntary_switches,
            read_write_syscalls,
            minor_faults,
            per_message: (messages > 0).then(|| BrokerCountsPerMessage {
                voluntary_switches: per(voluntary_switches),
                involuntary_switches: per(involuntary_switches),
                read_write_syscalls: read_write_syscalls.map(per),
                minor_faults: per(minor_faults),
            }),
        }
    }
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
            let _ = write!(out, "; on a CPU {:.3} s", cpu.running_seconds);
            if let Some(per_message) = cpu.running_us_per_message {
                let _ = write!(out, ", {per_message:.3} µs per message");
            }
            match cpu.threads_ended {
                0 => {}
                1 => out.push_str(" (without 1 thread that ended meanwhile)"),
                ended => {
                    let _ = write!(out, " (without {ended} threads that ended meanwhile)");
                }
            }
            out.push('\n');
            let syscalls = cpu
                .read_write_syscalls
                .map_or("unreadable".to_string(), |count| count.to_string());
            let _ = write!(
                out,
                "broker ops   {} voluntary + {} involuntary context switches, {syscalls} read/write \
                 syscalls, {} minor faults",
                cpu.voluntary_switches, cpu.involuntary_switches, cpu.minor_faults
            );
            if let Some(per) = &cpu.per_message {
                let syscalls = per
                    .read_write_syscalls
                    .map_or("-".to_string(), |count| format!("{count:.3}"));
                let _ = write!(
                    out,
                    "; per message {:.3} + {:.3}, {syscalls}, {:.3}",
                    per.voluntary_switches, per.involuntary_switches, per.minor_faults
                );
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

    /// A produce run's summary: `sent` messages, one of them measured (100 bytes, 1.5 ms).
    fn produce_summary(sent: u64, broker_cpu: Option<BrokerCpu>) -> Summary<serde_json::Value> {
        let mut window = Window::new();
        window.record(100, 1_500);
        Summary {
            mode: "produce",
            config: serde_json::json!({ "size": 100 }),
            interrupted: false,
            warmup_s: 0.0,
            sent: Some(sent),
            send_errors: Some(0),
            received: None,
            received_other: None,
            publish: Some(Throughput::new(&window, 0.5)),
            receive: None,
            publish_latency_ms: window.latency(),
            end_to_end_latency_ms: None,
            broker_cpu,
        }
    }

    #[test]
    fn the_summary_serializes_absent_directions_as_null() {
        let summary = produce_summary(1, None);
        let json = serde_json::to_value(&summary).expect("serializes");
        assert_eq!(json["sent"], 1);
        assert_eq!(json["publish"]["msg_per_s"], 2.0);
        assert!(json["received"].is_null());
        assert!(json["publish_latency_ms"]["p99_9"].as_f64().is_some());
        let text = summary.text("meridian perf produce");
        assert!(text.contains("  publish "), "{text}");
        assert!(!text.contains("end-to-end"), "{text}");
    }

    #[test]
    fn the_broker_counters_are_reported_per_message() {
        let before = BrokerSample {
            cpu_seconds: 1.0,
            running_seconds: 0.75,
            threads: vec![10, 11, 12],
            minor_faults: 100,
            voluntary_switches: 1_000,
            involuntary_switches: 10,
            read_syscalls: Some(50),
            write_syscalls: Some(70),
        };
        let after = BrokerSample {
            cpu_seconds: 1.5,
            running_seconds: 1.1875,
            threads: vec![10, 12, 13],
            minor_faults: 300,
            voluntary_switches: 5_000,
            involuntary_switches: 410,
            read_syscalls: Some(250),
            write_syscalls: Some(1_870),
        };
        let cpu = BrokerCpu::between(7, &before, &after, 1_000);
        let json = serde_json::to_value(&cpu).expect("serializes");
        assert_eq!(json["us_per_message"], 500.0);
        assert_eq!(json["running_us_per_message"], 437.5);
        assert_eq!(json["threads_ended"], 1);
        assert_eq!(json["read_write_syscalls"], 2_000);
        assert_eq!(json["per_message"]["voluntary_switches"], 4.0);
        assert_eq!(json["per_message"]["involuntary_switches"], 0.4);
        assert_eq!(json["per_message"]["read_write_syscalls"], 2.0);
        assert_eq!(json["per_message"]["minor_faults"], 0.2);
        let summary = produce_summary(1_000, Some(cpu));
        let text = summary.text("meridian perf produce");
        assert!(
            text.contains("4000 voluntary + 400 involuntary context switches, 2000 read/write syscalls, 200 minor faults; per message 4.000 + 0.400, 2.000, 0.200"),
            "{text}"
        );
        assert!(
            text.contains(
                "on a CPU 0.438 s, 437.500 µs per message (without 1 thread that ended meanwhile)"
            ),
            "{text}"
        );
        // Without /proc/PID/io (no right to trace the broker) the rest is still reported.
        let unreadable = BrokerSample {
            read_syscalls: None,
            write_syscalls: None,
            ..after
        };
        let cpu = BrokerCpu::between(7, &before, &unreadable, 0);
        assert_eq!(cpu.read_write_syscalls, None);
        assert!(cpu.per_message.is_none());
    }
}
