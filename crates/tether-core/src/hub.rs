//! Channels on this node: subscriptions, history, encode-once fan-out, recovery.
//!
//! Ownership: the hub's table owns each [`Channel`]; a channel's state (history,
//! positions, subscribers, idempotency keys) lives under that channel's own mutex,
//! so one busy channel never stalls another. A channel lives while it has
//! subscribers or unexpired history; the cleanup pass (see [`Hub::sweep`]) removes
//! the rest, and a channel created again starts a new epoch (its history was lost).
//!
//! The recovery seam: publish appends to history, assigns the offset and hands it to
//! every *live* subscriber in one critical section (a quiet channel's direct writes
//! run just after it: the subscribers that get the message are fixed inside it, and
//! the channel's publishing lock keeps the next publish from overtaking them);
//! subscribe takes the same section to read the position and register the
//! subscriber. A subscriber that resumes
//! behind the head is registered *catching up*: live publishes skip it, and its
//! connection task pulls history pages ([`Hub::catch_up`]) as its outbox drains; the
//! page that reaches the head flips it live inside the same critical section. So
//! replay + live has no gap and no duplicate by construction, and a long replay
//! never fills the outbox (no 4008 for resuming).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use tether_protocol::{wire, EventType, Position, ServerFrame};
use tokio::time::Instant;

use crate::connection::Connection;
use crate::events::{EventBus, EventFields};
pub use crate::message::{Direct, Published};
pub use external::{published, Delivery, Followed, Head, Incoming};

#[path = "hub_external.rs"]
mod external;
use crate::metrics::Metrics;
use crate::outbox::{Offered, Outgoing};

/// The hub's settings.
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// `history.size`: messages kept per channel.
    pub history_size: usize,
    /// `history.ttl_ms`.
    pub history_ttl: Duration,
    /// `limits.max_channels`: channels per node.
    pub max_channels: usize,
    /// `limits.max_channels_per_connection`.
    pub max_channels_per_connection: usize,
}

/// What `publish` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublishResult {
    /// Message id.
    pub id: String,
    /// Its position.
    pub position: String,
    /// Subscribers on this node when it was published.
    pub subscribers: usize,
    /// Whether the idempotency key had been seen (nothing was delivered).
    pub duplicate: bool,
}

/// What `subscribe` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// The channel's latest position when subscribing.
    pub position: String,
    /// Whether `since` was inside the history.
    pub recovered: bool,
    /// Messages that will be replayed.
    pub missed: u64,
}

/// Why a subscribe or publish was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HubError {
    /// `limits.max_channels` reached (`channel_limit`).
    ChannelLimit,
    /// `limits.max_channels_per_connection` reached (`too_many_channels`).
    TooManyChannels,
    /// The connection is already subscribed (`already_subscribed`).
    AlreadySubscribed,
    /// The connection is not subscribed (`not_subscribed`).
    NotSubscribed,
}

impl HubError {
    /// The `error` frame's code.
    pub fn code(self) -> &'static str {
        match self {
            HubError::ChannelLimit => "channel_limit",
            HubError::TooManyChannels => "too_many_channels",
            HubError::AlreadySubscribed => "already_subscribed",
            HubError::NotSubscribed => "not_subscribed",
        }
    }
    /// A human sentence.
    pub fn message(self) -> &'static str {
        match self {
            HubError::ChannelLimit => "this node holds its maximum number of channels",
            HubError::TooManyChannels => {
                "this connection holds its maximum number of subscriptions"
            }
            HubError::AlreadySubscribed => "already subscribed to this channel",
            HubError::NotSubscribed => "not subscribed to this channel",
        }
    }
}

/// How a catch-up step went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// Every catching-up subscription of the connection is live now.
    Live,
    /// More history remains; call again when the outbox has room.
    More,
    /// The history moved past what the connection still needed.
    Lost,
}

struct Sub {
    conn: Arc<Connection>,
    /// The next offset this connection must receive on this channel.
    next: u64,
    /// Whether publishes push to it directly (false while catching up).
    live: bool,
}

struct ChannelState {
    epoch: String,
    last: u64,
    history: VecDeque<Arc<Published>>,
    subs: HashMap<u64, Sub>,
    /// Connections per client, for presence.
    clients: HashMap<Arc<str>, u32>,
    idem: HashMap<String, (PublishResult, Instant)>,
    idem_order: VecDeque<String>,
    /// Set when the cleanup removed the channel from the table.
    removed: bool,
}

struct Channel {
    name: Arc<str>,
    /// Held by a publish from start to end, so publishes to the channel (and an
    /// unsubscribe, see [`Hub::unsubscribe`]) follow one another; it holds when the
    /// last publish's fan-out ended (direct writes only after a quiet gap). Taken
    /// before `state`, never while holding it.
    publishing: Mutex<Option<Instant>>,
    state: Mutex<ChannelState>,
}

/// The hub: a cheap clone handle.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("channels", &self.channel_count())
            .finish()
    }
}

struct Inner {
    settings: HubSettings,
    events: EventBus,
    metrics: Metrics,
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    /// Told the name of every channel whose subscriptions on this node changed
    /// (see [`Hub::watch`]); unset for the in-memory broker.
    watcher: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Arc<str>>>,
}

enum Step {
    Done,
    More,
    Lost,
}

/// Per-page size of a catch-up step.
const PAGE: usize = 64;

/// A publish writes its frame straight to idle subscribers' sockets (see
/// [`Outbox::offer`](crate::Outbox::offer)) when the channel's previous fan-out ended
/// at least this long ago. A lone message then costs each subscriber one `write`,
/// not a task wake-up and a poll as well; messages that follow each other closely are
/// queued instead, so that each connection's task writes them together.
const QUIET: Duration = Duration::from_millis(100);

/// How long one publish may spend writing directly before queuing the rest (it holds
/// the channel's publishing lock, and the publisher waits).
const DIRECT_BUDGET: Duration = Duration::from_secs(1);

/// A quiet channel's direct writes are split between the publishing thread and helper
/// threads, one part per core, each of at least this many subscribers: a direct write
/// costs ~10 µs, nearly all of it the kernel's network path, so one thread needs
/// ~100 ms for 10,000 subscribers.
const PART_MIN: usize = 1024;

/// At most this many threads write one publish's direct writes.
const MAX_PARTS: usize = 8;

/// Queues `p` (at `offset`) for every live, in-sync subscriber in `subs`, under the
/// channel's lock; returns how many took it. A subscriber whose outbox overflows is
/// fed no more (its task closes it with 4008).
fn queue_all(subs: &mut HashMap<u64, Sub>, offset: u64, p: &Arc<Published>) -> u64 {
    let mut delivered = 0u64;
    for sub in subs.values_mut() {
        if sub.live && sub.next == offset {
            sub.next += 1;
            if sub.conn.outbox().push(Outgoing::Message(p.clone())) {
                delivered += 1;
            } else {
                sub.live = false;
            }
        }
    }
    delivered
}

/// What a direct fan-out did: deliveries, and the subscribers (by `seq`) whose outbox
/// overflowed, to be fed no more.
#[derive(Default)]
struct Offers {
    delivered: u64,
    refused: Vec<u64>,
}

/// Offers `p` to each of `targets` (see [`Outbox::offer`]): written to idle sockets
/// directly until `direct_until`, queued after it. Runs without the channel's
/// state lock, so that subscribes and closes on the channel do not wait for it. A
/// large fan-out is split over the cores (see [`PART_MIN`]); a part whose helper
/// thread cannot start is written here.
///
/// [`Outbox::offer`]: crate::Outbox::offer
/// The next replay page from history (after `skip` messages): at most `slots`
/// messages and no more bytes than the outbox has free, so a replay never overflows
/// it (SPEC section 7: a long replay never trips the slow-consumer limit). `None`
/// when even the first message cannot fit an empty outbox (it never will).
fn page_within(
    st: &ChannelState,
    skip: usize,
    slots: usize,
    outbox: &crate::outbox::Outbox,
) -> Option<Vec<Arc<Published>>> {
    let mut room = outbox.room_bytes();
    let mut page = Vec::new();
    for p in st.history.iter().skip(skip).take(slots) {
        let size = p.frame.len();
        if size > room {
            break;
        }
        room -= size;
        page.push(p.clone());
    }
    let stuck = page.is_empty() && skip < st.history.len() && outbox.queued_bytes() == 0;
    (!stuck).then_some(page)
}

fn offer_all(targets: &[Arc<Connection>], p: &Arc<Published>, direct_until: Instant) -> Offers {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let parts = cores.min(MAX_PARTS).min(targets.len() / PART_MIN);
    if parts < 2 {
        return offer_part(targets, p, direct_until);
    }
    let mut chunks = targets.chunks(targets.len().div_ceil(parts));
    let mine = chunks.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = chunks
            .map(|part| {
                let h = std::thread::Builder::new()
                    .name("tether-fanout".into())
                    .spawn_scoped(scope, || offer_part(part, p, direct_until));
                (part, h)
            })
            .collect();
        let mut all = offer_part(mine, p, direct_until);
        for (part, h) in helpers {
            let done = match h {
                // A panic there is a bug; its part counts as not delivered.
                Ok(h) => h.join().unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(error = %e, "no fan-out helper thread; writing its part here");
                    offer_part(part, p, direct_until)
                }
            };
            all.delivered += done.delivered;
            all.refused.extend(done.refused);
        }
        all
    })
}

fn offer_part(targets: &[Arc<Connection>], p: &Arc<Published>, direct_until: Instant) -> Offers {
    let mut out = Offers::default();
    let mut direct = true;
    for (i, conn) in targets.iter().enumerate() {
        let item = Outgoing::Message(p.clone());
        let offered = if direct {
            conn.outbox().offer(item)
        } else if conn.outbox().push(item) {
            Offered::Queued
        } else {
            Offered::Refused
        };
        match offered {
            Offered::Written(n) => {
                conn.add_bytes_out(n);
                out.delivered += 1;
            }
            Offered::Queued => out.delivered += 1,
            Offered::Refused => out.refused.push(conn.seq()),
        }
        if i % 64 == 63 && direct && Instant::now() >= direct_until {
            direct = false;
        }
    }
    out
}

/// Hands `p` (at `offset`) to every live, in-sync subscriber of `ch`: straight to
/// idle sockets after a quiet gap (without the state lock, which it lets go), else
/// queued under it. The caller holds the channel's publishing lock (`fanned_out`)
/// and sets it when this returns; returns how many took it.
#[inline]
fn fan_out(
    ch: &Channel,
    mut st: parking_lot::MutexGuard<'_, ChannelState>,
    fanned_out: &mut Option<Instant>,
    offset: u64,
    p: &Arc<Published>,
    now: Instant,
) -> u64 {
    let quiet = fanned_out.is_none_or(|t| now.duration_since(t) >= QUIET);
    if quiet {
        // Straight to the sockets, which takes long enough (~10 µs per
        // subscriber) that it must not hold the state lock: the subscribers
        // that get it are fixed here, and the lock is let go.
        let mut targets = Vec::new();
        for sub in st.subs.values_mut() {
            if sub.live && sub.next == offset {
                sub.next += 1;
                targets.push(sub.conn.clone());
            }
        }
        drop(st);
        let offers = offer_all(&targets, p, now + DIRECT_BUDGET);
        drop(targets);
        if !offers.refused.is_empty() {
            let mut st = ch.state.lock();
            for seq in offers.refused {
                if let Some(sub) = st.subs.get_mut(&seq) {
                    sub.live = false;
                }
            }
        }
        offers.delivered
    } else {
        let delivered = queue_all(&mut st.subs, offset, p);
        drop(st);
        delivered
    }
}

impl Hub {
    /// An empty hub.
    pub fn new(settings: HubSettings, events: EventBus, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                events,
                metrics,
                channels: Mutex::new(HashMap::new()),
                watcher: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Its settings.
    pub fn settings(&self) -> &HubSettings {
        &self.inner.settings
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Channels in the table (with subscribers or retained history).
    pub fn channel_count(&self) -> usize {
        self.inner.channels.lock().len()
    }

    fn channel(&self, name: &str, create: bool) -> Result<Option<Arc<Channel>>, HubError> {
        self.channel_at(name, create.then_some(None))
    }

    /// The channel `name`; with `create`, made if absent, starting at the given
    /// `(epoch, last offset)` or else at a new epoch's offset 0.
    fn channel_at(
        &self,
        name: &str,
        create: Option<Option<(&str, u64)>>,
    ) -> Result<Option<Arc<Channel>>, HubError> {
        let mut map = self.inner.channels.lock();
        if let Some(c) = map.get(name) {
            return Ok(Some(c.clone()));
        }
        let Some(seed) = create else {
            return Ok(None);
        };
        if map.len() >= self.inner.settings.max_channels {
            return Err(HubError::ChannelLimit);
        }
        let name: Arc<str> = name.into();
        let ch = Arc::new(Channel {
            name: name.clone(),
            publishing: Mutex::new(None),
            state: Mutex::new(ChannelState {
                epoch: seed.map_or_else(new_epoch, |(e, _)| e.to_owned()),
                last: seed.map_or(0, |(_, last)| last),
                history: VecDeque::new(),
                subs: HashMap::new(),
                clients: HashMap::new(),
                idem: HashMap::new(),
                idem_order: VecDeque::new(),
                removed: false,
            }),
        });
        map.insert(name, ch.clone());
        Ok(Some(ch))
    }

    /// Runs `f` on the channel's locked state, retrying if the cleanup removed the
    /// channel between the lookup and the lock.
    fn with_channel<R>(
        &self,
        name: &str,
        create: bool,
        f: impl FnMut(&Channel, &mut ChannelState) -> R,
    ) -> Result<Option<R>, HubError> {
        self.with_channel_at(name, create.then_some(None), f)
    }

    /// [`with_channel`](Self::with_channel), creating the channel at `create`'s
    /// position (see [`channel_at`](Self::channel_at)).
    fn with_channel_at<R>(
        &self,
        name: &str,
        create: Option<Option<(&str, u64)>>,
        mut f: impl FnMut(&Channel, &mut ChannelState) -> R,
    ) -> Result<Option<R>, HubError> {
        loop {
            let Some(ch) = self.channel_at(name, create)? else {
                return Ok(None);
            };
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            return Ok(Some(f(&ch, &mut st)));
        }
    }

    /// Publishes `data` (raw JSON text) to `channel`: appends it to history and
    /// pushes it to every live subscriber, without awaiting.
    pub fn publish(
        &self,
        channel: &str,
        data: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PublishResult, HubError> {
        let settings = &self.inner.settings;
        loop {
            let ch = self.channel(channel, true)?.ok_or(HubError::ChannelLimit)?;
            // Publishes to one channel follow one another: a direct fan-out runs after
            // the state lock is let go, and the next publish must not overtake it.
            let mut fanned_out = ch.publishing.lock();
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            let now = Instant::now();
            expire(&mut st, settings, now);
            if let Some(key) = idempotency_key {
                if let Some((res, _)) = st.idem.get(key) {
                    return Ok(PublishResult {
                        duplicate: true,
                        ..res.clone()
                    });
                }
            }
            st.last += 1;
            let offset = st.last;
            let position = format!("{}:{}", st.epoch, offset);
            let id = uuid::Uuid::new_v4().simple().to_string();
            let p = Arc::new(encode(
                ch.name.clone(),
                id,
                offset,
                position,
                &one_line(data),
                now,
            ));
            st.history.push_back(p.clone());
            while st.history.len() > settings.history_size {
                st.history.pop_front();
            }
            let res = PublishResult {
                id: p.id.clone(),
                position: p.position.clone(),
                subscribers: st.subs.len(),
                duplicate: false,
            };
            if let Some(key) = idempotency_key {
                st.idem.insert(key.to_owned(), (res.clone(), now));
                st.idem_order.push_back(key.to_owned());
                while st.idem_order.len() > settings.history_size {
                    if let Some(old) = st.idem_order.pop_front() {
                        st.idem.remove(&old);
                    }
                }
            }
            let delivered = fan_out(&ch, st, &mut fanned_out, offset, &p, now);
            *fanned_out = Some(Instant::now());
            drop(fanned_out);
            self.inner.metrics.delivered(delivered);
            self.inner.metrics.published();
            return Ok(res);
        }
    }

    /// Subscribes `conn` to `channel`, resuming after `since` when it is inside the
    /// history. With `announce`, the `subscribed` frame (with `reference`) is queued
    /// first, inside the critical section, so it precedes every message of the channel.
    pub fn subscribe(
        &self,
        conn: &Arc<Connection>,
        channel: &str,
        since: Option<&Position>,
        announce: Option<Option<u64>>,
    ) -> Result<Subscribed, HubError> {
        self.subscribe_at(conn, channel, since, announce, None)
    }

    /// [`subscribe`](Self::subscribe); a channel this creates starts at `seed`
    /// (`(epoch, last offset)`, from an external broker) instead of a new epoch.
    pub fn subscribe_at(
        &self,
        conn: &Arc<Connection>,
        channel: &str,
        since: Option<&Position>,
        announce: Option<Option<u64>>,
        seed: Option<(&str, u64)>,
    ) -> Result<Subscribed, HubError> {
        {
            let chans = conn.channels.lock();
            if chans.iter().any(|c| &**c == channel) {
                return Err(HubError::AlreadySubscribed);
            }
            if chans.len() >= self.inner.settings.max_channels_per_connection {
                return Err(HubError::TooManyChannels);
            }
        }
        let settings = &self.inner.settings;
        let r = self.with_channel_at(channel, Some(seed), |ch, st| {
            expire(st, settings, Instant::now());
            let latest = st.last;
            let (recovered, next) = start_of(st, since);
            let out = Subscribed {
                position: format!("{}:{}", st.epoch, latest),
                recovered,
                missed: latest + 1 - next,
            };
            if let Some(reference) = announce {
                let frame = ServerFrame::Subscribed {
                    reference,
                    channel: &ch.name,
                    position: &out.position,
                    recovered: out.recovered,
                    missed: out.missed,
                }
                .encode();
                conn.outbox().push(Outgoing::text(&frame));
            }
            self.join(conn, ch, st, next);
            out
        })?;
        r.ok_or(HubError::ChannelLimit)
    }

    /// Registers `conn` as a subscriber of `ch` owed messages from `next` (live when
    /// nothing is owed) and emits the channel's events. Under the channel's lock.
    fn join(&self, conn: &Arc<Connection>, ch: &Channel, st: &mut ChannelState, next: u64) {
        let live = next > st.last;
        st.subs.insert(
            conn.seq(),
            Sub {
                conn: conn.clone(),
                next,
                live,
            },
        );
        *st.clients.entry(conn.client_id_arc().clone()).or_insert(0) += 1;
        conn.channels.lock().push(ch.name.clone());
        if !live {
            conn.catching.lock().push(ch.name.clone());
        }
        let f = EventFields {
            client_id: Some(conn.client_id()),
            conn_id: Some(conn.id()),
            channel: Some(&ch.name),
            ..Default::default()
        };
        let events = &self.inner.events;
        if st.subs.len() == 1 {
            events.emit(
                EventType::ChannelOccupied,
                EventFields {
                    client_id: None,
                    conn_id: None,
                    ..f.clone()
                },
            );
        }
        events.emit(EventType::SubscriptionAdded, f);
        self.changed(&ch.name);
    }

    /// Ends `conn`'s subscription to `channel`. Waits for a publish in progress on
    /// the channel: a message it is still writing directly must not reach `conn`
    /// after the `unsubscribed` reply. (A closing connection does not wait: nothing
    /// is read after its close.)
    pub fn unsubscribe(&self, conn: &Arc<Connection>, channel: &str) -> Result<(), HubError> {
        self.unsubscribe_if(conn, channel, true)
            .unwrap_or(Err(HubError::NotSubscribed))
    }

    /// [`unsubscribe`](Self::unsubscribe) unless the channel is being fanned out to
    /// right now (its publishing lock is held): then `None`, and nothing changed. A
    /// caller on a runtime worker tries this first and waits elsewhere on `None`.
    pub fn try_unsubscribe(
        &self,
        conn: &Arc<Connection>,
        channel: &str,
    ) -> Option<Result<(), HubError>> {
        self.unsubscribe_if(conn, channel, false)
    }

    /// Unsubscribes under the channel's publishing lock (so no message written
    /// directly arrives after it), waiting for that lock only when `wait`.
    fn unsubscribe_if(
        &self,
        conn: &Arc<Connection>,
        channel: &str,
        wait: bool,
    ) -> Option<Result<(), HubError>> {
        let removed = match self.channel(channel, false) {
            Ok(Some(ch)) => {
                let _publishing = if wait {
                    ch.publishing.lock()
                } else {
                    ch.publishing.try_lock()?
                };
                let mut st = ch.state.lock();
                // A channel the cleanup removed had no subscriber left.
                !st.removed && self.remove_sub(conn, &ch, &mut st)
            }
            _ => false,
        };
        if !removed {
            return Some(Err(HubError::NotSubscribed));
        }
        conn.channels.lock().retain(|c| &**c != channel);
        conn.catching.lock().retain(|c| &**c != channel);
        Some(Ok(()))
    }

    /// How many connections a publish to `channel` would reach now (0 for a channel
    /// with no state).
    pub fn fanout_size(&self, channel: &str) -> usize {
        self.with_channel(channel, false, |_, st| st.subs.len())
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    fn remove_sub(&self, conn: &Connection, ch: &Channel, st: &mut ChannelState) -> bool {
        if st.subs.remove(&conn.seq()).is_none() {
            return false;
        }
        if let Some(n) = st.clients.get_mut(conn.client_id()) {
            *n -= 1;
            if *n == 0 {
                st.clients.remove(conn.client_id());
            }
        }
        let f = EventFields {
            client_id: Some(conn.client_id()),
            conn_id: Some(conn.id()),
            channel: Some(&ch.name),
            ..Default::default()
        };
        self.inner
            .events
            .emit(EventType::SubscriptionRemoved, f.clone());
        self.changed(&ch.name);
        if st.subs.is_empty() {
            self.inner.events.emit(
                EventType::ChannelVacated,
                EventFields {
                    client_id: None,
                    conn_id: None,
                    ..f
                },
            );
        }
        true
    }

    /// Ends every subscription of `conn` (it is being released).
    pub fn remove_connection(&self, conn: &Connection) {
        let chans: Vec<Arc<str>> = std::mem::take(&mut *conn.channels.lock());
        conn.catching.lock().clear();
        for c in chans {
            let _ = self.with_channel(&c, false, |ch, st| self.remove_sub(conn, ch, st));
        }
    }

    /// Pushes the next history pages of `conn`'s catching-up subscriptions while its
    /// outbox has room; flips each to live once it reaches the head.
    pub fn catch_up(&self, conn: &Arc<Connection>) -> CatchUp {
        let catching: Vec<Arc<str>> = conn.catching.lock().clone();
        let mut result = CatchUp::Live;
        for name in catching {
            let room = conn.outbox().room();
            if room < PAGE.min(conn.outbox_capacity() / 2).max(1) {
                return CatchUp::More;
            }
            let step = self
                .with_channel(&name, false, |_, st| {
                    let last = st.last;
                    let oldest = st.history.front().map_or(last + 1, |p| p.offset);
                    let Some(sub) = st.subs.get(&conn.seq()) else {
                        return Step::Done;
                    };
                    let next = sub.next;
                    if next < oldest {
                        return Step::Lost;
                    }
                    let skip = (next - oldest) as usize;
                    let Some(page) = page_within(st, skip, room.min(PAGE), conn.outbox()) else {
                        // The next message is larger than an empty outbox holds.
                        return Step::Lost;
                    };
                    let sent = page.len() as u64;
                    if !page
                        .into_iter()
                        .all(|p| conn.outbox().push(Outgoing::Message(p)))
                    {
                        return Step::Lost;
                    }
                    self.inner.metrics.delivered(sent);
                    let Some(sub) = st.subs.get_mut(&conn.seq()) else {
                        return Step::Done;
                    };
                    sub.next += sent;
                    sub.live = sub.next > last;
                    if sub.live {
                        Step::Done
                    } else {
                        Step::More
                    }
                })
                .ok()
                .flatten()
                .unwrap_or(Step::Done);
            match step {
                Step::Lost => return CatchUp::Lost,
                Step::Done => conn.catching.lock().retain(|c| *c != name),
                Step::More => result = CatchUp::More,
            }
        }
        result
    }

    /// History of `channel` after `since` (exclusive), at most `limit`: the epoch and
    /// the messages. `None` when the channel has no state on this node.
    pub fn history(
        &self,
        channel: &str,
        since: Option<&Position>,
        limit: usize,
    ) -> Option<(String, Vec<Arc<Published>>)> {
        let settings = &self.inner.settings;
        self.with_channel(channel, false, |_, st| {
            expire(st, settings, Instant::now());
            let after = match since {
                Some(p) if p.epoch == st.epoch => p.offset,
                _ => 0,
            };
            let msgs = st
                .history
                .iter()
                .filter(|p| p.offset > after)
                .take(limit)
                .cloned()
                .collect();
            (st.epoch.clone(), msgs)
        })
        .ok()
        .flatten()
    }

    /// Occupied channels: `(name, subscribers, clients)`.
    pub fn channels(&self) -> Vec<(String, usize, usize)> {
        let all: Vec<Arc<Channel>> = self.inner.channels.lock().values().cloned().collect();
        let mut out: Vec<(String, usize, usize)> = all
            .iter()
            .filter_map(|c| {
                let st = c.state.lock();
                (!st.subs.is_empty()).then(|| (c.name.to_string(), st.subs.len(), st.clients.len()))
            })
            .collect();
        out.sort();
        out
    }

    /// Presence: clients subscribed to `channel` with their connection counts.
    pub fn presence(&self, channel: &str) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .with_channel(channel, false, |_, st| {
                st.clients
                    .iter()
                    .map(|(k, n)| (k.to_string(), *n))
                    .collect()
            })
            .ok()
            .flatten()
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Removes channels with no subscriber and no unexpired history. Run
    /// periodically; returns how many were removed.
    pub fn sweep(&self) -> usize {
        let settings = &self.inner.settings;
        let now = Instant::now();
        let mut map = self.inner.channels.lock();
        let before = map.len();
        map.retain(|_, ch| {
            let Some(mut st) = ch.state.try_lock() else {
                return true;
            };
            expire(&mut st, settings, now);
            if st.subs.is_empty() && st.history.is_empty() {
                st.removed = true;
                false
            } else {
                true
            }
        });
        before - map.len()
    }
}

/// Where a subscriber resuming from `since` starts: whether its gap is recovered
/// (`since` in this epoch, and nothing after it expired), and the first offset it
/// is owed.
fn start_of(st: &ChannelState, since: Option<&Position>) -> (bool, u64) {
    let latest = st.last;
    let oldest = st.history.front().map_or(latest + 1, |p| p.offset);
    match since {
        Some(p) if p.epoch == st.epoch && p.offset <= latest && p.offset + 1 >= oldest => {
            (true, p.offset + 1)
        }
        _ => (false, latest + 1),
    }
}

fn expire(st: &mut ChannelState, settings: &HubSettings, now: Instant) {
    while st
        .history
        .front()
        .is_some_and(|p| now.duration_since(p.at) > settings.history_ttl)
    {
        st.history.pop_front();
    }
    while st.idem_order.front().is_some_and(|k| {
        st.idem
            .get(k)
            .is_none_or(|(_, at)| now.duration_since(*at) > settings.history_ttl)
    }) {
        if let Some(k) = st.idem_order.pop_front() {
            st.idem.remove(&k);
        }
    }
}

/// JSON text on one line: an SSE `data:` line must not contain a line break, and
/// whitespace between JSON tokens may. Valid JSON has line breaks only there, so
/// re-serializing it compactly changes nothing else.
pub fn one_line(data: &str) -> std::borrow::Cow<'_, str> {
    if !data.contains(['\n', '\r']) {
        return std::borrow::Cow::Borrowed(data);
    }
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(v) => std::borrow::Cow::Owned(v.to_string()),
        Err(_) => std::borrow::Cow::Owned(data.replace(['\n', '\r'], " ")),
    }
}

fn new_epoch() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..8)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

fn encode(
    channel: Arc<str>,
    id: String,
    offset: u64,
    position: String,
    data: &str,
    at: Instant,
) -> Published {
    let ch = serde_json::to_string(&*channel).unwrap_or_default();
    let body = format!(r#""channel":{ch},"id":"{id}","position":"{position}","data":{data}}}"#);
    let json = format!(r#"{{"type":"message",{body}"#);
    let sse = format!("event: message\ndata: {{{body}\n\n");
    let frame = Bytes::from(wire::text_frame(json.as_bytes()));
    Published {
        channel,
        id,
        offset,
        position,
        data: data.into(),
        json: frame.slice(wire::payload_offset(&frame)..),
        frame,
        sse: Bytes::from(sse),
        at,
    }
}

/// Encodes a direct message carrying the JSON `data`.
pub fn encode_direct(data: &str) -> Direct {
    let data = one_line(data);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let body = format!(r#""id":"{id}","data":{data}}}"#);
    Direct {
        frame: Bytes::from(wire::text_frame(
            format!(r#"{{"type":"direct",{body}"#).as_bytes(),
        )),
        sse: Bytes::from(format!("event: direct\ndata: {{{body}\n\n")),
    }
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
