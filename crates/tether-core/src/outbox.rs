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
use tokio::sync::Notify;

use crate::message::{Direct, Published};

/// The room a queue is given when its first item arrives: about what a connection's
/// task takes per wake-up in a burst.
const FIRST_BATCH: usize = 16;

/// A connection's socket as the outbox writes to it directly: without blocking,
/// whatever the socket takes now. The transport implements it (core never holds a
/// socket); every call is made under the outbox's lock, so writes never interleave.
pub trait DirectSink: Send + Sync + std::fmt::Debug {
    /// Writes what the socket takes now: how many bytes, or an error (`WouldBlock`
    /// for a full socket buffer) when it took nothing.
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize>;
}

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
    socket: Option<Arc<dyn DirectSink>>,
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

    /// Gives the outbox the connection's socket, for direct writes. From here on,
    /// the task [claims](Self::claim) it before each write of its own.
    pub fn attach(&self, socket: Arc<dyn DirectSink>) {
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

    /// Free bytes (0 once overflowed).
    pub fn room_bytes(&self) -> usize {
        let s = self.state.lock();
        if s.overflowed {
            0
        } else {
            self.max_bytes.saturating_sub(s.bytes)
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

    /// A socket in memory: takes at most `room` bytes per call (`WouldBlock` at 0).
    #[derive(Debug, Default)]
    struct Sink {
        taken: Mutex<Vec<u8>>,
        room: std::sync::atomic::AtomicUsize,
    }

    impl Sink {
        fn with_room(room: usize) -> Arc<Self> {
            let s = Arc::new(Sink::default());
            s.set_room(room);
            s
        }
        fn set_room(&self, room: usize) {
            self.room.store(room, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl DirectSink for Sink {
        fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
            let n = bytes
                .len()
                .min(self.room.load(std::sync::atomic::Ordering::SeqCst));
            if n == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            self.taken.lock().extend_from_slice(&bytes[..n]);
            Ok(n)
        }
    }

    /// Direct writes happen only while the task is idle on an attached socket: not
    /// before its first empty take, not while it holds taken frames or a claim, not
    /// after sealing; and the frame reaches the socket whole.
    #[test]
    fn offers_write_directly_only_while_the_task_is_idle() {
        let sink = Sink::with_room(usize::MAX);
        let frame = || Outgoing::Text(Bytes::from_static(b"\x81\x02hi"));
        let o = Outbox::new(100, 1 << 20);
        assert_eq!(o.offer(frame()), Offered::Queued, "no socket attached");
        let mut v = Vec::new();
        o.take(&mut v);
        o.take(&mut v);
        o.attach(sink.clone());
        assert_eq!(
            o.offer(frame()),
            Offered::Queued,
            "attached, welcome not yet done"
        );
        v.clear();
        o.take(&mut v);
        assert_eq!(v.len(), 1);
        v.clear();
        assert!(!o.take(&mut v), "an empty take: the task is idle");
        assert_eq!(o.offer(frame()), Offered::Written(4));
        assert_eq!(&sink.taken.lock()[..], b"\x81\x02hi");
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
        sink.set_room(0);
        assert_eq!(o.offer(frame()), Offered::Queued, "a full socket: queued");
        v.clear();
        o.take(&mut v);
        o.take(&mut Vec::new());
        o.seal();
        sink.set_room(usize::MAX);
        assert_eq!(o.offer(frame()), Offered::Queued, "sealed");
    }

    /// A direct write cut off part-way leaves its rest; when the queue then overflows
    /// (the task will close without the queue), the rest is not dropped with it but
    /// handed to the task's next write.
    #[test]
    fn a_direct_rest_survives_an_overflow() {
        let sink = Sink::with_room(1000);
        let o = Outbox::new(2, 64 << 20);
        o.attach(sink.clone());
        o.take(&mut Vec::new());
        o.take(&mut Vec::new());
        let big = Bytes::from(vec![b'x'; 5000]);
        assert_eq!(
            o.offer(Outgoing::Text(big.clone())),
            Offered::Written(1000),
            "written in part"
        );
        for _ in 0..3 {
            o.push(Outgoing::Text(Bytes::from_static(b"q")));
        }
        let mut v = Vec::new();
        assert!(o.take(&mut v), "overflowed");
        assert!(v.is_empty());
        assert_eq!(o.claim().map(|r| r.len()), Some(4000));
    }

    /// Producer threads of the handshake model; the task's own frames carry this id.
    const PRODUCERS: u8 = 4;

    /// The write handshake under concurrency, as a model run on real threads: four
    /// producers offer numbered frames while a task thread takes, claims, writes in
    /// random-sized pieces and flushes, as `ConnIo` does, and the socket takes random
    /// amounts. Whatever the interleaving, the socket receives whole frames only,
    /// every frame exactly once, each producer's in order.
    #[test]
    fn the_direct_write_handshake_keeps_frames_whole_and_ordered() {
        // Each round is one random interleaving; a broken handshake shows in about
        // half of them (measured with the task's claim ignored by `offer`).
        for round in 0..8 {
            handshake_round(round);
        }
    }

    fn handshake_round(round: u64) {
        use std::sync::atomic::{AtomicBool, Ordering};
        const FRAMES: u32 = 2000;
        let sink = Sink::with_room(64);
        let o = Arc::new(Outbox::new(1 << 20, 1 << 30));
        o.attach(sink.clone());
        let done = Arc::new(AtomicBool::new(false));
        let task = {
            let (o, sink, done) = (o.clone(), sink.clone(), done.clone());
            std::thread::spawn(move || model_task(&o, &sink, &done, round))
        };
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let (o, sink) = (o.clone(), sink.clone());
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(round * 16 + u64::from(p));
                    for i in 0..FRAMES {
                        // frame: [p, i (4 bytes), 0xff] — 6 bytes, self-describing.
                        let mut f = vec![p];
                        f.extend_from_slice(&i.to_be_bytes());
                        f.push(0xff);
                        sink.set_room(rng.usize(0..12));
                        assert_ne!(o.offer(Outgoing::Text(Bytes::from(f))), Offered::Refused);
                        if i % 8 == 0 {
                            // Let the task thread in between offers.
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let own = task.join().unwrap();
        assert!(own > 0, "the task wrote frames of its own");
        let bytes = sink.taken.lock().clone();
        let frames = FRAMES as usize * PRODUCERS as usize + own as usize;
        assert_eq!(bytes.len(), 6 * frames, "every byte once");
        let mut next = [0u32; PRODUCERS as usize + 1];
        for f in bytes.chunks(6) {
            assert_eq!(f[5], 0xff, "whole frames only: {f:?}");
            let p = f[0] as usize;
            let i = u32::from_be_bytes([f[1], f[2], f[3], f[4]]);
            assert_eq!(i, next[p], "producer {p} in order");
            next[p] += 1;
        }
    }

    /// The connection task's side of the handshake (as `ConnIo` does it): take,
    /// claim, write the claimed rest, the batch and now and then a frame of its own
    /// in pieces, flush; until `done` and nothing is left. Returns its own frames.
    fn model_task(o: &Outbox, sink: &Sink, done: &std::sync::atomic::AtomicBool, seed: u64) -> u32 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut batch = Vec::new();
        let mut own = 0u32;
        loop {
            // Producers are finished once `done` is set: a round after it that finds
            // nothing means nothing is left.
            let finishing = done.load(std::sync::atomic::Ordering::SeqCst);
            batch.clear();
            o.take(&mut batch);
            let rest = o.claim();
            let mut bytes: Vec<u8> = rest.as_deref().map(<[u8]>::to_vec).unwrap_or_default();
            for item in &batch {
                bytes.extend_from_slice(item.ws_frame());
            }
            let taken = bytes.len();
            // Now and then a frame of the task's own (a pong), written under the claim
            // as tungstenite's control frames are: producer `PRODUCERS`, numbered.
            if own == 0 || (!finishing && rng.bool()) {
                bytes.push(PRODUCERS);
                bytes.extend_from_slice(&own.to_be_bytes());
                bytes.push(0xff);
                own += 1;
            }
            let mut at = 0;
            while at < bytes.len() {
                let n = rng.usize(1..=bytes.len() - at);
                sink.taken.lock().extend_from_slice(&bytes[at..at + n]);
                at += n;
            }
            o.task_flushed();
            if taken == 0 {
                if finishing {
                    return own;
                }
                std::thread::yield_now();
            }
        }
    }

    /// The write handshake, checked exhaustively on a small model: two producers
    /// offer a frame each while the connection task (as `ConnIo` and the driver do
    /// it) takes, claims (perhaps with a frame of its own, a pong), writes in pieces
    /// and flushes, each a separate step. Every interleaving of those steps runs
    /// against the real `Outbox`, with the socket taking a whole frame, one byte or
    /// nothing at each direct write. In every one the socket receives whole frames
    /// only, every frame once, each producer's in order.
    #[test]
    fn every_interleaving_of_the_write_handshake_keeps_frames_whole() {
        let mut paths = 0usize;
        let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(prefix) = stack.pop() {
            match replay(&prefix) {
                Replay::Branches(n) => {
                    for c in 0..n {
                        let mut next = prefix.clone();
                        next.push(c);
                        stack.push(next);
                    }
                }
                Replay::Done(bytes, own) => {
                    paths += 1;
                    check_stream(&bytes, own, &prefix);
                }
            }
        }
        // Small enough to explore whole; large enough to hold the interleavings that
        // matter (a direct write between the task's take and its claim, a partial
        // direct write, a claim that hands over a rest, a pong under a claim).
        // 155,870 when this was written (about 5 s in a debug build); the order of
        // one producer's many frames is the threaded model's part.
        assert!(paths > 100_000, "explored {paths} interleavings");
    }

    /// Frames per producer in the model (2 makes millions of interleavings); a
    /// frame is `[producer, index, 0xff]`, the task's own is `[9, 0, 0xff]`.
    const MODEL_FRAMES: u8 = 1;

    enum Replay {
        /// A whole run: the bytes the socket received, and whether the task wrote a
        /// frame of its own.
        Done(Vec<u8>, bool),
        /// The run stops at a choice with this many options.
        Branches(u8),
    }

    /// Where the model task is in its round.
    #[derive(Clone, Copy, PartialEq)]
    enum TaskAt {
        Take,
        Claim,
        Write,
    }

    /// The model task's state between steps.
    struct ModelTask {
        at: TaskAt,
        pending: Vec<u8>,
        /// Whether this round found anything to write.
        busy: bool,
        /// Whether it wrote its own frame (at most once).
        own: bool,
        /// It ran a round with nothing to do: it waits for a producer before the next.
        waiting: bool,
        /// No producer moved since this round's take (an idle round counts only then).
        fresh: bool,
    }

    impl ModelTask {
        /// How many ways its next step can go.
        fn options(&self) -> u8 {
            match self.at {
                TaskAt::Claim if !self.own => 2, // with or without a pong
                TaskAt::Write if !self.pending.is_empty() => 2, // one byte, or the rest
                _ => 1,
            }
        }

        fn step(&mut self, o: &Outbox, sink: &Sink, choice: u8) {
            match self.at {
                TaskAt::Take => {
                    let mut batch = Vec::new();
                    o.take(&mut batch);
                    self.pending = batch.iter().flat_map(|f| f.ws_frame().to_vec()).collect();
                    self.fresh = true;
                    self.at = TaskAt::Claim;
                }
                TaskAt::Claim => {
                    if let Some(rest) = o.claim() {
                        self.pending.splice(0..0, rest.iter().copied());
                    }
                    if choice == 1 {
                        self.pending.extend_from_slice(&[9, 0, 0xff]);
                        self.own = true;
                    }
                    self.busy = !self.pending.is_empty();
                    self.at = TaskAt::Write;
                }
                TaskAt::Write if !self.pending.is_empty() => {
                    let n = if choice == 0 { 1 } else { self.pending.len() };
                    sink.taken.lock().extend(self.pending.drain(..n));
                }
                TaskAt::Write => {
                    o.task_flushed();
                    self.waiting = !self.busy && self.fresh;
                    self.at = TaskAt::Take;
                }
            }
        }
    }

    /// Runs the model along `choices`.
    fn replay(choices: &[u8]) -> Replay {
        let sink = Sink::with_room(0);
        let o = Outbox::new(64, 1 << 20);
        o.attach(sink.clone());
        let mut task = ModelTask {
            at: TaskAt::Take,
            pending: Vec::new(),
            busy: false,
            own: false,
            waiting: false,
            fresh: false,
        };
        let mut offered = [0u8; 2];
        let mut choices = choices.iter().copied();
        loop {
            let producers: Vec<usize> = (0..2).filter(|p| offered[*p] < MODEL_FRAMES).collect();
            if producers.is_empty() && task.waiting && task.at == TaskAt::Take {
                return Replay::Done(sink.taken.lock().clone(), task.own);
            }
            // A producer moves (the socket taking a whole frame, 1 byte or nothing),
            // or the task does (unless it waits for a producer).
            let task_options = if task.waiting && !producers.is_empty() {
                0
            } else {
                task.options()
            };
            let options = producers.len() as u8 * 3 + task_options;
            let Some(c) = choices.next() else {
                return Replay::Branches(options);
            };
            if let Some(&p) = producers.get(usize::from(c / 3)) {
                sink.set_room([usize::MAX, 1, 0][usize::from(c % 3)]);
                let frame = vec![p as u8, offered[p], 0xff];
                offered[p] += 1;
                (task.waiting, task.fresh) = (false, false);
                assert_ne!(
                    o.offer(Outgoing::Text(Bytes::from(frame))),
                    Offered::Refused
                );
            } else {
                task.step(&o, &sink, c - producers.len() as u8 * 3);
            }
        }
    }

    /// The stream must be whole 3-byte frames, every producer's frames once and in
    /// order, and the task's own frame once if it wrote one.
    fn check_stream(bytes: &[u8], own: bool, path: &[u8]) {
        let frames = 2 * usize::from(MODEL_FRAMES) + usize::from(own);
        assert_eq!(
            bytes.len(),
            3 * frames,
            "every byte once: {bytes:?} on {path:?}"
        );
        let mut next = [0u8; 2];
        for f in bytes.chunks(3) {
            assert_eq!(f[2], 0xff, "whole frames: {bytes:?} on {path:?}");
            match f[0] {
                9 => assert!(own, "{bytes:?}"),
                p => {
                    let p = usize::from(p);
                    assert_eq!(f[1], next[p], "in order: {bytes:?} on {path:?}");
                    next[p] += 1;
                }
            }
        }
    }
}
