//! The node's pub/sub as one stream of [`Event`]s, whatever the topology: on one
//! Redis, the subscriber client's messages and reconnects; on a Redis Cluster, every
//! shard's subscriber forwarded into one channel by a task per shard ([`forward`]).
//! A reader that fell behind, or a shard subscriber that reconnected (and
//! subscribed again, in its forwarding task), becomes [`Event::Resync`]: something
//! may have been missed. One Redis's reconnect is [`Event::Reconnected`]: the
//! delivery task subscribes again itself ([`Events::resubscribe`]), so that `next`
//! stays cancel-safe.

use fred::clients::SubscriberClient;
use fred::interfaces::EventInterface;
use fred::types::Message;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

/// What the broker's delivery task hears.
#[derive(Clone, Debug)]
pub enum Event {
    /// A pub/sub message.
    Message(Message),
    /// Messages may have been lost (a reader behind, a shard's subscriber
    /// reconnected and subscribed again): compare heads.
    Resync,
    /// The subscriber (one Redis) reconnected: [`Events::resubscribe`], then
    /// compare heads.
    Reconnected,
    /// A Redis Cluster's slot map changed: follow every channel on the primary that
    /// owns it now, then compare heads.
    Moved,
    /// The link stopped.
    Closed,
}

/// The node's pub/sub (see the module's text).
#[derive(Debug)]
pub enum Events {
    /// One Redis: its subscriber client's own receivers.
    Single {
        /// The subscriber (re-subscribed on a reconnect before `Resync`).
        sub: SubscriberClient,
        /// Its messages.
        messages: broadcast::Receiver<Message>,
        /// Its reconnects.
        reconnects: broadcast::Receiver<fred::types::config::Server>,
    },
    /// A Redis Cluster: every shard's, forwarded.
    Merged(broadcast::Receiver<Event>),
}

impl Events {
    /// The next event (cancel-safe: nothing is lost if the future is dropped).
    pub async fn next(&mut self) -> Event {
        match self {
            Events::Single {
                messages,
                reconnects,
                ..
            } => tokio::select! {
                m = messages.recv() => received(m),
                r = reconnects.recv() => match r {
                    Err(RecvError::Closed) => Event::Closed,
                    _ => Event::Reconnected,
                },
            },
            Events::Merged(rx) => match rx.recv().await {
                Ok(e) => e,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "redis broker: pub/sub reader fell behind");
                    Event::Resync
                }
                Err(RecvError::Closed) => Event::Closed,
            },
        }
    }

    /// After [`Event::Reconnected`]: subscribes every followed channel again,
    /// before the heads are read (nothing falls between).
    pub async fn resubscribe(&self) {
        if let Events::Single { sub, .. } = self {
            resubscribe(sub).await;
        }
    }
}

fn received(m: Result<Message, RecvError>) -> Event {
    match m {
        Ok(m) => Event::Message(m),
        Err(RecvError::Lagged(missed)) => {
            tracing::warn!(missed, "redis broker: pub/sub reader fell behind");
            Event::Resync
        }
        Err(RecvError::Closed) => Event::Closed,
    }
}

/// Subscribes `sub`'s channels again (fred tracks them).
async fn resubscribe(sub: &SubscriberClient) {
    if let Err(e) = sub.resubscribe_all().await {
        tracing::warn!(error = %e, "redis broker: re-subscribe failed");
    }
}

/// Forwards one shard subscriber's messages and reconnects to `to` until `stop`
/// (the link stops) or the client's notifications close.
pub(super) async fn forward(
    sub: SubscriberClient,
    to: broadcast::Sender<Event>,
    stop: CancellationToken,
) {
    let mut messages = sub.message_rx();
    let mut reconnects = sub.reconnect_rx();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            m = messages.recv() => received(m),
            r = reconnects.recv() => {
                if matches!(r, Err(RecvError::Closed)) {
                    return;
                }
                resubscribe(&sub).await;
                Event::Resync
            }
        };
        if matches!(event, Event::Closed) {
            return;
        }
        // No receiver yet (the broker has not started): nothing to deliver to.
        let _ = to.send(event);
    }
}
