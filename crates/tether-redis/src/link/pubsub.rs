//! The node's pub/sub as one stream of [`Event`]s, whatever the topology: on one
//! Redis, the subscriber client's messages and reconnects; on a Redis Cluster, every
//! shard's subscriber forwarded into one channel by a task per shard ([`forward`]).
//! A reconnect (after its channels were subscribed again) or a reader that fell
//! behind becomes [`Event::Resync`]: something may have been missed.

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
    /// Messages may have been lost (a reconnect, a reader behind): compare heads.
    Resync,
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
    /// The next event.
    pub async fn next(&mut self) -> Event {
        match self {
            Events::Single {
                sub,
                messages,
                reconnects,
            } => tokio::select! {
                m = messages.recv() => received(m),
                r = reconnects.recv() => {
                    if matches!(r, Err(RecvError::Closed)) {
                        return Event::Closed;
                    }
                    resubscribe(sub).await;
                    Event::Resync
                }
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

/// Subscribed again before the heads are read: nothing falls between.
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
