//! Token buckets for per-device rate limits (bytes/s and operations/s).
//!
//! A bucket holds up to one second's worth of tokens and refills continuously; a request
//! that finds too few tokens waits for [`TokenBucket::wait_for`] instead of being dropped,
//! so a limited guest sees back-pressure (its queue fills), not loss.
use std::time::{Duration, Instant};

/// One limit: `rate` tokens per second, bursts up to `rate` tokens.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens per second; `rate` 0 is refused by the callers'
    /// parsers (use no bucket for no limit).
    pub fn new(rate: u64) -> Self {
        Self {
            rate,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.rate as f64);
    }

    /// Takes `n` tokens if there are that many (a request larger than the whole bucket
    /// passes once the bucket is full, so it is never stuck).
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let need = (n as f64).min(self.rate as f64);
        if self.tokens >= need {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// How long until `n` tokens are there.
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = (n as f64).min(self.rate as f64) - self.tokens;
        if need <= 0.0 || self.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate as f64)
        }
    }
}

/// A bytes/s and a packets/s limit, either optional.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    pub bytes: Option<TokenBucket>,
    pub ops: Option<TokenBucket>,
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
        let wait_b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(len, now));
        let wait_o = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |o| o.wait_for(1, now));
        let wait = wait_b.max(wait_o);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.bytes {
            b.try_take(len, now);
        }
        if let Some(o) = &mut self.ops {
            o.try_take(1, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000);
        assert!(b.try_take(600, t0));
        assert!(!b.try_take(600, t0));
        let w = b.wait_for(600, t0);
        assert!((w.as_secs_f64() - 0.2).abs() < 1e-3, "{w:?}");
        assert!(b.try_take(600, t0 + Duration::from_millis(201)));
        // Never more than one second's worth.
        let mut b = TokenBucket::new(10);
        assert!(b.try_take(10, t0 + Duration::from_secs(100)));
        assert!(!b.try_take(1, t0 + Duration::from_secs(100)));
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_when_it_is_full() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100);
        assert!(b.try_take(1500, t0));
        // It went into debt: the next request waits for the debt to be paid back.
        assert!(b.wait_for(1, t0) > Duration::from_secs(10));
    }

    #[test]
    fn a_limiter_waits_for_the_tighter_of_its_limits() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Some(1_000_000), Some(2));
        assert!(l.take(100, t0).is_ok());
        assert!(l.take(100, t0).is_ok());
        let w = l.take(100, t0).unwrap_err();
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-3, "{w:?}");
        assert!(RateLimiter::default().take(u64::MAX, t0).is_ok());
    }
}
