//! Delivery: every message of a followed channel arrives on pub/sub (this node's
//! own publishes too) and goes to the hub, which takes it only as the channel's next
//! offset. A hole (pub/sub dropped messages across a reconnect, or this task fell
//! behind) is filled from the channel's stream first, in order; what the stream no
//! longer holds is jumped over loudly ([`Hub::jump`](tether_core::Hub::jump)). After
//! a reconnect, and whenever it may have missed something, the task compares every
//! followed channel's head in Redis with the hub's and fills the difference.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::ClientLike;
use fred::types::Message;
use tether_core::broker::INLINE_FANOUT;
use tether_core::{BrokerError, Delivery, Followed, Incoming};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::scripts::{self, Range, Want};
use super::Shared;
use crate::link::pubsub::Event;

/// Messages waiting for one delivery worker; a full queue holds the reader back,
/// and a reader held back long enough lags (see [`run`]).
const WORKER_QUEUE: usize = 1024;

/// The delivery task: reads pub/sub until `stop` and hands each message to one of
/// a few workers, always the same for a channel (its messages stay in order; a
/// busy channel's fan-out or a hole being filled does not hold up the others).
pub(super) async fn run(s: Arc<Shared>, stop: CancellationToken) {
    let mut events = s.link.events();
    let mut up = s.link.watch_up();
    let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let (queues, inboxes): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| mpsc::channel::<Message>(WORKER_QUEUE))
        .unzip();
    let workers = spawn_workers(s.clone(), inboxes);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            e = events.next() => match e {
                Event::Message(m) => {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    m.channel.hash(&mut h);
                    if queues[h.finish() as usize % n].send(m).await.is_err() {
                        break;
                    }
                }
                Event::Reconnected => {
                    events.resubscribe().await;
                    resync_all(&s).await;
                }
                Event::Resync => resync_all(&s).await,
                Event::Moved => {
                    s.follower.refollow().await;
                    resync_all(&s).await;
                }
                Event::Closed => break,
            },
            c = up.changed() => {
                if c.is_err() {
                    break;
                }
                if *up.borrow_and_update() {
                    resync_all(&s).await;
                }
            }
        }
    }
    drop(queues);
    if let Some(done) = workers {
        let _ = done.await;
    }
}

/// Runs the workers on a thread and a runtime of their own, as the API does: on the
/// connections' runtime a worker waits behind every connection task its last message
/// woke, so it hands the hub one message per round of wake-ups and every connection
/// writes one frame per wake-up (9-14 µs a delivery). Here the next messages reach
/// the outboxes while the connections are still writing, and each connection writes
/// what piled up in one go, as with the in-memory broker's publisher. Resolves once
/// every worker has ended (their queues closed); `None` if the thread cannot start.
fn spawn_workers(
    s: Arc<Shared>,
    inboxes: Vec<mpsc::Receiver<Message>>,
) -> Option<tokio::sync::oneshot::Receiver<()>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("tether-delivery".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(futures_util::future::join_all(
                    inboxes.into_iter().map(|rx| worker(s.clone(), rx)),
                )),
                Err(e) => {
                    tracing::error!(error = %e, "redis broker: cannot start the delivery runtime");
                    Vec::new()
                }
            };
            let _ = done_tx.send(());
        });
    match thread {
        Ok(_) => Some(done_rx),
        Err(e) => {
            tracing::error!(error = %e, "redis broker: cannot start the delivery thread");
            None
        }
    }
}

/// Delivers the messages of its channels, in the order they arrive.
async fn worker(s: Arc<Shared>, mut rx: mpsc::Receiver<Message>) {
    while let Some(m) = rx.recv().await {
        on_message(&s, &m).await;
    }
}

/// A message as pub/sub carries it: `epoch \n offset \n id \n at_ms \n data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    epoch: String,
    offset: u64,
    id: String,
    at_ms: u64,
    data: String,
}

impl Payload {
    /// Parses a pub/sub payload; `None` if it is not one of ours.
    pub fn parse(text: &str) -> Option<Self> {
        let mut it = text.splitn(5, '\n');
        let epoch = it.next()?.to_owned();
        let offset = it.next()?.parse().ok()?;
        let id = it.next()?.to_owned();
        let at_ms = it.next()?.parse().ok()?;
        let data = it.next()?.to_owned();
        Some(Self {
            epoch,
            offset,
            id,
            at_ms,
            data,
        })
    }

    fn incoming(&self) -> Incoming<'_> {
        Incoming {
            epoch: &self.epoch,
            offset: self.offset,
            id: &self.id,
            data: &self.data,
            age: scripts::age(self.at_ms),
        }
    }
}

/// The channel a pub/sub name belongs to (see [`Keys::channel_pubsub`]).
///
/// [`Keys::channel_pubsub`]: crate::Keys::channel_pubsub
fn channel_of<'a>(prefix: &str, pubsub: &'a str) -> Option<&'a str> {
    pubsub
        .strip_prefix(prefix)?
        .strip_prefix(":{")?
        .strip_suffix("}:pub")
}

async fn on_message(s: &Shared, m: &Message) {
    let Some(channel) = channel_of(s.link.keys().prefix(), &m.channel) else {
        return;
    };
    let Some(p) = m.value.as_str().and_then(|t| Payload::parse(&t)) else {
        tracing::warn!(
            channel,
            "redis broker: a pub/sub message not in Tether's form"
        );
        return;
    };
    deliver(s, channel, &p).await;
}

/// Delivers `p` to the hub in order, filling a hole before it first.
async fn deliver(s: &Shared, channel: &str, p: &Payload) {
    let m = p.incoming();
    // A hole is filled (or jumped) once, then the message goes in; a third turn
    // would only mean the channel moved on meanwhile.
    for _ in 0..3 {
        let create = s.follower.is_followed(channel);
        match hub_deliver(s, channel, p, create).await {
            Some(Delivery::Gap { from }) => {
                match fill(s, channel, m.epoch, from, m.offset - 1).await {
                    Fill::Done => {}
                    Fill::Missing => s.hub.jump(channel, m.epoch, m.offset - 1),
                    // Redis is unreachable: the resync once it is back fills it.
                    Fill::Failed => return,
                }
            }
            _ => return,
        }
    }
}

/// [`Hub::deliver`](tether_core::Hub::deliver), on a blocking thread for a large
/// fan-out (as the in-memory broker's publish).
async fn hub_deliver(s: &Shared, channel: &str, p: &Payload, create: bool) -> Option<Delivery> {
    if s.hub.fanout_size(channel) <= INLINE_FANOUT {
        return s.hub.deliver(channel, &p.incoming(), create).ok();
    }
    let (hub, channel, p) = (s.hub.clone(), channel.to_owned(), p.clone());
    tokio::task::spawn_blocking(move || hub.deliver(&channel, &p.incoming(), create).ok())
        .await
        .ok()
        .flatten()
}

/// How a fill went.
enum Fill {
    /// The hub has every message up to the one wanted.
    Done,
    /// The stream no longer holds some of them.
    Missing,
    /// Redis did not answer.
    Failed,
}

/// Delivers `from..=to` of `epoch` to the hub from the channel's stream.
async fn fill(s: &Shared, channel: &str, epoch: &str, from: u64, to: u64) -> Fill {
    let want = Want {
        epoch,
        first: from,
        last: to,
        count: ((to + 1).saturating_sub(from) as usize).min(s.history_size),
        create: None,
    };
    let range = match scripts::range(
        &s.link.channel_commands(channel),
        s.link.keys(),
        channel,
        want,
    )
    .await
    {
        Ok(Some(r)) if r.epoch == epoch => r,
        Ok(_) => return Fill::Missing,
        Err(e) => {
            tracing::warn!(error = %e, channel, "redis broker: reading a hole failed");
            return Fill::Failed;
        }
    };
    let mut filled = 0;
    for e in range.entries {
        let p = Payload {
            epoch: range.epoch.clone(),
            offset: e.offset,
            id: e.id,
            at_ms: e.at_ms,
            data: e.data,
        };
        if let Some(Delivery::Gap { .. }) = hub_deliver(s, channel, &p, false).await {
            s.hub.jump(channel, epoch, p.offset - 1);
            hub_deliver(s, channel, &p, false).await;
        }
        filled += 1;
    }
    s.hub.metrics().gaps_filled(filled);
    match s.hub.head(channel) {
        Some(h) if h.epoch == epoch && h.last >= to => Fill::Done,
        Some(_) => Fill::Missing,
        None => Fill::Done,
    }
}

/// Brings the hub's `channel` to Redis's head (`epoch`, `last`), filling what it
/// lacks from the stream. `Unavailable` if Redis stopped answering meanwhile.
pub(super) async fn catch_up_head(
    s: &Shared,
    channel: &str,
    epoch: &str,
    last: u64,
) -> Result<(), BrokerError> {
    match s
        .hub
        .follow(channel, epoch, last)
        .map_err(BrokerError::Hub)?
    {
        Followed::Current => Ok(()),
        Followed::Gap { from, to } => match fill(s, channel, epoch, from, to).await {
            Fill::Done => Ok(()),
            Fill::Missing => {
                s.hub.jump(channel, epoch, to);
                Ok(())
            }
            Fill::Failed => Err(BrokerError::Unavailable),
        },
    }
}

/// Compares every followed channel's head with the hub's and fills the difference.
/// A channel whose shard is not connected is skipped (its shard's reconnect brings
/// a resync of its own); the others go on when one fails.
async fn resync_all(s: &Shared) {
    for channel in s.follower.followed() {
        let client = s.link.channel_commands(&channel);
        if !client.is_connected() {
            continue;
        }
        let want = Want::default();
        match scripts::range(&client, s.link.keys(), &channel, want).await {
            Ok(Some(r)) => {
                let _ = catch_up_head(s, &channel, &r.epoch, r.last).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, channel = &*channel, "redis broker: resync failed; retried when Redis is back");
                // One Redis: the others would fail (or wait) the same way.
                if !s.link.is_cluster() {
                    return;
                }
            }
        }
    }
}

/// The messages of `range` as the hub takes them, leaving out those older than
/// `ttl` (`history.ttl_ms` holds per message, as in the in-memory broker).
pub fn incoming(range: &Range, ttl: Duration) -> Vec<Incoming<'_>> {
    range
        .entries
        .iter()
        .map(|e| Incoming {
            epoch: &range.epoch,
            offset: e.offset,
            id: &e.id,
            data: &e.data,
            age: e.age(),
        })
        .filter(|m| m.age <= ttl)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_round_trips_with_line_breaks_in_data() {
        let p = Payload::parse("ab12cd34\n7\nid1\n1700000000000\n{\"a\":\"x\\ny\"}\n").unwrap();
        assert_eq!(p.epoch, "ab12cd34");
        assert_eq!(p.offset, 7);
        assert_eq!(p.id, "id1");
        assert_eq!(p.at_ms, 1_700_000_000_000);
        assert_eq!(p.data, "{\"a\":\"x\\ny\"}\n");
        assert!(Payload::parse("ab\nnot-a-number\nid\n1\n{}").is_none());
        assert!(Payload::parse("ab\n1\nid").is_none());
    }

    #[test]
    fn pubsub_names_map_back_to_their_channel() {
        let k = crate::Keys::new("tether");
        let name = k.channel_pubsub("chat:room/1");
        assert_eq!(channel_of("tether", &name), Some("chat:room/1"));
        assert_eq!(channel_of("other", &name), None);
        assert_eq!(channel_of("tether", "tether:{n:x}:control"), None);
    }
}
