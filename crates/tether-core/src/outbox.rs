//! A connection's outbound queue: bounded by messages and bytes
//! (`delivery.max_queue_messages`, `delivery.max_queue_bytes`). Producers (the hub's
//! fan-out, `/api/send`, the connection's own replies) push without awaiting; a push
//! over either bound marks the outbox overflowed and wakes the connection task,
//! which closes with 4008. The connection task takes everything queued at once and
//! writes it together. An empty outbox holds no buffer.
//!
//! Only the push that finds the queue empty (or overflows it) wakes the task: the
//! task takes everything after waking, so later pushes ride on that wake-up. In a
//! burst, a publish to 10,000 subscribers then costs 10,000 short locks, not 10,000
//! wake-ups.
//!
//! **Direct writes.** A plain-TCP WebSocket [attaches](Outbox::attach) its socket.
//! A publish to a quiet channel then [offers](Outbox::offer) each subscriber its frame:
//! when nothing is queued and the connection task is not writing, the publisher
//! writes the frame to the socket itself (non-blocking) instead of waking the task,
//! which is what a lone message costs most (a wake-up, a poll and a write per
//! subscriber). Every write to an attached socket happens under this outbox's lock,
//! the task's own included ([`poll_task_write`](Outbox::poll_task_write)), so frames
//! never interleave: a direct write that the socket takes only in part leaves its
//! rest (`rest`), which goes out before anything else, and no direct write starts
//! while the task holds taken frames or has written part of one of its own.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::hub::{Direct, Published};

/// The room a queue is given when its first item arrives: about what a connection's
/// task takes per wake-up in a burst.
const FIRST_BATCH: usize = 16;

/// One item waiting to be sent.
#[derive(Clone, Debug)]
pub enum Outgoing {
    /// A channel message, shared by every recipient.
    Message(Arc<Published>),
    /// A direct message (`/api/send`): WebSocket frame and SSE event, encoded once.
    Direct(Arc<Direct>),
    /// A whole WebSocket text frame for this connection only (`subscribed`,
    /// replies); see [`Outgoing::text`].
    Text(Bytes),
}

impl Outgoing {
    /// A connection's own reply: `json` framed as a WebSocket text frame.
    pub fn text(json: &str) -> Self {
        Outgoing::Text(Bytes::from(tether_protocol::wire::text_frame(
            json.as_bytes(),
        )))
    }

    /// The WebSocket frame to write (header included).
    pub fn ws_frame(&self) -> &Bytes {
        match self {
            Outgoing::Message(p) => &p.frame,
            Outgoing::Direct(d) => &d.frame,
            Outgoing::Text(b) => b,
        }
    }

    fn size(&self) -> usize {
        self.ws_frame().len()
    }
}

#[derive(Debug, Default)]
struct State {
    items: Vec<Outgoing>,
    bytes: usize,
    overflowed: bool,
    /// The socket direct writes go to; `None` until attached and after sealing.
    socket: Option<Arc<TcpStream>>,
    /// The unwritten end of a frame a direct write began: goes out before anything.
    rest: Option<Bytes>,
    /// The task took frames and has not come back for more with the queue empty.
    taken: bool,
    /// The task wrote bytes to the socket that it has not flushed (a frame of its own
    /// may be part-written).
    task_io: bool,
}

/// What [`Outbox::offer`] did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Written to the socket whole, by the caller: this many bytes.
    Written(usize),
    /// Queued for the connection task (which was woken if it needed to be).
    Queued,
    /// Over a bound: the outbox overflowed (see [`Outbox::push`]).
    Refused,
}

/// The queue; shared by the registry entry (for producers) and the connection task.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    max_messages: usize,
    max_bytes: usize,
}

impl Outbox {
    /// An empty outbox with these bounds.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            max_messages,
            max_bytes,
        }
    }

    /// Queues `item`; returns `false` (and marks the outbox overflowed) when a bound
    /// would be exceeded. Never blocks beyond a short lock.
    pub fn push(&self, item: Outgoing) -> bool {
        self.queue(self.state.lock(), item)
    }

    /// Like [`push`](Self::push), but when a socket is attached, nothing is queued
    /// and the task is not writing, writes the frame to the socket now (without
    /// blocking) instead of queuing it. A frame the socket takes only in part has its
    /// rest queued ahead of everything, and the task is woken to finish it.
    pub fn offer(&self, item: Outgoing) -> Offered {
        let mut s = self.state.lock();
        let idle = s.items.is_empty() && s.rest.is_none() && !s.taken && !s.task_io;
        if let (true, false, Some(sock)) = (idle, s.overflowed, s.socket.as_ref()) {
            let frame = item.ws_frame();
            match sock.try_write(frame) {
                Ok(n) if n == frame.len() => return Offered::Written(n),
                Ok(n) => {
                    s.rest = Some(frame.slice(n..));
                    drop(s);
                    self.notify.notify_one();
                    return Offered::Written(n);
                }
                // Full socket buffer, or a dead peer the task will find: queue it.
                Err(_) => {}
            }
        }
        if self.queue(s, item) {
            Offered::Queued
        } else {
            Offered::Refused
        }
    }

    fn queue(&self, mut s: parking_lot::MutexGuard<'_, State>, item: Outgoing) -> bool {
        let size = item.size();
        let (ok, wake) = {
            if s.overflowed {
                (false, false)
            } else if s.items.len() >= self.max_messages || s.bytes + size > self.max_bytes {
                s.overflowed = true;
                s.items = Vec::new();
                s.bytes = 0;
                (false, true)
            } else {
                if s.items.capacity() == 0 {
                    // One allocation for a typical batch, not 4 -> 8 -> 16 by doubling
                    // (each a realloc under this lock, during a publish's fan-out).
                    s.items.reserve_exact(FIRST_BATCH.min(self.max_messages));
                }
                s.bytes += size;
                s.items.push(item);
                (true, s.items.len() == 1)
            }
        };
        drop(s);
        if wake {
            self.notify.notify_one();
        }
        ok
    }

    /// Moves everything queued into `out` (after what it holds); returns whether the
    /// outbox overflowed. When `out` comes empty (the task's spent batch, cleared),
    /// the two buffers trade places: while a burst lasts, pushes (made under a
    /// channel's lock during fan-out) and takes allocate nothing. A take that finds
    /// the queue empty lets the queue's buffer go: an idle connection keeps none.
    ///
    /// The rest of a part-written direct write comes first (once overflowed, it is
    /// left for [`claim`](Self::claim)). Until a `take` finds nothing, the task counts
    /// as writing and no direct write starts.
    pub fn take(&self, out: &mut Vec<Outgoing>) -> bool {
        let mut s = self.state.lock();
        if s.overflowed {
            // The connection is closing without its queue: a direct frame's rest
            // stays here for the task's next write (its claim), which must still
            // finish that frame before the close.
            s.taken = true;
            return true;
        }
        if let Some(rest) = s.rest.take() {
            out.push(Outgoing::Text(rest));
        }
        s.taken = !s.items.is_empty() || !out.is_empty();
        if s.items.is_empty() {
            s.items = Vec::new();
            return s.overflowed;
        }
        if out.is_empty() {
            std::mem::swap(&mut s.items, out);
        } else {
            out.append(&mut s.items);
        }
        s.bytes = 0;
        s.overflowed
    }

    /// Gives the outbox the connection's plain TCP socket, for direct writes. From
    /// here on, the task [claims](Self::claim) it before each write of its own.
    pub fn attach(&self, socket: Arc<TcpStream>) {
        let mut s = self.state.lock();
        s.socket = Some(socket);
        // No direct write before the task has written its welcome and come back to
        // an empty queue.
        s.taken = true;
    }

    /// Ends direct writes for good (the task is closing the connection) and lets go
    /// of the socket. A part-written direct frame's rest still goes out first, by
    /// [`take`](Self::take) or by the task's next write.
    pub fn seal(&self) {
        let mut s = self.state.lock();
        s.socket = None;
        s.taken = true;
    }

    /// The task is about to write to the attached socket itself: no direct write
    /// may start until it has [flushed](Self::task_flushed). Returns the rest of a
    /// part-written direct frame, which the task must write before anything else.
    pub fn claim(&self) -> Option<Bytes> {
        let mut s = self.state.lock();
        s.task_io = true;
        s.rest.take()
    }

    /// The task flushed: everything it wrote is on the socket, whole frames only.
    pub fn task_flushed(&self) {
        self.state.lock().task_io = false;
    }

    /// Resolves when the outbox went from empty to non-empty, or overflowed, since the
    /// last wait. A waiter must [`take`](Self::take) until it comes back empty.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Runs `write` (a write of what was taken from this outbox) unless the outbox
    /// overflows meanwhile: a peer that does not read blocks the write, and the
    /// overflow must end the connection at once, not at the write's timeout.
    /// `None` means it overflowed.
    pub async fn unless_overflowed<F: std::future::Future>(&self, write: F) -> Option<F::Output> {
        tokio::pin!(write);
        loop {
            tokio::select! {
                r = &mut write => return Some(r),
                _ = self.ready() => if self.overflowed() { return None },
            }
        }
    }

    /// Free message slots.
    pub fn room(&self) -> usize {
        let s = self.state.lock();
        if s.overflowed {
            0
        } else {
            self.max_messages.saturating_sub(s.items.len())
        }
    }

    /// The bound on messages.
    pub fn capacity(&self) -> usize {
        self.max_messages
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// Whether a push overflowed it.
    pub fn overflowed(&self) -> bool {
        self.state.lock().overflowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_by_count_and_bytes() {
        let o = Outbox::new(2, 10);
        assert!(o.push(Outgoing::Text(Bytes::from_static(b"1234"))));
        assert!(o.push(Outgoing::Text(Bytes::from_static(b"1234"))));
        assert!(!o.push(Outgoing::Text(Bytes::from_static(b"1"))));
        assert!(o.overflowed());
        let o = Outbox::new(10, 10);
        assert!(o.push(Outgoing::Text(Bytes::from_static(b"123456"))));
        assert!(!o.push(Outgoing::Text(Bytes::from_static(b"123456"))));
        let mut v = Vec::new();
        assert!(o.take(&mut v));
    }

    /// While a burst lasts the queue and the task's batch trade buffers (in order, no
    /// item lost); the take that finds nothing leaves the outbox no buffer.
    #[test]
    fn buffers_trade_places_and_go_when_idle() {
        let o = Outbox::new(100, 1 << 20);
        let text = |s: &'static str| Outgoing::Text(Bytes::from_static(s.as_bytes()));
        let frames =
            |v: &[Outgoing]| -> Vec<Bytes> { v.iter().map(|i| i.ws_frame().clone()).collect() };
        for _ in 0..10 {
            o.push(text("a"));
        }
        let mut batch = Vec::new();
        assert!(!o.take(&mut batch));
        assert_eq!(batch.len(), 10);
        let spent = batch.capacity();
        batch.clear();
        o.push(text("b"));
        o.push(text("c"));
        assert!(!o.take(&mut batch));
        assert_eq!(
            frames(&batch),
            [Bytes::from_static(b"b"), Bytes::from_static(b"c")]
        );
        // The queue now holds the spent batch's buffer: the next pushes reuse it.
        assert_eq!(o.state.lock().items.capacity(), spent);
        // A rest of a direct write, then queued items: appended after what `out` holds.
        o.state.lock().rest = Some(Bytes::from_static(b"r"));
        o.push(text("d"));
        batch.clear();
        assert!(!o.take(&mut batch));
        assert_eq!(
            frames(&batch),
            [Bytes::from_static(b"r"), Bytes::from_static(b"d")]
        );
        batch.clear();
        assert!(!o.take(&mut batch));
        assert!(batch.is_empty());
        assert_eq!(
            o.state.lock().items.capacity(),
            0,
            "an idle outbox keeps no buffer"
        );
    }

    /// Only the first push into an empty outbox wakes the taker; what follows rides
    /// on that wake-up, and the next push after a take wakes it again.
    #[tokio::test]
    async fn wakes_once_per_empty_to_non_empty() {
        use std::time::Duration;
        async fn ready(o: &Outbox) -> bool {
            tokio::time::timeout(Duration::from_millis(20), o.ready())
                .await
                .is_ok()
        }
        let o = Outbox::new(100, 1 << 20);
        o.push(Outgoing::Text(Bytes::from_static(b"1")));
        o.push(Outgoing::Text(Bytes::from_static(b"2")));
        o.push(Outgoing::Text(Bytes::from_static(b"3")));
        assert!(ready(&o).await, "the first push wakes");
        assert!(!ready(&o).await, "the next two ride on it");
        let mut v = Vec::new();
        assert!(!o.take(&mut v));
        assert_eq!(v.len(), 3);
        o.push(Outgoing::Text(Bytes::from_static(b"4")));
        assert!(ready(&o).await, "a push after the take wakes again");
        // Overflow always wakes, even into a non-empty outbox.
        let o = Outbox::new(2, 1 << 20);
        o.push(Outgoing::Text(Bytes::from_static(b"1")));
        assert!(ready(&o).await);
        o.push(Outgoing::Text(Bytes::from_static(b"2")));
        assert!(!o.push(Outgoing::Text(Bytes::from_static(b"3"))));
        assert!(ready(&o).await, "overflow wakes");
        assert!(o.overflowed());
    }

    /// Direct writes happen only while the task is idle on an attached socket: not
    /// before its first empty take, not while it holds taken frames or a claim, not
    /// after sealing; and the frame reaches the peer whole.
    #[tokio::test]
    async fn offers_write_directly_only_while_the_task_is_idle() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let frame = || Outgoing::Text(Bytes::from_static(b"\x81\x02hi"));
        let o = Outbox::new(100, 1 << 20);
        assert_eq!(o.offer(frame()), Offered::Queued, "no socket attached");
        let mut v = Vec::new();
        o.take(&mut v);
        o.take(&mut v);
        o.attach(Arc::new(server));
        assert_eq!(
            o.offer(frame()),
            Offered::Queued,
            "attached, welcome not yet done"
        );
        v.clear();
        o.take(&mut v);
        assert_eq!(v.len(), 1);
        assert!(!o.take(&mut v), "an empty take: the task is idle");
        // The socket needs a moment to report writable after the connect.
        let mut written = Offered::Queued;
        for _ in 0..100 {
            written = o.offer(frame());
            if written != Offered::Queued {
                break;
            }
            o.take(&mut Vec::new());
            o.take(&mut Vec::new());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(written, Offered::Written(4));
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x81\x02hi");
        assert_eq!(o.claim(), None);
        assert_eq!(
            o.offer(frame()),
            Offered::Queued,
            "the task claimed the socket"
        );
        o.task_flushed();
        v.clear();
        o.take(&mut v);
        o.take(&mut Vec::new());
        assert_eq!(o.offer(frame()), Offered::Written(4), "idle again");
        o.seal();
        assert_eq!(o.offer(frame()), Offered::Queued, "sealed");
    }

    /// A direct write cut off part-way leaves its rest; when the queue then overflows
    /// (the task will close without the queue), the rest is not dropped with it but
    /// handed to the task's next write.
    #[tokio::test]
    async fn a_direct_rest_survives_an_overflow() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.writable().await.unwrap();
        let o = Outbox::new(2, 64 << 20);
        o.attach(Arc::new(server));
        o.take(&mut Vec::new());
        o.take(&mut Vec::new());
        // Far more than loopback buffers take: written only in part.
        let big = Bytes::from(vec![b'x'; 32 << 20]);
        let Offered::Written(n) = o.offer(Outgoing::Text(big.clone())) else {
            panic!("not written directly");
        };
        assert!(n > 0 && n < big.len(), "{n}");
        for _ in 0..3 {
            o.push(Outgoing::Text(Bytes::from_static(b"q")));
        }
        let mut v = Vec::new();
        assert!(o.take(&mut v), "overflowed");
        assert!(v.is_empty());
        assert_eq!(o.claim().map(|r| r.len()), Some(big.len() - n));
    }
}
