//! Samples: message and byte counts plus an HDR histogram of latencies, kept per span of time
//! (the current second, the warmup, the measured window) and merged across tasks.
//!
//! Sans I/O: callers pass in whether a sample falls in the measured window, so the split
//! between warmup and measurement is decided in one place (the workers) and tested here
//! without clocks.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The highest latency a histogram tells apart: one hour, in microseconds. Longer samples are
/// recorded as one hour (`saturating_record`), so nothing is lost from the counts.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Significant decimal digits kept by every histogram (0.1% relative error).
const SIGNIFICANT_DIGITS: u8 = 3;

fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy `new_with_bounds`'s preconditions (low >= 1,
    // high >= 2 * low, digits <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Samples of one direction (publish or receive) over one span of time.
#[derive(Clone)]
pub struct Window {
    /// Messages counted (each has one latency sample).
    pub messages: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
    /// Latencies in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Window {
    pub fn new() -> Window {
        Window {
            messages: 0,
            bytes: 0,
            latency_us: latency_histogram(),
        }
    }

    pub fn record(&mut self, bytes: u64, latency_us: u64) {
        self.messages += 1;
        self.bytes += bytes;
        self.latency_us.saturating_record(latency_us);
    }

    /// Adds `other`'s samples to this window.
    pub fn merge(&mut self, other: &Window) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        // Both histograms have the same bounds and every value was recorded saturating, so
        // every value of `other` is trackable here: `add` cannot fail.
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms with equal bounds add");
    }

    pub fn reset(&mut self) {
        self.messages = 0;
        self.bytes = 0;
        self.latency_us.reset();
    }

    /// The latency percentiles, or `None` without samples.
    pub fn latency(&self) -> Option<Latency> {
        if self.latency_us.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let histogram = &self.latency_us;
        Some(Latency {
            samples: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.50)),
            p95: ms(histogram.value_at_quantile(0.95)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p99_9: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        })
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// One task's samples. The interval window is emptied by the once-a-second report; the
/// warmup window is kept apart and thrown away; the measured window makes the summary.
pub struct Recorder {
    interval: Window,
    warmup: Window,
    measured: Window,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            interval: Window::new(),
            warmup: Window::new(),
            measured: Window::new(),
        }
    }

    /// Records one message; `measuring` is false during the warmup.
    pub fn record(&mut self, measuring: bool, bytes: u64, latency_us: u64) {
        self.interval.record(bytes, latency_us);
        if measuring {
            self.measured.record(bytes, latency_us);
        } else {
            self.warmup.record(bytes, latency_us);
        }
    }
}

/// A recorder shared by the tasks of one shard.
pub type SharedRecorder = Arc<Mutex<Recorder>>;

/// Locks a recorder. A panic while it was held cannot leave it half-updated in a way that
/// matters to a benchmark (at worst one sample is missing a byte count), so poison is ignored.
pub fn lock(recorder: &SharedRecorder) -> MutexGuard<'_, Recorder> {
    recorder.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The recorders of one direction, in a fixed number of shards.
///
/// Each histogram takes about 190 KB (3 digits up to one hour), and a recorder holds three,
/// so tasks share a bounded number of shards instead of owning one each: a run with a
/// thousand producers still holds a few megabytes of histograms. Tasks `i` and
/// `i + shards` share a lock, which they take once per message for a few nanoseconds.
#[derive(Clone)]
pub struct Recorders {
    shards: Arc<Vec<SharedRecorder>>,
}

impl Recorders {
    /// `shards` recorders (at least one).
    pub fn new(shards: usize) -> Recorders {
        Recorders {
            shards: Arc::new(
                (0..shards.max(1))
                    .map(|_| Arc::new(Mutex::new(Recorder::new())))
                    .collect(),
            ),
        }
    }

    /// The recorder of task number `task`.
    pub fn recorder(&self, task: usize) -> SharedRecorder {
        self.shards[task % self.shards.len()].clone()
    }

    /// Everything recorded since the previous call, merged; the interval windows are emptied.
    pub fn take_interval(&self) -> Window {
        let mut total = Window::new();
        for shard in self.shards.iter() {
            let mut recorder = lock(shard);
            total.merge(&recorder.interval);
            recorder.interval.reset();
        }
        total
    }

    /// The measured window of every shard, merged. Warmup samples are not included.
    pub fn measured(&self) -> Window {
        let mut total = Window::new();
        for shard in self.shards.iter() {
            total.merge(&lock(shard).measured);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_samples_stay_out_of_the_measured_window() {
        let recorders = Recorders::new(2);
        let first = recorders.recorder(0);
        let second = recorders.recorder(1);
        lock(&first).record(false, 100, 50_000);
        lock(&first).record(true, 100, 1_000);
        lock(&second).record(true, 100, 3_000);

        let measured = recorders.measured();
        assert_eq!(measured.messages, 2);
        assert_eq!(measured.bytes, 200);
        let latency = measured.latency().expect("samples");
        assert_eq!(latency.samples, 2);
        assert!(latency.max < 3.01, "the warmup's 50 ms leaked: {latency:?}");

        // The per-second view sees everything, once.
        assert_eq!(recorders.take_interval().messages, 3);
        assert_eq!(recorders.take_interval().messages, 0);
        assert_eq!(recorders.measured().messages, 2);
    }

    #[test]
    fn percentiles_are_ordered_and_in_milliseconds() {
        let mut window = Window::new();
        for latency_us in 1..=10_000 {
            window.record(1, latency_us);
        }
        let latency = window.latency().expect("samples");
        assert_eq!(latency.samples, 10_000);
        assert!((latency.p50 - 5.0).abs() < 0.01, "{latency:?}");
        assert!((latency.p99 - 9.9).abs() < 0.01, "{latency:?}");
        assert!(latency.p50 <= latency.p95);
        assert!(latency.p95 <= latency.p99);
        assert!(latency.p99 <= latency.p99_9);
        assert!(latency.p99_9 <= latency.max);
        assert!((latency.max - 10.0).abs() < 0.01, "{latency:?}");
    }

    #[test]
    fn latencies_beyond_an_hour_are_counted_as_an_hour() {
        let mut window = Window::new();
        window.record(1, u64::MAX);
        let latency = window.latency().expect("samples");
        assert_eq!(latency.samples, 1);
        assert!(latency.max >= 3_600_000.0 * 0.999);
    }

    #[test]
    fn an_empty_window_has_no_latency() {
        assert!(Window::new().latency().is_none());
    }

    #[test]
    fn tasks_beyond_the_shard_count_share_shards() {
        let recorders = Recorders::new(2);
        assert!(Arc::ptr_eq(&recorders.recorder(0), &recorders.recorder(2)));
        assert!(!Arc::ptr_eq(&recorders.recorder(0), &recorders.recorder(1)));
    }
}
