//! The lifecycle event bus. `emit` is synchronous and never blocks: it logs the
//! event (one `tracing` line per transition) and hands it to a bounded broadcast
//! channel. A subscriber that falls more than the channel's capacity behind loses
//! the oldest events and is told how many (`RecvError::Lagged`).
//!
//! A bus may also have one [`EventSink`] (the webhook queue): unlike the broadcast it
//! is offered every event of the types it wants, in emission order, and decides
//! itself what happens when it is full (it counts and logs; it never blocks).

use std::sync::Arc;

use tether_protocol::{EventType, LifecycleEvent};
use tokio::sync::broadcast;

/// How many events a slow `/api/events` reader may fall behind before it lags.
pub const EVENT_BUFFER: usize = 4096;

/// The bus: a cheap clone handle.
#[derive(Clone, Debug)]
pub struct EventBus {
    node_id: Arc<str>,
    tx: broadcast::Sender<Arc<LifecycleEvent>>,
    /// The one non-lossy consumer, if any (the webhook queue).
    sink: Option<Arc<dyn EventSink>>,
}

/// A consumer that is offered every event of the types it wants, in the order they
/// are emitted. `offer` is called under the registry's and the channels' locks: it
/// must not block, await or make a syscall (a bounded queue push, at most).
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Whether events of `kind` are wanted (the others are not even built for it).
    fn wants(&self, kind: EventType) -> bool;
    /// Takes one event; when full, the sink drops and counts it itself.
    fn offer(&self, event: Arc<LifecycleEvent>);
}

/// The details of an event other than its type.
#[derive(Clone, Debug, Default)]
pub struct EventFields<'a> {
    /// The client concerned.
    pub client_id: Option<&'a str>,
    /// The connection concerned.
    pub conn_id: Option<&'a str>,
    /// The channel concerned.
    pub channel: Option<&'a str>,
    /// A close code.
    pub code: Option<u16>,
    /// A close reason.
    pub reason: Option<&'a str>,
    /// A duration.
    pub duration_ms: Option<u64>,
    /// A proxied connection's upstream.
    pub upstream: Option<&'a str>,
}

impl EventBus {
    /// A bus for `node_id`.
    pub fn new(node_id: Arc<str>) -> Self {
        let (tx, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            node_id,
            tx,
            sink: None,
        }
    }

    /// The same bus, also offering every event `sink` wants to it.
    pub fn with_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// A new receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LifecycleEvent>> {
        self.tx.subscribe()
    }

    /// Records one transition: logs it and broadcasts it.
    pub fn emit(&self, kind: EventType, f: EventFields<'_>) {
        tracing::info!(
            target: "tether::event",
            event = kind.as_str(),
            client_id = f.client_id,
            conn_id = f.conn_id,
            channel = f.channel,
            code = f.code,
            reason = f.reason,
            duration_ms = f.duration_ms,
            upstream = f.upstream,
        );
        // Nobody listening (no `/api/events` stream, no sink for this type): nothing
        // to build. A receiver that subscribes meanwhile gets the events emitted after.
        let sink = self.sink.as_ref().filter(|s| s.wants(kind));
        if self.tx.receiver_count() == 0 && sink.is_none() {
            return;
        }
        let event = LifecycleEvent {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            at: crate::rfc3339_now(),
            node_id: self.node_id.to_string(),
            client_id: f.client_id.map(str::to_owned),
            conn_id: f.conn_id.map(str::to_owned),
            channel: f.channel.map(str::to_owned),
            code: f.code,
            reason: f.reason.map(str::to_owned),
            duration_ms: f.duration_ms,
            upstream: f.upstream.map(str::to_owned),
        };
        let event = Arc::new(event);
        if let Some(sink) = sink {
            sink.offer(event.clone());
        }
        // A receiver may have gone since: not an error, the event was logged.
        let _ = self.tx.send(event);
    }
}
