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

    /// How long from `now` until the bucket is out of debt (zero if it is not in debt).
    pub fn debt_at(&mut self, now: Instant) -> Duration {
        self.take_at(0, now)
    }
}

/// A bytes/s and an operations/s bucket, either optional, for a device that holds a
/// request back rather than sleeping on it (a NIC): a request passes when neither bucket
/// is in debt and then takes its cost from both, so one larger than a bucket still passes,
/// paced to the rate.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(bytes_per_s: Option<u64>, ops_per_s: Option<u64>) -> Self {
        Self {
            bytes: bytes_per_s.map(TokenBucket::new),
            ops: ops_per_s.map(TokenBucket::new),
        }
    }

    /// Takes one operation of `len` bytes, or says how long to wait before asking again.
    pub fn take(&mut self, len: u64, now: Instant) -> Result<(), Duration> {
        let wait = [&mut self.bytes, &mut self.ops]
            .into_iter()
            .flatten()
            .map(|b| b.debt_at(now))
            .max()
            .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.bytes {
            b.take_at(len, now);
        }
        if let Some(o) = &mut self.ops {
            o.take_at(1, now);
        }
        Ok(())
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
    fn a_limiter_holds_back_for_the_tighter_of_its_limits() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Some(1_000_000), Some(2));
        assert!(l.take(100, t0).is_ok());
        assert!(l.take(100, t0).is_ok());
        // The ops bucket (2/s) is empty but not in debt: a third operation passes and puts
        // it half a second into debt, which the fourth waits out.
        assert!(l.take(100, t0).is_ok());
        let w = l.take(100, t0).unwrap_err();
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-3, "{w:?}");
        assert!(l.take(100, t0 + Duration::from_millis(501)).is_ok());
        // A request larger than the byte bucket passes once, then waits out its debt.
        let mut big = RateLimiter::new(Some(100), None);
        assert!(big.take(1500, t0).is_ok());
        assert!(big.take(1, t0).unwrap_err() > Duration::from_secs(13));
        assert!(RateLimiter::default().take(u64::MAX, t0).is_ok());
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
