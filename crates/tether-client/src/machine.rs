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
                self.ended(now, Some(4000), "silent", reason, Branch::Backoff, true, out);
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
            out.push(Action::Send(frame::subscribe(r, &channel, since.as_deref())));
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

    fn take_branch(&mut self, code: Option<u16>, reason: String, branch: Branch, out: &mut Vec<Action>) {
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

    fn finish(&mut self, code: Option<u16>, reason: Option<String>, fatal: bool, out: &mut Vec<Action>) {
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
