//! Per-address admission limits: `limits.handshakes_per_ip_per_sec` (a token bucket
//! per address) and `limits.max_connections_per_ip` (a count per address, held by
//! an [`IpSlot`] that lives as long as the connection). Both are off at 0.
//!
//! Memory: a count entry exists only while the address holds a connection; bucket
//! entries are pruned once full again when the table grows past [`PRUNE_AT`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tether_protocol::Refusal;
use tokio::time::Instant;

/// Bucket-table size past which refilled buckets are pruned.
pub const PRUNE_AT: usize = 4096;

/// Cheap clone handle on the per-address tables.
#[derive(Clone, Debug)]
pub struct IpLimits {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `max_connections_per_ip`, 0 = off.
    max_per_ip: u32,
    /// `handshakes_per_ip_per_sec`, 0 = off.
    rate: u32,
    /// Open (and reserved) connections per address.
    counts: Mutex<HashMap<IpAddr, u32>>,
    /// Handshake token buckets per address.
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One connection's hold on its address's count; dropping it releases the count.
#[derive(Debug)]
pub struct IpSlot {
    owner: Option<(Arc<Inner>, IpAddr)>,
}

impl IpLimits {
    /// Limits with the given settings (0 = off).
    pub fn new(max_per_ip: u32, handshakes_per_sec: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_per_ip,
                rate: handshakes_per_sec,
                counts: Mutex::new(HashMap::new()),
                buckets: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Counts one handshake from `ip` against its rate.
    pub fn check_rate(&self, ip: IpAddr) -> Result<(), Refusal> {
        let rate = self.inner.rate;
        if rate == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let cap = f64::from(rate);
        let mut buckets = self.inner.buckets.lock();
        if buckets.len() >= PRUNE_AT {
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * cap < cap);
        }
        let b = buckets.entry(ip).or_insert(Bucket {
            tokens: cap,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * cap).min(cap);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Refusal::RateLimited)
        }
    }

    /// Takes one connection slot for `ip`, or refuses with `ip_limit`.
    pub fn acquire(&self, ip: IpAddr) -> Result<IpSlot, Refusal> {
        if self.inner.max_per_ip == 0 {
            return Ok(IpSlot { owner: None });
        }
        let mut counts = self.inner.counts.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.inner.max_per_ip {
            if *n == 0 {
                counts.remove(&ip);
            }
            return Err(Refusal::IpLimit);
        }
        *n += 1;
        Ok(IpSlot {
            owner: Some((self.inner.clone(), ip)),
        })
    }

    /// Addresses currently holding a slot (for tests and stats).
    pub fn tracked_addresses(&self) -> usize {
        self.inner.counts.lock().len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((inner, ip)) = self.owner.take() {
            let mut counts = inner.counts.lock();
            if let Some(n) = counts.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_refills_over_time() {
        let l = IpLimits::new(0, 2);
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert!(l.check_rate(ip).is_ok());
        assert!(l.check_rate(ip).is_ok());
        assert_eq!(l.check_rate(ip), Err(Refusal::RateLimited));
        tokio::time::advance(std::time::Duration::from_millis(600)).await;
        assert!(l.check_rate(ip).is_ok());
        assert_eq!(l.check_rate(ip), Err(Refusal::RateLimited));
    }

    #[test]
    fn slots_are_released_on_drop() {
        let l = IpLimits::new(2, 0);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = l.acquire(ip);
        let b = l.acquire(ip);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(l.acquire(ip).err(), Some(Refusal::IpLimit));
        drop(a);
        let c = l.acquire(ip);
        assert!(c.is_ok());
        drop((b, c));
        assert_eq!(l.tracked_addresses(), 0);
    }
}
