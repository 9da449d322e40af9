//! Every timer of one connection in one value: the next ping, the answer each leg
//! owes to it, the lifetime, the token's expiry and an upstream's idle limit. The
//! driver sleeps until [`Deadlines::next`] and asks [`Deadlines::due`] what came due;
//! nothing here touches a socket, so it is tested with plain instants.

use std::time::Duration;

use tokio::time::Instant;

use super::Leg;

/// What came due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// Send a ping (or an SSE heartbeat) now.
    Ping,
    /// A leg did not answer a ping within the heartbeat timeout.
    Silent(Leg),
    /// The upstream sent nothing for the route's idle limit.
    UpstreamIdle,
    /// `limits.max_connection_lifetime_ms` reached.
    Lifetime,
    /// The token (plus leeway) ran out.
    TokenExpired,
}

/// A connection's deadlines.
#[derive(Debug)]
pub(crate) struct Deadlines {
    /// `heartbeat.interval_ms`.
    interval: Duration,
    /// `heartbeat.timeout_ms`.
    timeout: Duration,
    /// Which legs answer pings: `[client, upstream]` (an SSE client cannot).
    answers: [bool; 2],
    /// When the next ping goes out.
    next_ping: Instant,
    /// When each leg's answer to the last ping is due, if one is owed.
    owed: [Option<Instant>; 2],
    /// Lifetime end (jittered), if limited.
    lifetime_at: Option<Instant>,
    /// Token expiry plus leeway, if the connection has a token.
    expires_at: Option<Instant>,
    /// An upstream's idle limit and when it runs out.
    idle: Option<(Duration, Instant)>,
}

impl Deadlines {
    /// Deadlines starting `now`. `lifetime` is already jittered.
    pub(crate) fn new(
        now: Instant,
        interval: Duration,
        timeout: Duration,
        answers: [bool; 2],
        lifetime: Option<Duration>,
    ) -> Self {
        Self {
            interval,
            timeout,
            answers,
            next_ping: now + interval,
            owed: [None; 2],
            lifetime_at: lifetime.map(|l| now + l),
            expires_at: None,
            idle: None,
        }
    }

    /// Sets (or, after a `refresh`, moves) the token's expiry.
    pub(crate) fn expire_at(&mut self, at: Option<Instant>) {
        self.expires_at = at;
    }

    /// Closes the upstream when it is silent for `idle` (from `now`).
    pub(crate) fn upstream_idle(&mut self, now: Instant, idle: Option<Duration>) {
        self.idle = idle.map(|d| (d, now + d));
    }

    /// The earliest deadline: when the driver's timer must wake.
    pub(crate) fn next(&self) -> Instant {
        [
            Some(self.next_ping),
            self.owed[0],
            self.owed[1],
            self.lifetime_at,
            self.expires_at,
            self.idle.map(|(_, at)| at),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.next_ping)
    }

    /// What is due at `now`, most serious first; a `Ping` arms the answers owed.
    pub(crate) fn due(&mut self, now: Instant) -> Option<Due> {
        let past = |at: Option<Instant>| at.is_some_and(|at| now >= at);
        let found = if past(self.owed[0]) {
            Due::Silent(Leg::Client)
        } else if past(self.owed[1]) {
            Due::Silent(Leg::Upstream)
        } else if past(self.idle.map(|(_, at)| at)) {
            Due::UpstreamIdle
        } else if past(self.lifetime_at) {
            Due::Lifetime
        } else if past(self.expires_at) {
            Due::TokenExpired
        } else if now >= self.next_ping {
            self.next_ping = now + self.interval;
            for (owed, answers) in self.owed.iter_mut().zip(self.answers) {
                if answers && owed.is_none() {
                    *owed = Some(now + self.timeout);
                }
            }
            Due::Ping
        } else {
            return None;
        };
        Some(found)
    }

    /// A leg was heard from: it owes nothing now (an upstream's idle limit restarts).
    pub(crate) fn heard(&mut self, leg: Leg, now: Instant) {
        self.owed[leg as usize] = None;
        if leg == Leg::Upstream {
            if let Some((d, at)) = &mut self.idle {
                *at = now + *d;
            }
        }
    }

    /// The relay waited `by` on one leg: heartbeats pause meanwhile (SPEC section 9).
    pub(crate) fn pause(&mut self, by: Duration) {
        for at in self.owed.iter_mut().flatten() {
            *at += by;
        }
    }
}

/// `limits.max_inbound_per_sec`: frames counted in one-second windows.
#[derive(Debug)]
pub(crate) struct InboundRate {
    max: u64,
    window: Instant,
    count: u64,
}

impl InboundRate {
    pub(crate) fn new(now: Instant, max: u64) -> Self {
        Self {
            max,
            window: now,
            count: 0,
        }
    }

    /// Counts one frame; `true` when it is one too many for its window.
    pub(crate) fn over(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            (self.window, self.count) = (now, 0);
        }
        self.count += 1;
        self.count > self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ws(now: Instant) -> Deadlines {
        Deadlines::new(now, 10 * S, 3 * S, [true, false], None)
    }

    #[test]
    fn a_ping_arms_the_answer_and_silence_is_due_after_the_timeout() {
        let t0 = Instant::now();
        let mut d = ws(t0);
        assert_eq!(d.next(), t0 + 10 * S);
        assert_eq!(d.due(t0 + 9 * S), None);
        assert_eq!(d.due(t0 + 10 * S), Some(Due::Ping));
        assert_eq!(
            d.next(),
            t0 + 13 * S,
            "the answer is owed before the next ping"
        );
        assert_eq!(d.due(t0 + 12 * S), None);
        assert_eq!(d.due(t0 + 13 * S), Some(Due::Silent(Leg::Client)));
    }

    #[test]
    fn being_heard_clears_what_was_owed() {
        let t0 = Instant::now();
        let mut d = ws(t0);
        assert_eq!(d.due(t0 + 10 * S), Some(Due::Ping));
        d.heard(Leg::Client, t0 + 11 * S);
        assert_eq!(d.next(), t0 + 20 * S);
        assert_eq!(d.due(t0 + 13 * S), None);
    }

    #[test]
    fn a_leg_that_cannot_answer_owes_nothing() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 10 * S, 3 * S, [false, false], None);
        assert_eq!(d.due(t0 + 10 * S), Some(Due::Ping));
        assert_eq!(d.next(), t0 + 20 * S);
    }

    #[test]
    fn the_upstream_leg_has_its_own_answer() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 10 * S, 3 * S, [true, true], None);
        assert_eq!(d.due(t0 + 10 * S), Some(Due::Ping));
        d.heard(Leg::Client, t0 + 11 * S);
        assert_eq!(d.due(t0 + 13 * S), Some(Due::Silent(Leg::Upstream)));
    }

    #[test]
    fn waiting_on_one_leg_pauses_the_heartbeat() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 10 * S, 3 * S, [true, true], None);
        assert_eq!(d.due(t0 + 10 * S), Some(Due::Ping));
        d.pause(5 * S);
        assert_eq!(d.due(t0 + 13 * S), None);
        assert_eq!(d.due(t0 + 18 * S), Some(Due::Silent(Leg::Client)));
    }

    #[test]
    fn lifetime_expiry_and_idle_come_due_in_order_of_seriousness() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0, 100 * S, 3 * S, [false, false], Some(5 * S));
        d.expire_at(Some(t0 + 5 * S));
        d.upstream_idle(t0, Some(5 * S));
        assert_eq!(d.next(), t0 + 5 * S);
        assert_eq!(d.due(t0 + 5 * S), Some(Due::UpstreamIdle));
        d.heard(Leg::Upstream, t0 + 5 * S);
        assert_eq!(d.due(t0 + 5 * S), Some(Due::Lifetime));
        let mut e = Deadlines::new(t0, 100 * S, 3 * S, [false, false], None);
        e.expire_at(Some(t0 + 2 * S));
        assert_eq!(e.due(t0 + S), None);
        assert_eq!(e.due(t0 + 2 * S), Some(Due::TokenExpired));
    }

    #[test]
    fn the_inbound_rate_counts_per_second_window() {
        let t0 = Instant::now();
        let mut r = InboundRate::new(t0, 3);
        assert!(!(0..3).any(|_| r.over(t0)));
        assert!(r.over(t0 + S / 2), "the fourth frame in one second");
        assert!(!r.over(t0 + S), "a new window");
    }
}
