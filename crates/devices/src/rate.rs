//! Token buckets for per-device rate limits (bytes/s and operations/s).
//!
//! A bucket holds at most one second's worth of tokens and refills continuously. A
//! request takes what it costs; when the bucket is short, the caller learns how long to
//! wait ([`TokenBucket::take`]) and the tokens go negative, so a request larger than the
//! bucket still passes, paced to the configured rate.
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` tokens per second (`rate` > 0).
    pub fn new(rate: u64) -> Self {
        Self::starting_at(rate, Instant::now())
    }

    fn starting_at(rate: u64, now: Instant) -> Self {
        Self {
            rate: rate.max(1),
            tokens: rate.max(1) as f64,
            last: now,
        }
    }

    /// Takes `cost` tokens at `now`; returns how long the caller must wait before the
    /// operation (zero if the bucket had them).
    pub fn take_at(&mut self, cost: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        let cap = self.rate as f64;
        self.tokens = (self.tokens + elapsed * cap).min(cap);
        self.tokens -= cost as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / cap)
        }
    }

    pub fn take(&mut self, cost: u64) -> Duration {
        self.take_at(cost, Instant::now())
    }
}

/// A disk's limits: bytes/s and operations/s, either optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: Option<u64>,
    pub ops_per_sec: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_passes_then_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::starting_at(1000, t0);
        assert_eq!(b.take_at(600, t0), Duration::ZERO);
        assert_eq!(b.take_at(400, t0), Duration::ZERO);
        // Empty: 500 more tokens take half a second to come.
        assert_eq!(b.take_at(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid; another 100 cost 0.1 s.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take_at(100, t1), Duration::from_millis(100));
    }

    #[test]
    fn refill_stops_at_one_second_of_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::starting_at(100, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take_at(100, later), Duration::ZERO);
        assert!(
            b.take_at(1, later) > Duration::ZERO,
            "no credit beyond one second"
        );
    }

    #[test]
    fn over_ten_seconds_the_rate_holds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::starting_at(1 << 20, t0);
        let mut now = t0;
        for _ in 0..100 {
            now += b.take_at(256 << 10, now);
        }
        // 25 MiB at 1 MiB/s with a 1 MiB start: 24 s.
        let took = now - t0;
        assert!((took.as_secs_f64() - 24.0).abs() < 0.01, "{took:?}");
    }
}
