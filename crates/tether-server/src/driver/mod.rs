//! The one connection driver. Every admitted connection — WebSocket, SSE, proxied
//! WebSocket, proxied SSE — runs [`drive`]: one `select!` over the hard stop, the
//! connection's close requests, its outbox, its [`Deadlines`] and whatever its
//! [`Transport`] hears, with every future made once. Heartbeats, lifetime, token
//! expiry, the inbound rate and the close sequence live here, once; a transport only
//! moves bytes (write a batch, next inbound, ping, finish). How a connection ends is
//! an [`End`]; [`settle`] is the one table from that to a close code per [`Family`].
//!
//! Lifetimes: `drive` owns the [`ConnectionGuard`] and the transport. It leaves the
//! loop on the first `End`, records the close on the guard, lets the transport say
//! goodbye (bounded, and cut short by the hard stop), then drops the transport (the
//! sockets) and the guard (the release), in that order.

mod ctx;
mod deadlines;
mod ending;

use std::future::Future;
use std::sync::Arc;

use tether_core::{CatchUp, Connection, ConnectionGuard, Outgoing};
use tokio::time::Instant;

pub(crate) use ctx::Ctx;
pub(crate) use deadlines::{Deadlines, Due, InboundRate};
pub(crate) use ending::{settle, End, Ending, Family, ToClient, ToUpstream};

/// A connection's legs: the client, and for proxied connections the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leg {
    /// The peer that connected to Tether.
    Client = 0,
    /// The service a proxy route fronts.
    Upstream = 1,
}

/// Something a transport heard from one of its legs.
pub(crate) struct Heard<I> {
    /// The leg it came from (it is alive: it owes no answer to a ping now).
    pub(crate) leg: Leg,
    /// Whether it counts against `limits.max_inbound_per_sec`.
    pub(crate) counts: bool,
    /// What it was.
    pub(crate) item: I,
}

/// What the driver lends a transport while it acts on what it heard.
pub(crate) struct Cx<'a> {
    /// What the driver uses of the server.
    pub(crate) ctx: &'a Ctx,
    /// The connection.
    pub(crate) conn: &'a Arc<Connection>,
    /// Its deadlines (a `refresh` moves the expiry; a relay's wait pauses heartbeats).
    pub(crate) deadlines: &'a mut Deadlines,
}

/// One way of carrying a connection. Every method is cancel-safe where the driver
/// may drop it: [`Transport::next`] (in the `select!`) and the writes (cut short by
/// an outbox overflow).
pub(crate) trait Transport: Send {
    /// What [`Transport::next`] hears.
    type Inbound: Send;
    /// The close vocabulary of its client.
    const FAMILY: Family;
    /// Which legs answer pings, `[client, upstream]`.
    const ANSWERS_PINGS: [bool; 2];
    /// Turns of the runtime's queue to give a burst before taking a batch.
    const GATHER: u8 = 0;

    /// Sends what goes first (a welcome); the default sends nothing.
    fn start(
        &mut self,
        _ctx: &Ctx,
        _conn: &Arc<Connection>,
    ) -> impl Future<Output = Result<(), End>> + Send {
        async { Ok(()) }
    }
    /// Writes a batch taken from the outbox (and counts the bytes).
    fn write(
        &mut self,
        conn: &Connection,
        batch: &[Outgoing],
    ) -> impl Future<Output = Result<(), End>> + Send;
    /// The next thing a leg did.
    fn next(&mut self) -> impl Future<Output = Heard<Self::Inbound>> + Send;
    /// Acts on it; `Some` ends the connection.
    fn on_inbound(
        &mut self,
        cx: Cx<'_>,
        item: Self::Inbound,
    ) -> impl Future<Output = Option<End>> + Send;
    /// Sends a heartbeat on every leg that takes one.
    fn ping(&mut self, conn: &Connection) -> impl Future<Output = Result<(), End>> + Send;
    /// Says goodbye as `ending` says, after `queued` (what the outbox held, when the
    /// close follows the queue). Bounded in time by the transport itself.
    fn finish(
        self,
        ctx: &Ctx,
        conn: &Connection,
        ending: &Ending,
        queued: Vec<Outgoing>,
    ) -> impl Future<Output = ()> + Send;
}

/// Runs a committed connection until it ends, then releases it.
///
/// Not an `async fn`: an async fn keeps its arguments in its state beside the locals
/// they move into, and this future is what every connection holds for its whole
/// life. The block below uses what it captured in place; the close sequence is a
/// boxed future that exists only while it runs.
#[allow(clippy::manual_async_fn)] // on purpose: see above (idle memory per connection)
pub(crate) fn drive<T: Transport>(
    ctx: Arc<Ctx>,
    guard: ConnectionGuard,
    mut transport: T,
    mut deadlines: Deadlines,
) -> impl Future<Output = ()> + Send {
    async move {
        let conn = guard.conn().clone();
        let end = run(&ctx, &conn, &mut transport, &mut deadlines).await;
        Box::pin(close(ctx, guard, transport, conn, end)).await;
    }
}

/// The close sequence: seal the outbox, record the close, let the transport say
/// goodbye (after the queue, unless the code drops it), bounded and cut short by
/// the hard stop; then drop the transport (the sockets) and the guard (the release).
async fn close<T: Transport>(
    ctx: Arc<Ctx>,
    mut guard: ConnectionGuard,
    transport: T,
    conn: Arc<Connection>,
    end: End,
) {
    conn.outbox().seal();
    end.count(guard.metrics());
    let ending = settle(end, T::FAMILY);
    guard.set_close(ending.code, ending.reason.clone());
    let mut queued = Vec::new();
    if let ToClient::Announce(closing) = &ending.client {
        // `closing` follows what is already queued, except for the codes that exist
        // because the queue cannot be delivered.
        if !closing.code.drops_queue() {
            conn.outbox().take(&mut queued);
        }
    }
    let goodbye = transport.finish(&ctx, &conn, &ending, queued);
    tokio::select! {
        _ = goodbye => {}
        _ = ctx.hard_stop.cancelled() => {}
    }
    drop(guard);
}

/// The loop: returns why it ended.
async fn run<T: Transport>(
    ctx: &Ctx,
    conn: &Arc<Connection>,
    t: &mut T,
    deadlines: &mut Deadlines,
) -> End {
    let now = Instant::now();
    let lifetime = match ctx.lifetime_ms {
        0 => None,
        ms => Some(deadlines::jittered(ms)),
    };
    deadlines.committed(now, lifetime);
    let mut rate = InboundRate::new(now, ctx.max_inbound_per_sec);
    let mut batch = Vec::new();
    let mut end = Box::pin(t.start(ctx, conn)).await.err();
    // Replay what a resumed subscription missed.
    if end.is_none() && conn.is_catching_up() {
        end = catch_up(ctx, conn).await;
    }
    let timer = tokio::time::sleep_until(deadlines.next());
    tokio::pin!(timer);
    // Made once, not per turn: every connection's hard-stop waiter sits in the one
    // token's list, and re-registering it on each wake-up would take that list's
    // lock twice per delivery, from every worker.
    let hard_stop = ctx.hard_stop.cancelled();
    tokio::pin!(hard_stop);
    let close_requested = conn.close_requested();
    tokio::pin!(close_requested);
    loop {
        if let Some(e) = end.take() {
            return e;
        }
        // Re-arming moves the timer in the runtime's wheel (a lock): only when the
        // deadline changed (or it fired), not on every message.
        let wake = deadlines.next();
        if wake != timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(wake);
        }
        tokio::select! {
            biased;
            _ = &mut hard_stop => return End::Hard,
            closing = &mut close_requested => return End::Requested(closing),
            _ = conn.outbox().ready() => {
                end = Box::pin(flush(ctx, conn, t, &mut batch)).await;
            }
            _ = &mut timer => {
                end = match deadlines.due(Instant::now()) {
                    None => None,
                    Some(Due::Ping) => Box::pin(t.ping(conn)).await.err(),
                    Some(Due::Silent(leg)) => Some(End::Silent(leg)),
                    Some(Due::UpstreamIdle) => Some(End::UpstreamIdle),
                    Some(Due::Lifetime) => Some(End::Lifetime),
                    Some(Due::TokenExpired) => Some(End::TokenExpired),
                };
            }
            heard = t.next() => {
                let now = Instant::now();
                deadlines.heard(heard.leg, now);
                end = if heard.counts && rate.over(now) {
                    Some(End::RateLimited)
                } else {
                    let cx = Cx { ctx, conn, deadlines: &mut *deadlines };
                    Box::pin(t.on_inbound(cx, heard.item)).await
                };
            }
        }
    }
}

/// Writes everything queued, topping the queue up from history for any
/// subscription still catching up.
async fn flush<T: Transport>(
    ctx: &Ctx,
    conn: &Arc<Connection>,
    t: &mut T,
    batch: &mut Vec<Outgoing>,
) -> Option<End> {
    // Let the rest of a burst catch up before taking (immediate when nothing else
    // is ready).
    for _ in 0..T::GATHER {
        tokio::task::yield_now().await;
    }
    loop {
        batch.clear();
        if conn.outbox().take(batch) {
            return Some(End::QueueFull);
        }
        if batch.is_empty() {
            // Nothing kept while idle.
            *batch = Vec::new();
            return None;
        }
        match conn.outbox().unless_overflowed(t.write(conn, batch)).await {
            None => return Some(End::QueueFull),
            Some(Err(e)) => return Some(e),
            Some(Ok(())) => {}
        }
        if conn.is_catching_up() {
            if let Some(e) = catch_up(ctx, conn).await {
                return Some(e);
            }
        }
    }
}

/// Moves the next page of history into the outbox of a catching-up connection.
async fn catch_up(ctx: &Ctx, conn: &Arc<Connection>) -> Option<End> {
    (ctx.broker.catch_up(conn).await == CatchUp::Lost).then_some(End::FellBehind)
}
