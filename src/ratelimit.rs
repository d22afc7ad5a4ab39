//! Per-address volume limits (the pairing port; later the agent's
//! untrusted traffic).
//!
//! The caller decides what counts: the pairing listener counts failed
//! attempts only, so that provisioning many agents from behind one NAT
//! address is not mistaken for an attack. More than `count` events from one
//! address within `window` blocks
//! that address for `block`. Memory is bounded: entries whose window and
//! block have both passed are dropped on every check, and the table never
//! holds more than [`MAX_TRACKED`] addresses (the oldest go first).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most addresses tracked at once.
pub const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    count: u32,
    blocked_until: Option<Instant>,
}

/// A volume limiter.
#[derive(Debug)]
pub struct RateLimit {
    count: u32,
    window: Duration,
    block: Duration,
    seen: HashMap<IpAddr, Entry>,
}

/// The verdict on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it in.
    Allow,
    /// This connection crossed the limit: the address is now blocked.
    BlockStarts,
    /// The address is blocked.
    Blocked,
}

impl RateLimit {
    /// `count` connections per `window`, then blocked for `block`.
    pub fn new(count: u32, window: Duration, block: Duration) -> RateLimit {
        RateLimit { count, window, block, seen: HashMap::new() }
    }

    /// Is `ip` blocked at `now`? (Counts nothing.)
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.seen.get(&ip).and_then(|e| e.blocked_until).is_some_and(|b| b > now)
    }

    /// Count a connection (or a failure) from `ip` at `now`.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let (window, block) = (self.window, self.block);
        self.seen
            .retain(|_, e| now.duration_since(e.window_start) < window || e.blocked_until.is_some_and(|b| b > now));
        if self.seen.len() >= MAX_TRACKED
            && !self.seen.contains_key(&ip)
            && let Some(oldest) = self.seen.iter().min_by_key(|(_, e)| e.window_start).map(|(k, _)| *k)
        {
            self.seen.remove(&oldest);
        }
        let e = self.seen.entry(ip).or_insert(Entry { window_start: now, count: 0, blocked_until: None });
        if let Some(until) = e.blocked_until {
            if until > now {
                return Verdict::Blocked;
            }
            *e = Entry { window_start: now, count: 0, blocked_until: None };
        }
        if now.duration_since(e.window_start) >= window {
            *e = Entry { window_start: now, count: 0, blocked_until: None };
        }
        e.count += 1;
        if e.count > self.count {
            e.blocked_until = Some(now + block);
            return Verdict::BlockStarts;
        }
        Verdict::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_volume_and_releases_after_the_block() {
        let mut r = RateLimit::new(3, Duration::from_secs(60), Duration::from_secs(300));
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 0..3 {
            assert_eq!(r.check(a, t0 + Duration::from_secs(i)), Verdict::Allow);
        }
        assert_eq!(r.check(a, t0 + Duration::from_secs(4)), Verdict::BlockStarts);
        assert_eq!(r.check(a, t0 + Duration::from_secs(100)), Verdict::Blocked);
        assert_eq!(r.check(b, t0 + Duration::from_secs(100)), Verdict::Allow, "other addresses are not affected");
        assert_eq!(r.check(a, t0 + Duration::from_secs(305)), Verdict::Allow);
    }

    #[test]
    fn a_new_window_starts_the_count_again() {
        let mut r = RateLimit::new(2, Duration::from_secs(10), Duration::from_secs(30));
        let t0 = Instant::now();
        let a: IpAddr = "::1".parse().unwrap();
        assert_eq!(r.check(a, t0), Verdict::Allow);
        assert_eq!(r.check(a, t0), Verdict::Allow);
        assert_eq!(r.check(a, t0 + Duration::from_secs(11)), Verdict::Allow);
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut r = RateLimit::new(1, Duration::from_secs(60), Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            r.check(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(r.seen.len() <= MAX_TRACKED);
    }
}
