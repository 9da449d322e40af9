//! The connection state machine (SPEC section 13), as a pure function:
//! [`step`]`(machine, input) -> (machine, actions)`.
//!
//! It owns every decision: when to open, what to send after `welcome`, which close
//! takes which branch, how long to wait, which message is a duplicate, what the app is
//! told and what the stats count. It does no I/O and reads no clock: time arrives in
//! the inputs (`now`, milliseconds on any monotonic base) and randomness comes from the
//! machine's own seeded RNG, so the same inputs give the same outputs. The I/O shell
//! (`client.rs`) performs the [`Action`]s and feeds back what happened as [`Input`]s.

use std::collections::BTreeMap;

use tether_protocol::{CloseCode, Closing, Position};

use crate::backoff::Backoff;
use crate::event::{Event, State, StateChange, Stats};
use crate::frame::{self, Incoming};
use crate::rule::{self, Branch};

/// Settings the machine decides with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Backoff timing.
    pub backoff: Backoff,
    /// End in `closed` (fatal) after this many consecutive attempts that did not reach
    /// `welcome`; `None`: retry for ever.
    pub failure_cap: Option<u32>,
    /// Whether the app gave a token refresher (4003/4401 then fetch a fresh token).
    pub has_refresher: bool,
    /// How long an opened socket may take to send `welcome`.
    pub connect_timeout_ms: u64,
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started.
    Idle,
    /// Waiting for the refresher's token.
    Refreshing,
    /// A socket is opening, or open and waiting for `welcome`.
    Connecting,
    /// `welcome` received.
    Connected,
    /// Waiting before the next attempt.
    Waiting,
    /// Ended for good.
    Closed,
}

/// What the shell observed or the app asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// The app started the client.
    Start,
    /// The app closed the client.
    Close {
        /// Now, in ms.
        now: u64,
    },
    /// The app subscribed to a channel.
    Subscribe(String),
    /// The app left a channel.
    Unsubscribe(String),
    /// The socket opened (the upgrade succeeded).
    Opened,
    /// A text frame arrived.
    Frame {
        /// Now, in ms.
        now: u64,
        /// The decoded frame.
        frame: Incoming,
    },
    /// The socket ended: `code` from its close frame (`None`: no close frame).
    Dropped {
        /// Now, in ms.
        now: u64,
        /// The close frame's code.
        code: Option<u16>,
        /// The close frame's reason (or what went wrong).
        reason: String,
    },
    /// The socket could not be opened (`status`: the HTTP answer, if one came).
    Failed {
        /// The HTTP status of a refused upgrade.
        status: Option<u16>,
        /// What went wrong.
        message: String,
    },
    /// No frame arrived for `heartbeat_ms + heartbeat_timeout_ms`.
    Silent {
        /// Now, in ms.
        now: u64,
    },
    /// The wait asked by [`Action::Wait`] is over.
    TimerFired,
    /// The refresher answered.
    Token(TokenOutcome),
}

/// The token refresher's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenOutcome {
    /// A fresh token.
    Fresh(String),
    /// The refresher failed; the message says why.
    Failed(String),
}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open a socket.
    Open,
    /// Send a text frame on the open socket.
    Send(String),
    /// Close the socket with this code and drop it.
    CloseSocket {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: &'static str,
    },
    /// Feed [`Input::TimerFired`] after this many ms.
    Wait {
        /// The delay.
        ms: u64,
    },
    /// Call the refresher and feed its answer as [`Input::Token`].
    RefreshToken,
    /// Feed [`Input::Silent`] when no frame arrives for this long (`None`: stop watching).
    Deadline(Option<u64>),
    /// Tell the app.
    Emit(Event),
    /// The machine is closed: stop.
    Finish,
}

#[derive(Clone, Debug)]
struct Sub {
    /// The last position delivered (or acknowledged as lost), `since` on resume.
    last: Option<Position>,
    /// Whether a `subscribed` was ever received (the next one is a resume).
    confirmed: bool,
}

/// The machine's whole state.
#[derive(Clone, Debug)]
pub struct Machine {
    phase: Phase,
    settings: Settings,
    rng: fastrand::Rng,
    subs: BTreeMap<String, Sub>,
    pending: BTreeMap<u64, String>,
    next_ref: u64,
    token: Option<String>,
    need_token: bool,
    backoff_n: u32,
    failures_in_row: u32,
    tries: u32,
    announced: Option<Closing>,
    welcomed_at: Option<u64>,
    ever_welcomed: bool,
    stats: Stats,
}

/// The transition function: consumes the machine and one input, returns the next
/// machine and the actions to perform.
pub fn step(mut machine: Machine, input: Input) -> (Machine, Vec<Action>) {
    let mut out = Vec::new();
    machine.apply(input, &mut out);
    (machine, out)
}

impl Machine {
    /// A machine in `Idle`, with its subscriptions, its first token and an RNG seed.
    pub fn new(settings: Settings, seed: u64, channels: &[String], token: Option<String>) -> Self {
        let need_token = token.is_none() && settings.has_refresher;
        Self {
            phase: Phase::Idle,
            settings,
            rng: fastrand::Rng::with_seed(seed),
            subs: channels
                .iter()
                .map(|c| {
                    (
                        c.clone(),
                        Sub {
                            last: None,
                            confirmed: false,
                        },
                    )
                })
                .collect(),
            pending: BTreeMap::new(),
            next_ref: 1,
            token,
            need_token,
            backoff_n: 0,
            failures_in_row: 0,
            tries: 0,
            announced: None,
            welcomed_at: None,
            ever_welcomed: false,
            stats: Stats::default(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The token the next socket authenticates with.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Consecutive attempts that did not reach `welcome` or dropped unannounced
    /// within `stable_ms` of it (the backoff's `n`).
    pub fn backoff_attempt(&self) -> u32 {
        self.backoff_n
    }

    /// The stats, with the current connection's time counted up to `now`.
    pub fn stats(&self, now: u64) -> Stats {
        let mut s = self.stats.clone();
        if let Some(w) = self.welcomed_at {
            s.connected_ms += now.saturating_sub(w);
        }
        s
    }

    /// The channels subscribed, with the position each would resume after.
    pub fn subscriptions(&self) -> Vec<(String, Option<String>)> {
        self.subs
            .iter()
            .map(|(c, s)| (c.clone(), s.last.as_ref().map(Position::to_string)))
            .collect()
    }

    fn apply(&mut self, input: Input, out: &mut Vec<Action>) {
        if self.phase == Phase::Closed {
            return;
        }
        match input {
            Input::Start if self.phase == Phase::Idle => self.begin_attempt(out),
            Input::Start => {}
            Input::Close { now } => self.close_by_app(now, out),
            Input::Subscribe(channel) => self.subscribe(channel, out),
            Input::Unsubscribe(channel) => self.unsubscribe(&channel, out),
            Input::Opened if self.phase == Phase::Connecting => {
                // Until `welcome`, the silence limit is the handshake's.
                out.push(Action::Deadline(Some(self.settings.connect_timeout_ms)));
                if let Some(t) = &self.token {
                    out.push(Action::Send(frame::connect(t)));
                }
            }
            Input::Opened => {}
            Input::Frame { now, frame } => self.frame(now, frame, out),
            Input::Dropped { now, code, reason } => self.dropped(now, code, reason, out),
            Input::Failed { status, message } => self.failed(status, message, out),
            Input::Silent { now } if matches!(self.phase, Phase::Connecting | Phase::Connected) => {
                out.push(Action::CloseSocket {
                    code: CloseCode::HEARTBEAT_TIMEOUT.0,
                    reason: "no frame within heartbeat + timeout",
                });
                self.announced = None;
                let reason = "no frame within heartbeat_ms + heartbeat_timeout_ms".to_owned();
                self.ended(
                    now,
                    Some(4000),
                    "silent",
                    reason,
                    Branch::Backoff,
                    true,
                    out,
                );
            }
            Input::Silent { .. } => {}
            Input::TimerFired if self.phase == Phase::Waiting => self.begin_attempt(out),
            Input::TimerFired => {}
            Input::Token(t) if self.phase == Phase::Refreshing => self.token_answer(t, out),
            Input::Token(_) => {}
        }
    }

    fn emit(&self, out: &mut Vec<Action>, event: Event) {
        out.push(Action::Emit(event));
    }

    fn begin_attempt(&mut self, out: &mut Vec<Action>) {
        if self.need_token {
            self.phase = Phase::Refreshing;
            out.push(Action::RefreshToken);
            return;
        }
        self.phase = Phase::Connecting;
        self.tries += 1;
        self.stats.attempts += 1;
        self.announced = None;
        let mut s = StateChange::new(State::Connecting);
        s.attempt = Some(self.tries);
        self.emit(out, Event::State(s));
        out.push(Action::Open);
    }

    fn token_answer(&mut self, t: TokenOutcome, out: &mut Vec<Action>) {
        match t {
            TokenOutcome::Fresh(token) => {
                self.token = Some(token);
                self.need_token = false;
                self.begin_attempt(out);
            }
            TokenOutcome::Failed(message) => {
                self.emit(
                    out,
                    Event::Error {
                        code: "token_refresh_failed".into(),
                        message,
                    },
                );
                self.backoff_n += 1;
                self.failures_in_row += 1;
                if self.over_cap() {
                    self.fatal_cap(None, out);
                    return;
                }
                let ms = self.settings.backoff.delay(self.backoff_n, &mut self.rng);
                self.wait(ms, out);
            }
        }
    }

    fn subscribe(&mut self, channel: String, out: &mut Vec<Action>) {
        if self.subs.contains_key(&channel) {
            return;
        }
        if self.phase == Phase::Connected {
            let r = self.take_ref();
            out.push(Action::Send(frame::subscribe(r, &channel, None)));
            self.pending.insert(r, channel.clone());
        }
        self.subs.insert(
            channel,
            Sub {
                last: None,
                confirmed: false,
            },
        );
    }

    fn unsubscribe(&mut self, channel: &str, out: &mut Vec<Action>) {
        if self.subs.remove(channel).is_none() {
            return;
        }
        self.pending.retain(|_, c| c != channel);
        if self.phase == Phase::Connected {
            let r = self.take_ref();
            out.push(Action::Send(frame::unsubscribe(r, channel)));
        }
    }

    fn take_ref(&mut self) -> u64 {
        let r = self.next_ref;
        self.next_ref += 1;
        r
    }

    fn frame(&mut self, now: u64, frame: Incoming, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Connecting | Phase::Connected) {
            return;
        }
        match frame {
            Incoming::Welcome {
                heartbeat_ms,
                heartbeat_timeout_ms,
                ..
            } if self.phase == Phase::Connecting => {
                self.welcome(now, heartbeat_ms.saturating_add(heartbeat_timeout_ms), out)
            }
            Incoming::Welcome { .. } => {}
            Incoming::Subscribed {
                reference,
                channel,
                position,
                recovered,
                missed,
            } => self.subscribed(reference, channel, position, recovered, missed, out),
            Incoming::Message {
                channel,
                id,
                position,
                data,
            } => self.message(channel, id, position, data, out),
            Incoming::Direct { id, data } => {
                self.stats.messages += 1;
                self.emit(out, Event::Direct { id, data });
            }
            Incoming::Error {
                reference,
                code,
                message,
            } => {
                // A refused subscription is dropped, so a reconnect does not ask again.
                if let Some(channel) = reference.and_then(|r| self.pending.remove(&r)) {
                    self.subs.remove(&channel);
                }
                self.emit(out, Event::Error { code, message });
            }
            Incoming::Closing(c) => self.announced = Some(c),
            Incoming::Ignored => {}
            Incoming::Invalid(message) => self.emit(
                out,
                Event::Error {
                    code: "bad_frame".into(),
                    message,
                },
            ),
        }
    }

    fn welcome(&mut self, now: u64, silence_ms: u64, out: &mut Vec<Action>) {
        self.phase = Phase::Connected;
        self.welcomed_at = Some(now);
        self.stats.successes += 1;
        if self.ever_welcomed {
            self.stats.reconnects += 1;
        }
        self.ever_welcomed = true;
        self.failures_in_row = 0;
        self.tries = 0;
        self.emit(out, Event::State(StateChange::new(State::Connected)));
        out.push(Action::Deadline(Some(silence_ms)));
        self.pending.clear();
        let channels: Vec<(String, Option<String>)> = self.subscriptions();
        for (channel, since) in channels {
            let r = self.take_ref();
            out.push(Action::Send(frame::subscribe(
                r,
                &channel,
                since.as_deref(),
            )));
            self.pending.insert(r, channel);
        }
    }

    fn subscribed(
        &mut self,
        reference: Option<u64>,
        channel: String,
        position: String,
        recovered: bool,
        missed: u64,
        out: &mut Vec<Action>,
    ) {
        if let Some(r) = reference {
            self.pending.remove(&r);
        }
        let Some(sub) = self.subs.get_mut(&channel) else {
            return; // unsubscribed meanwhile
        };
        let resumed = sub.confirmed && sub.last.is_some();
        sub.confirmed = true;
        // Recovered: the replay follows and `last` stays. Otherwise (first subscribe, or
        // a gap already reported) live messages follow the channel's current position.
        if !(resumed && recovered) {
            sub.last = Position::parse(&position);
        }
        let event = if resumed {
            Event::Recovered {
                channel,
                position,
                recovered,
                missed,
            }
        } else {
            Event::Subscribed {
                channel,
                position,
                recovered,
                missed,
            }
        };
        self.emit(out, event);
    }

    fn message(
        &mut self,
        channel: String,
        id: String,
        position: String,
        data: serde_json::Value,
        out: &mut Vec<Action>,
    ) {
        let Some(sub) = self.subs.get_mut(&channel) else {
            return; // in flight when the app unsubscribed
        };
        if let Some(pos) = Position::parse(&position) {
            if let Some(last) = &sub.last {
                if last.epoch == pos.epoch && pos.offset <= last.offset {
                    self.stats.duplicates += 1;
                    return;
                }
            }
            sub.last = Some(pos);
        }
        self.stats.messages += 1;
        self.emit(
            out,
            Event::Message {
                channel,
                id,
                position,
                data,
            },
        );
    }

    fn dropped(&mut self, now: u64, code: Option<u16>, reason: String, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Connecting | Phase::Connected) {
            return;
        }
        let announced = self.announced.take();
        let branch = rule::branch(code, announced.as_ref(), self.settings.has_refresher);
        let code = code.or(announced.as_ref().map(|a| a.code.0));
        let reason = match (&announced, reason.is_empty()) {
            (Some(a), true) => a.reason.clone(),
            _ => reason,
        };
        let key = code.unwrap_or(CloseCode::ABNORMAL.0).to_string();
        let unannounced = announced.is_none();
        self.ended(now, code, &key, reason, branch, unannounced, out);
    }

    fn failed(&mut self, status: Option<u16>, message: String, out: &mut Vec<Action>) {
        if self.phase != Phase::Connecting {
            return;
        }
        let branch = match status {
            Some(401) if self.settings.has_refresher => Branch::Refresh,
            Some(400 | 401 | 403 | 404 | 409) => Branch::Fatal,
            _ => Branch::Backoff,
        };
        self.ended(0, None, "connect", message, branch, true, out);
    }

    /// A connection or an attempt ended: count it, report `disconnected`, then take the
    /// branch. `unannounced` drops within `stable_ms` of `welcome` grow the backoff.
    #[allow(clippy::too_many_arguments)]
    fn ended(
        &mut self,
        now: u64,
        code: Option<u16>,
        key: &str,
        reason: String,
        branch: Branch,
        unannounced: bool,
        out: &mut Vec<Action>,
    ) {
        out.push(Action::Deadline(None));
        self.announced = None;
        let was_connected = self.phase == Phase::Connected;
        let up_ms = self.welcomed_at.take().map(|w| now.saturating_sub(w));
        self.stats.connected_ms += up_ms.unwrap_or(0);
        *self.stats.failures.entry(key.to_owned()).or_insert(0) += 1;
        if !was_connected {
            self.backoff_n += 1;
            self.failures_in_row += 1;
        } else if unannounced && up_ms.unwrap_or(0) < self.settings.backoff.stable_ms {
            self.backoff_n += 1;
        } else {
            self.backoff_n = 0;
        }
        let capped = self.over_cap() && branch != Branch::Stop && branch != Branch::Fatal;
        let will_reconnect = !capped && !matches!(branch, Branch::Stop | Branch::Fatal);
        let mut s = StateChange::new(State::Disconnected);
        s.code = code;
        s.reason = Some(reason.clone());
        s.will_reconnect = Some(will_reconnect);
        self.emit(out, Event::State(s));
        if capped {
            return self.fatal_cap(code, out);
        }
        self.take_branch(code, reason, branch, out);
    }

    fn take_branch(
        &mut self,
        code: Option<u16>,
        reason: String,
        branch: Branch,
        out: &mut Vec<Action>,
    ) {
        let backoff = self.settings.backoff;
        match branch {
            Branch::Stop => self.finish(code, Some(reason), false, out),
            Branch::Fatal => {
                let name = code.map_or("refused", |c| CloseCode(c).name());
                self.emit(
                    out,
                    Event::Error {
                        code: name.into(),
                        message: reason.clone(),
                    },
                );
                self.finish(code, Some(reason), true, out);
            }
            Branch::Refresh => {
                self.need_token = true;
                let ms = match self.backoff_n {
                    0 => 0,
                    n => backoff.delay(n, &mut self.rng),
                };
                self.wait(ms, out);
            }
            Branch::ServerDelay(retry) => {
                let ms = backoff.server_delay(retry, &mut self.rng);
                self.wait(ms, out);
            }
            Branch::Backoff => {
                let ms = backoff.delay(self.backoff_n.max(1), &mut self.rng);
                self.wait(ms, out);
            }
        }
    }

    fn over_cap(&self) -> bool {
        self.settings
            .failure_cap
            .is_some_and(|cap| self.failures_in_row >= cap)
    }

    fn fatal_cap(&mut self, code: Option<u16>, out: &mut Vec<Action>) {
        let message = format!(
            "{} consecutive attempts failed (the failure cap)",
            self.failures_in_row
        );
        self.emit(
            out,
            Event::Error {
                code: "failure_cap".into(),
                message: message.clone(),
            },
        );
        self.finish(code, Some(message), true, out);
    }

    fn wait(&mut self, ms: u64, out: &mut Vec<Action>) {
        self.phase = Phase::Waiting;
        let mut s = StateChange::new(State::Reconnecting);
        s.attempt = Some(self.tries + 1);
        s.delay_ms = Some(ms);
        self.emit(out, Event::State(s));
        out.push(Action::Wait { ms });
    }

    fn finish(
        &mut self,
        code: Option<u16>,
        reason: Option<String>,
        fatal: bool,
        out: &mut Vec<Action>,
    ) {
        self.phase = Phase::Closed;
        let mut s = StateChange::new(State::Closed);
        s.code = code;
        s.reason = reason;
        s.fatal = fatal;
        self.emit(out, Event::State(s));
        out.push(Action::Finish);
    }

    fn close_by_app(&mut self, now: u64, out: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Connecting | Phase::Connected) {
            out.push(Action::Deadline(None));
            out.push(Action::CloseSocket {
                code: CloseCode::NORMAL.0,
                reason: "closed by the client",
            });
        }
        if let Some(w) = self.welcomed_at.take() {
            self.stats.connected_ms += now.saturating_sub(w);
        }
        self.finish(
            Some(CloseCode::NORMAL.0),
            Some("closed by the client".into()),
            false,
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> Settings {
        Settings {
            backoff: Backoff::default(),
            failure_cap: None,
            has_refresher: false,
            connect_timeout_ms: 10_000,
        }
    }

    /// A machine driven by a test: keeps every action.
    struct Drive {
        m: Option<Machine>,
        log: Vec<Action>,
    }

    impl Drive {
        fn new(s: Settings, channels: &[&str]) -> Self {
            let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
            Self {
                m: Some(Machine::new(s, 7, &channels, None)),
                log: Vec::new(),
            }
        }
        fn m(&self) -> &Machine {
            self.m.as_ref().unwrap_or_else(|| unreachable!())
        }
        fn feed(&mut self, input: Input) -> Vec<Action> {
            let m = self.m.take().unwrap_or_else(|| unreachable!());
            let (m, actions) = step(m, input);
            self.m = Some(m);
            self.log.extend(actions.clone());
            actions
        }
        fn welcome(&mut self, now: u64) -> Vec<Action> {
            self.feed(Input::Opened);
            self.feed(frame_in(
                now,
                r#"{"type":"welcome","conn_id":"c","client_id":"a","node_id":"n","heartbeat_ms":500,"heartbeat_timeout_ms":300}"#,
            ))
        }
        fn msg(&mut self, now: u64, ch: &str, pos: &str) -> Vec<Action> {
            let text = json!({"type":"message","channel":ch,"id":pos,"position":pos,"data":pos})
                .to_string();
            self.feed(frame_in(now, &text))
        }
        fn drop_with(
            &mut self,
            now: u64,
            closing: Option<(u16, bool, Option<u64>)>,
        ) -> Vec<Action> {
            if let Some((code, reconnect, retry)) = closing {
                let text = json!({"type":"closing","code":code,"reason":"r","reconnect":reconnect,"retry_ms":retry}).to_string();
                self.feed(frame_in(now, &text));
                self.feed(Input::Dropped {
                    now,
                    code: Some(code),
                    reason: "r".into(),
                })
            } else {
                self.feed(Input::Dropped {
                    now,
                    code: None,
                    reason: "reset".into(),
                })
            }
        }
    }

    fn frame_in(now: u64, text: &str) -> Input {
        Input::Frame {
            now,
            frame: Incoming::decode(text),
        }
    }

    fn states(actions: &[Action]) -> Vec<StateChange> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Emit(Event::State(s)) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    fn sent(actions: &[Action]) -> Vec<serde_json::Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(t) => serde_json::from_str(t).ok(),
                _ => None,
            })
            .collect()
    }

    fn delivered(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Emit(Event::Message { position, .. }) => Some(position.clone()),
                _ => None,
            })
            .collect()
    }

    fn wait_ms(actions: &[Action]) -> Option<u64> {
        actions.iter().find_map(|a| match a {
            Action::Wait { ms } => Some(*ms),
            _ => None,
        })
    }

    #[test]
    fn connects_subscribes_and_resumes_from_the_last_delivered_position() {
        let mut d = Drive::new(settings(), &["news"]);
        let a = d.feed(Input::Start);
        assert_eq!(states(&a)[0].state, State::Connecting);
        assert!(a.contains(&Action::Open));
        let a = d.welcome(100);
        assert_eq!(states(&a)[0].state, State::Connected);
        assert!(
            a.contains(&Action::Deadline(Some(800))),
            "heartbeat + timeout"
        );
        assert_eq!(
            sent(&a),
            [json!({"type":"subscribe","ref":1,"channel":"news"})]
        );
        d.feed(frame_in(110, r#"{"type":"subscribed","ref":1,"channel":"news","position":"e1:4","recovered":false,"missed":0}"#));
        assert_eq!(delivered(&d.msg(120, "news", "e1:5")), ["e1:5"]);
        assert_eq!(delivered(&d.msg(130, "news", "e1:6")), ["e1:6"]);
        let a = d.drop_with(140, None);
        let s = states(&a);
        assert_eq!(
            (s[0].state, s[0].will_reconnect, s[1].state),
            (State::Disconnected, Some(true), State::Reconnecting)
        );
        assert!(wait_ms(&a).is_some_and(|ms| ms <= 250));
        d.feed(Input::TimerFired);
        let a = d.welcome(500);
        assert_eq!(
            sent(&a),
            [json!({"type":"subscribe","ref":2,"channel":"news","since":"e1:6"})]
        );
        let a = d.feed(frame_in(510, r#"{"type":"subscribed","ref":2,"channel":"news","position":"e1:8","recovered":true,"missed":2}"#));
        assert!(a.contains(&Action::Emit(Event::Recovered {
            channel: "news".into(),
            position: "e1:8".into(),
            recovered: true,
            missed: 2
        })));
        // The replay overlaps what was delivered: only the new ones pass, in order.
        let mut got = Vec::new();
        for p in ["e1:5", "e1:6", "e1:7", "e1:7", "e1:8"] {
            got.extend(delivered(&d.msg(520, "news", p)));
        }
        assert_eq!(got, ["e1:7", "e1:8"]);
        let st = d.m().stats(600);
        assert_eq!((st.messages, st.duplicates, st.reconnects), (4, 3, 1));
        assert_eq!((st.attempts, st.successes), (2, 2));
        assert_eq!(st.failures.get("1006"), Some(&1));
        assert_eq!(st.connected_ms, 40 + 100);
    }

    #[test]
    fn a_new_epoch_starts_a_new_order_and_lost_history_is_surfaced() {
        let mut d = Drive::new(settings(), &["a"]);
        d.feed(Input::Start);
        d.welcome(0);
        d.feed(frame_in(0, r#"{"type":"subscribed","ref":1,"channel":"a","position":"e1:0","recovered":false,"missed":0}"#));
        assert_eq!(delivered(&d.msg(1, "a", "e1:9")), ["e1:9"]);
        assert_eq!(
            delivered(&d.msg(2, "a", "e2:1")),
            ["e2:1"],
            "new epoch, lower offset"
        );
        assert!(delivered(&d.msg(3, "a", "e2:1")).is_empty());
        d.drop_with(4, Some((1011, true, Some(10))));
        d.feed(Input::TimerFired);
        d.welcome(20);
        let a = d.feed(frame_in(21, r#"{"type":"subscribed","ref":2,"channel":"a","position":"e3:40","recovered":false,"missed":0}"#));
        assert!(a.contains(&Action::Emit(Event::Recovered {
            channel: "a".into(),
            position: "e3:40".into(),
            recovered: false,
            missed: 0
        })));
        // The gap is reported; the next resume asks from the reported position.
        assert_eq!(
            d.m().subscriptions(),
            [("a".to_owned(), Some("e3:40".to_owned()))]
        );
        assert_eq!(delivered(&d.msg(22, "a", "e3:41")), ["e3:41"]);
    }

    #[test]
    fn subscriptions_made_at_any_time_survive_reconnects() {
        let mut d = Drive::new(settings(), &[]);
        d.feed(Input::Start);
        // Before the first connection: sent after welcome.
        assert!(sent(&d.feed(Input::Subscribe("early".into()))).is_empty());
        let a = d.welcome(0);
        assert_eq!(sent(&a)[0]["channel"], "early");
        // While connected: sent at once.
        let a = d.feed(Input::Subscribe("live".into()));
        assert_eq!(sent(&a)[0]["type"], "subscribe");
        let a = d.feed(Input::Unsubscribe("early".into()));
        assert_eq!(
            sent(&a),
            [json!({"type":"unsubscribe","ref":3,"channel":"early"})]
        );
        d.drop_with(5, None);
        // While away.
        d.feed(Input::Subscribe("away".into()));
        d.feed(Input::TimerFired);
        let chans: Vec<_> = sent(&d.welcome(9))
            .iter()
            .map(|v| v["channel"].clone())
            .collect();
        assert_eq!(chans, [json!("away"), json!("live")]);
        // A refused subscription is dropped, not asked again.
        let refs: Vec<_> = sent(&d.log).iter().map(|v| v["ref"].clone()).collect();
        let last_ref = refs.last().cloned().unwrap_or_default();
        let a = d.feed(frame_in(
            10,
            &json!({"type":"error","ref":last_ref,"code":"forbidden_channel","message":"no"})
                .to_string(),
        ));
        assert!(
            matches!(&a[..], [Action::Emit(Event::Error { code, .. })] if code == "forbidden_channel")
        );
        assert_eq!(d.m().subscriptions().len(), 1);
    }

    /// code, announced reconnect, retry_ms, will_reconnect, wait bounds, fatal.
    type Row = (u16, bool, Option<u64>, bool, Option<(u64, u64)>, bool);

    /// Each close code through the whole machine: the events the app sees and what
    /// happens next.
    #[test]
    fn close_codes_end_or_retry_as_the_table_says() {
        // code, reconnect, retry_ms, (will_reconnect, wait_ms bound, fatal)
        #[rustfmt::skip]
        let table: &[Row] = &[
            (1000, false, None, false, None, false),
            (4001, false, None, false, None, false),
            (4002, false, None, false, None, false),
            (4002, true, Some(700), true, Some((700, 700)), false),
            (1001, true, Some(4321), true, Some((4321, 4321)), false),
            (4503, true, Some(900), true, Some((900, 900)), false),
            (4429, true, None, true, Some((0, 250)), false),
            (4008, true, None, true, Some((0, 250)), false),
            (4004, false, None, false, None, true),
            (1009, false, None, false, None, true),
            (4401, false, None, false, None, true),
            (4403, false, None, false, None, true),
            (4409, false, None, false, None, true),
            (4003, true, None, false, None, true),
        ];
        for &(code, reconnect, retry, will, wait, fatal) in table {
            let mut d = Drive::new(settings(), &["a"]);
            d.feed(Input::Start);
            d.welcome(0);
            let a = d.drop_with(10, Some((code, reconnect, retry)));
            let s = states(&a);
            assert_eq!(s[0].state, State::Disconnected, "{code}");
            assert_eq!(
                (s[0].code, s[0].will_reconnect),
                (Some(code), Some(will)),
                "{code}"
            );
            match wait {
                Some((lo, hi)) => {
                    let ms = wait_ms(&a);
                    assert!(
                        ms.is_some_and(|ms| (lo..=hi).contains(&ms)),
                        "{code}: {ms:?}"
                    );
                    assert_eq!(d.m().phase(), Phase::Waiting, "{code}");
                }
                None => {
                    assert_eq!(s[1].state, State::Closed, "{code}");
                    assert_eq!(s[1].fatal, fatal, "{code}");
                    assert_eq!(a.last(), Some(&Action::Finish), "{code}");
                    let errored = a
                        .iter()
                        .any(|x| matches!(x, Action::Emit(Event::Error { .. })));
                    assert_eq!(errored, fatal, "{code}: a fatal close says why");
                }
            }
        }
    }

    #[test]
    fn backoff_grows_over_failed_attempts_and_resets_after_a_stable_connection() {
        let mut d = Drive::new(settings(), &[]);
        d.feed(Input::Start);
        for n in 1..=6u32 {
            let a = d.feed(Input::Failed {
                status: None,
                message: "refused".into(),
            });
            assert_eq!(d.m().backoff_attempt(), n);
            let cap = Backoff::default().cap(n);
            assert!(wait_ms(&a).is_some_and(|ms| ms <= cap), "attempt {n}");
            assert_eq!(states(&a)[1].attempt, Some(n + 1));
            d.feed(Input::TimerFired);
        }
        // Up, then dropped unannounced within 30 s: still counting.
        d.welcome(1_000);
        d.drop_with(1_000 + 29_999, None);
        assert_eq!(d.m().backoff_attempt(), 7);
        d.feed(Input::TimerFired);
        // Up for 30 s, then dropped: the counter starts again (delay within attempt 1's cap).
        d.welcome(40_000);
        let a = d.drop_with(70_000, None);
        assert_eq!(d.m().backoff_attempt(), 0);
        assert!(wait_ms(&a).is_some_and(|ms| ms <= 250));
        d.feed(Input::TimerFired);
        d.feed(Input::Failed {
            status: None,
            message: "x".into(),
        });
        assert_eq!(d.m().backoff_attempt(), 1);
        // An announced drop is not a failure.
        d.feed(Input::TimerFired);
        d.welcome(80_000);
        d.drop_with(80_010, Some((4002, true, Some(5))));
        assert_eq!(d.m().backoff_attempt(), 0);
    }

    #[test]
    fn the_failure_cap_ends_in_a_fatal_close() {
        let mut s = settings();
        s.failure_cap = Some(3);
        let mut d = Drive::new(s, &[]);
        d.feed(Input::Start);
        for _ in 0..2 {
            d.feed(Input::Failed {
                status: None,
                message: "refused".into(),
            });
            d.feed(Input::TimerFired);
        }
        let a = d.feed(Input::Failed {
            status: None,
            message: "refused".into(),
        });
        let s = states(&a);
        assert_eq!(s[0].will_reconnect, Some(false));
        assert_eq!((s[1].state, s[1].fatal), (State::Closed, true));
        assert!(a.iter().any(
            |x| matches!(x, Action::Emit(Event::Error { code, .. }) if code == "failure_cap")
        ));
        assert_eq!(d.m().stats(0).failures.get("connect"), Some(&3));
        // Closed is final.
        assert!(d.feed(Input::TimerFired).is_empty());
    }

    #[test]
    fn an_expired_token_is_refreshed_and_sent_as_the_first_frame() {
        let mut s = settings();
        s.has_refresher = true;
        let mut d = Drive::new(s, &[]);
        // No token yet: the refresher gives the first one.
        assert_eq!(d.feed(Input::Start), [Action::RefreshToken]);
        let a = d.feed(Input::Token(TokenOutcome::Fresh("t1".into())));
        assert!(a.contains(&Action::Open));
        let a = d.feed(Input::Opened);
        assert_eq!(sent(&a), [json!({"type":"connect","token":"t1"})]);
        d.feed(frame_in(
            0,
            r#"{"type":"welcome","conn_id":"c","client_id":"a","node_id":"n","heartbeat_ms":500}"#,
        ));
        let a = d.drop_with(50, Some((4003, true, None)));
        assert_eq!(states(&a)[0].will_reconnect, Some(true));
        assert_eq!(
            wait_ms(&a),
            Some(0),
            "an announced expiry reconnects at once"
        );
        assert_eq!(d.feed(Input::TimerFired), [Action::RefreshToken]);
        // A failing refresher is retried with backoff, not fatal.
        let a = d.feed(Input::Token(TokenOutcome::Failed("down".into())));
        assert!(a.iter().any(|x| matches!(x, Action::Emit(Event::Error { code, .. }) if code == "token_refresh_failed")));
        assert_eq!(d.feed(Input::TimerFired), [Action::RefreshToken]);
        d.feed(Input::Token(TokenOutcome::Fresh("t2".into())));
        assert_eq!(d.m().token(), Some("t2"));
        assert_eq!(
            sent(&d.feed(Input::Opened)),
            [json!({"type":"connect","token":"t2"})]
        );
    }

    #[test]
    fn silence_drops_the_socket_and_backs_off() {
        let mut d = Drive::new(settings(), &[]);
        d.feed(Input::Start);
        d.welcome(0);
        let a = d.feed(Input::Silent { now: 800 });
        assert!(matches!(a[0], Action::CloseSocket { code: 4000, .. }));
        let s = states(&a);
        assert_eq!((s[0].code, s[0].will_reconnect), (Some(4000), Some(true)));
        assert!(wait_ms(&a).is_some_and(|ms| ms <= 250));
        assert_eq!(d.m().stats(900).failures.get("silent"), Some(&1));
        // An opened socket that never says welcome is silent too.
        d.feed(Input::TimerFired);
        let a = d.feed(Input::Opened);
        assert!(a.contains(&Action::Deadline(Some(10_000))));
        let a = d.feed(Input::Silent { now: 11_000 });
        assert_eq!(states(&a)[0].state, State::Disconnected);
    }

    #[test]
    fn close_by_the_app_is_clean_and_final() {
        let mut d = Drive::new(settings(), &["a"]);
        d.feed(Input::Start);
        d.welcome(0);
        let a = d.feed(Input::Close { now: 250 });
        assert!(a.contains(&Action::CloseSocket {
            code: 1000,
            reason: "closed by the client"
        }));
        let s = states(&a);
        assert_eq!(
            (s[0].state, s[0].code, s[0].fatal),
            (State::Closed, Some(1000), false)
        );
        assert_eq!(a.last(), Some(&Action::Finish));
        assert_eq!(d.m().stats(10_000).connected_ms, 250);
        assert!(d.feed(Input::Subscribe("b".into())).is_empty());
    }

    #[test]
    fn refusal_answers_over_http_are_fatal_or_retried() {
        for (status, fatal) in [
            (401, true),
            (403, true),
            (404, true),
            (503, false),
            (429, false),
        ] {
            let mut d = Drive::new(settings(), &[]);
            d.feed(Input::Start);
            let a = d.feed(Input::Failed {
                status: Some(status),
                message: "no".into(),
            });
            assert_eq!(d.m().phase() == Phase::Closed, fatal, "{status}");
            assert_eq!(states(&a)[0].will_reconnect, Some(!fatal), "{status}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let run = || {
            let mut d = Drive::new(settings(), &[]);
            d.feed(Input::Start);
            (0..8)
                .map(|_| {
                    let a = d.feed(Input::Failed {
                        status: None,
                        message: "x".into(),
                    });
                    d.feed(Input::TimerFired);
                    wait_ms(&a)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
