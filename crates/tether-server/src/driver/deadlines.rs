//! Every timer of one connection in one value, from the socket's accept to its
//! close: the handshake's deadline (`limits.handshake_timeout_ms`, counted from the
//! accept, covering the request, the upgrade and a first-frame token), then — once
//! [`Deadlines::committed`] — the next ping, the answer each leg owes to it, the
//! lifetime, the token's expiry and an upstream's idle limit. Admission awaits
//! [`Deadlines::within_handshake`]; the driver sleeps until [`Deadlines::next`] and
//! asks [`Deadlines::due`] what came due. Nothing here touches a socket, so it is
//! tested with plain instants.

use std::future::Future;
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
    /// The handshake's end, until the connection is committed.
    handshake_at: Option<Instant>,
}

impl Deadlines {
    /// A connection's deadlines from its accept: only the handshake's, which ends
    /// at `handshake_until`, runs until [`Deadlines::committed`].
    pub(crate) fn handshake(
        handshake_until: Instant,
        interval: Duration,
        timeout: Duration,
        answers: [bool; 2],
    ) -> Self {
        Self {
            interval,
            timeout,
            answers,
            next_ping: handshake_until + interval,
            owed: [None; 2],
            lifetime_at: None,
            expires_at: None,
            idle: None,
            handshake_at: Some(handshake_until),
        }
    }

    /// Deadlines of a connection committed `now`. `lifetime` is already jittered.
    #[cfg(test)]
    pub(crate) fn new(
        now: Instant,
        interval: Duration,
        timeout: Duration,
        answers: [bool; 2],
        lifetime: Option<Duration>,
    ) -> Self {
        let mut d = Self::handshake(now, interval, timeout, answers);
        d.committed(now, lifetime);
        d
    }

    /// `step`, unless the handshake's deadline comes first (`None`: drop the
    /// socket). A committed connection has no handshake deadline.
    pub(crate) async fn within_handshake<F: Future>(&self, step: F) -> Option<F::Output> {
        match self.handshake_at {
            Some(at) => tokio::time::timeout_at(at, step).await.ok(),
            None => Some(step.await),
        }
    }

    /// The handshake is over: the connection's clocks start `now` (the first ping,
    /// the lifetime, an upstream's idle limit). `lifetime` is already jittered.
    pub(crate) fn committed(&mut self, now: Instant, lifetime: Option<Duration>) {
        self.handshake_at = None;
        self.next_ping = now + self.interval;
        self.owed = [None; 2];
        self.lifetime_at = lifetime.map(|l| now + l);
        if let Some((d, at)) = &mut self.idle {
            *at = now + *d;
        }
    }

    /// Sets (or, after a `refresh`, moves) the token's expiry.
    pub(crate) fn expire_at(&mut self, at: Option<Instant>) {
        self.expires_at = at;
    }

    /// Closes the upstream when it is silent for `idle` (counted from the commit).
    pub(crate) fn upstream_idle(&mut self, idle: Option<Duration>) {
        let from = self.handshake_at.unwrap_or(self.next_ping - self.interval);
        self.idle = idle.map(|d| (d, from + d));
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

/// `ms` with ±10% jitter (lifetimes, so connections opened together do not all
/// close together).
pub(crate) fn jittered(ms: u64) -> Duration {
    let spread = ms / 10;
    Duration::from_millis(ms - spread + fastrand::u64(..=spread * 2))
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
        d.upstream_idle(Some(5 * S));
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

    #[test]
    fn jitter_stays_within_ten_percent_and_spreads_over_it() {
        let samples: Vec<u128> = (0..2000).map(|_| jittered(400).as_millis()).collect();
        assert!(
            samples.iter().all(|ms| (360..=440).contains(ms)),
            "{samples:?}"
        );
        assert!(samples.iter().any(|ms| *ms < 380), "reaches the low end");
        assert!(samples.iter().any(|ms| *ms > 420), "reaches the high end");
        assert_eq!(
            jittered(5).as_millis(),
            5,
            "below 10 ms there is nothing to spread"
        );
    }

    #[test]
    fn the_connection_clocks_start_at_the_commit_not_the_accept() {
        let t0 = Instant::now();
        let mut d = Deadlines::handshake(t0 + 2 * S, 10 * S, 3 * S, [true, false]);
        d.expire_at(Some(t0 + 100 * S));
        d.upstream_idle(Some(4 * S));
        d.committed(t0 + S, Some(50 * S));
        assert_eq!(
            d.next(),
            t0 + 5 * S,
            "the idle limit counts from the commit"
        );
        assert_eq!(d.due(t0 + 5 * S), Some(Due::UpstreamIdle));
        let mut d = Deadlines::handshake(t0 + 2 * S, 10 * S, 3 * S, [true, false]);
        d.committed(t0 + S, Some(50 * S));
        assert_eq!(
            d.next(),
            t0 + 11 * S,
            "the first ping is an interval after the commit"
        );
        assert_eq!(d.due(t0 + 51 * S), Some(Due::Lifetime));
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_past_the_handshake_deadline_is_cut_and_a_committed_one_is_not() {
        let t0 = Instant::now();
        let slow = || tokio::time::sleep(2 * S);
        let mut d = Deadlines::handshake(t0 + S, 10 * S, 3 * S, [true, false]);
        assert_eq!(d.within_handshake(async { 7 }).await, Some(7));
        assert_eq!(d.within_handshake(slow()).await, None);
        assert_eq!(
            Instant::now(),
            t0 + S,
            "cut at the deadline, counted from the accept"
        );
        d.committed(Instant::now(), None);
        assert_eq!(d.within_handshake(slow()).await, Some(()));
    }
}
