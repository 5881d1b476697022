//! Pacing producers to a rate with a token bucket.
//!
//! Sleeping `1 / rate` after every message drifts (every sleep overshoots by up to a timer
//! tick, about a millisecond in tokio) and cannot reach rates above the timer's resolution.
//! A token bucket instead accrues `rate` tokens per second of real time: a sender takes one
//! token per message and sleeps only when the bucket is in debt, for exactly as long as the
//! debt takes to repay. Oversleeping is made good by the tokens that accrued meanwhile, so
//! the long-run rate is exact; the bucket holds at most `burst` tokens, so a sender that was
//! held up (back-pressure, a slow broker) catches up by at most that many messages at once.
//!
//! Sans I/O: the caller passes the time in and does the sleeping.

use std::time::{Duration, Instant};

/// Burst capacity, as a share of a second's tokens: 50 ms worth. Enough to absorb a
/// timer's oversleep at any rate; small enough that a stalled sender does not flood the
/// broker when it resumes.
const BURST_SECONDS: f64 = 0.05;

/// A token bucket of `rate` tokens per second.
#[derive(Debug)]
pub struct TokenBucket {
    rate_per_second: f64,
    burst: f64,
    /// May be negative: a debt reserved by senders that are sleeping it off.
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A bucket holding one token at `now`: the first message goes at once, and the rate
    /// holds from the first second on (a full bucket would start with a burst).
    /// `rate_per_second` must be positive.
    pub fn new(rate_per_second: f64, now: Instant) -> TokenBucket {
        assert!(
            rate_per_second > 0.0 && rate_per_second.is_finite(),
            "a token bucket needs a positive rate, got {rate_per_second}"
        );
        let burst = (rate_per_second * BURST_SECONDS).max(1.0);
        TokenBucket {
            rate_per_second,
            burst,
            tokens: 1.0,
            refilled_at: now,
        }
    }

    /// Takes one token and returns how long to wait before using it (zero when one was
    /// available). The token is the caller's either way: call again only after waiting.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.refilled_at = now.max(self.refilled_at);
        self.tokens = (self.tokens + elapsed * self.rate_per_second).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate_per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a bucket with a simulated clock: the sender sleeps each returned wait, plus
    /// `oversleep` (a timer's inaccuracy), and counts messages sent in `horizon`.
    fn simulate(rate: f64, oversleep: Duration, horizon: Duration) -> u64 {
        let start = Instant::now();
        let mut now = start;
        let mut bucket = TokenBucket::new(rate, now);
        let mut sent = 0;
        loop {
            let wait = bucket.reserve(now);
            if !wait.is_zero() {
                now += wait + oversleep;
            }
            if now.duration_since(start) >= horizon {
                return sent;
            }
            sent += 1;
        }
    }

    #[test]
    fn paces_to_the_rate() {
        let sent = simulate(1000.0, Duration::ZERO, Duration::from_secs(10));
        // 10 s at 1000/s, plus the first token.
        assert!((10_000..=10_001).contains(&sent), "sent {sent}");
    }

    #[test]
    fn oversleeping_does_not_lower_the_rate() {
        // A millisecond of oversleep on every wait would cut a per-message sleeper at
        // 100,000 msg/s to under 1,000 msg/s.
        let sent = simulate(100_000.0, Duration::from_millis(1), Duration::from_secs(2));
        assert!(
            (199_000..=200_001).contains(&sent),
            "sent {sent} in 2 s at 100,000/s"
        );
    }

    #[test]
    fn low_rates_wait_between_messages() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, start);
        assert_eq!(bucket.reserve(start), Duration::ZERO, "the first token");
        let wait = bucket.reserve(start);
        assert_eq!(wait, Duration::from_millis(500));
        // After waiting, the next reservation is another half second away.
        let wait = bucket.reserve(start + wait);
        assert_eq!(wait, Duration::from_millis(500));
    }

    #[test]
    fn a_stalled_sender_catches_up_by_at_most_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000.0, start);
        let later = start + Duration::from_secs(60);
        let immediate = (0..1000)
            .take_while(|_| bucket.reserve(later).is_zero())
            .count();
        assert_eq!(immediate, 50);
    }
}
