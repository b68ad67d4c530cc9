//! Work the shell starts and the main loop advances a little on every iteration, so the
//! shell stays responsive: periodic `tick` lines and the `dirty` memory writer.

use core::sync::atomic::Ordering::*;

use crate::bootparams::BootInfo;
use crate::{heartbeat, paging};

const NS_PER_S: u64 = 1_000_000_000;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const ALIGN_2M: u64 = 2 << 20;

/// `tick <ms>`: a line `tick <seq> <ns>` every period.
#[derive(Default)]
pub struct Ticker {
    period_ns: u64,
    next_ns: u64,
    seq: u64,
}

impl Ticker {
    /// Start ticking every `ms` milliseconds (0 = stop).
    pub fn set(&mut self, ms: u64, now: u64) {
        self.period_ns = ms.saturating_mul(1_000_000);
        self.next_ns = now.saturating_add(self.period_ns);
        self.seq = 0;
    }

    pub fn poll(&mut self, now: u64) {
        if self.period_ns == 0 || now < self.next_ns {
            return;
        }
        self.seq += 1;
        println!("tick {} {}", self.seq, now);
        heartbeat::ticks().fetch_add(1, Relaxed);
        self.next_ns += self.period_ns;
        if self.next_ns <= now {
            // We fell behind (e.g. the VM was paused): skip, do not burst.
            self.next_ns = now + self.period_ns;
        }
    }
}

/// `dirty <MiB> <MiB/s>`: write every 4 KiB page of a region, round and round, at a
/// steady rate paced by kvmclock (a token bucket). Each page write stores a fresh value
/// (a global write counter) in the page's first word and counts as 4096 dirty bytes.
#[derive(Default)]
pub struct Dirty {
    base: u64,
    size: u64,
    rate: u64,
    cursor: u64,
    tokens: u128,
    last_ns: u64,
    run_bytes: u64,
    value: u64,
}

/// Pages written per main-loop iteration at most (1 MiB), to keep the loop snappy.
const MAX_PAGES_PER_POLL: u64 = 256;

impl Dirty {
    /// First 2 MiB-aligned spot of `size` bytes in usable RAM above the kernel.
    pub fn find_region(info: &BootInfo, size: u64) -> Option<u64> {
        let floor = paging::kernel_end();
        info.usable().find_map(|e| {
            let start = e.addr.max(floor).checked_add(ALIGN_2M - 1)? & !(ALIGN_2M - 1);
            let end = start.checked_add(size)?;
            (end <= e.end() && end <= paging::mapped_end()).then_some(start)
        })
    }

    /// Start (or restart) writing `size` bytes at `base` at `rate` bytes/s.
    pub fn start(&mut self, base: u64, size: u64, rate: u64, now: u64) {
        *self = Dirty {
            base,
            size,
            rate,
            last_ns: now,
            value: self.value,
            ..Dirty::default()
        };
        heartbeat::dirty_rate().store(rate, Relaxed);
    }

    /// Stop; returns the bytes written by the run that just ended.
    pub fn stop(&mut self) -> u64 {
        let written = self.run_bytes;
        *self = Dirty {
            value: self.value,
            ..Dirty::default()
        };
        heartbeat::dirty_rate().store(0, Relaxed);
        written
    }

    /// When the next page is due: the time for the missing tokens at the set rate.
    fn next_page(&self, now: u64) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        let need = (u128::from(PAGE) * u128::from(NS_PER_S)).saturating_sub(self.tokens);
        let ns = need.div_ceil(u128::from(self.rate));
        now.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Writes the pages due by `now`; true if more were due than one call writes (behind).
    pub fn poll(&mut self, now: u64) -> bool {
        if self.rate == 0 {
            return false;
        }
        let dt = now.saturating_sub(self.last_ns);
        self.last_ns = now;
        // Tokens are in units of 1e-9 bytes, so no fraction is lost per (short) iteration.
        // At most 100 ms of backlog: after a pause the writer resumes its rate, no burst.
        let scale = u128::from(NS_PER_S);
        let cap = u128::from((self.rate / 10).max(MAX_PAGES_PER_POLL * PAGE)) * scale;
        self.tokens = (self.tokens + u128::from(self.rate) * u128::from(dt)).min(cap);
        let pages = ((self.tokens / (u128::from(PAGE) * scale)) as u64).min(MAX_PAGES_PER_POLL);
        for i in 0..pages {
            if i % 16 == 15 {
                // First touches of fresh pages cost ~10 µs each (host + shadow page faults).
                heartbeat::beat(crate::clock::now());
            }
            self.value = self.value.wrapping_add(1);
            // SAFETY: [base, base+size) is usable RAM above the kernel, inside the identity
            // map, reserved for this workload (`find_region`); cursor < size, page aligned.
            unsafe { ((self.base + self.cursor) as *mut u64).write_volatile(self.value) };
            self.cursor += PAGE;
            if self.cursor >= self.size {
                self.cursor = 0;
            }
        }
        let bytes = pages * PAGE;
        self.tokens -= u128::from(bytes) * scale;
        self.run_bytes += bytes;
        if bytes != 0 {
            heartbeat::dirty_bytes().fetch_add(bytes, Relaxed);
        }
        pages == MAX_PAGES_PER_POLL
    }
}

/// Both workloads.
#[derive(Default)]
pub struct Workloads {
    pub ticker: Ticker,
    pub dirty: Dirty,
}

impl Workloads {
    /// Advances both; true if a workload is behind and wants the CPU again at once.
    pub fn poll(&mut self, now: u64) -> bool {
        self.ticker.poll(now);
        self.dirty.poll(now)
    }

    /// When one of them next has work (kvmclock ns; `u64::MAX`: neither runs).
    pub fn next_deadline(&self, now: u64) -> u64 {
        let tick = if self.ticker.period_ns != 0 {
            self.ticker.next_ns
        } else {
            u64::MAX
        };
        tick.min(self.dirty.next_page(now))
    }
}

pub const fn mib(n: u64) -> Option<u64> {
    n.checked_mul(MIB)
}
