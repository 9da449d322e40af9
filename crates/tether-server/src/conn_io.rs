//! The byte stream under an upgraded WebSocket.
//!
//! hyper hands an upgrade over as an opaque `Upgraded`. For HTTP/1 we take the
//! accepted stream back out of it ([`Upgraded::downcast`]), with the bytes hyper
//! had already read past the request (`pre`, replayed first). A plain TCP socket is
//! then kept in an `Arc`, so that once the connection is registered its outbox can
//! write frames to it directly ([`tether_core::Outbox::offer`]); from then on
//! ([`ConnIo::attach`]) the task claims the socket before it writes (writing first
//! the rest of a direct frame the socket took only in part), and its flush tells
//! the outbox that the task's writes ended on a frame boundary.
//! TLS streams and HTTP/2 streams are read and written as they are.
//!
//! Before that, hyper serves a plain socket through a [`PlainTcp`]: the same
//! `Arc<TcpStream>`, plus a [`Hijack`] handle with which the SSE handler can take
//! the socket over once it has answered (like Go's `http.Hijacker`): from then on
//! the stream writes its response itself and hyper's connection, with its buffers,
//! is dropped.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tether_core::Connection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::net::Accepted;

pub(crate) struct ConnIo {
    inner: Inner,
    /// Bytes read by hyper past the request, not yet handed to the reader.
    pre: Bytes,
    /// The registered connection whose outbox shares the socket (plain TCP only).
    gate: Option<Arc<Connection>>,
    /// Whether the task claimed the socket (see [`tether_core::Outbox::claim`]).
    claimed: bool,
    /// The unwritten end of a direct frame, handed over by the claim: written first.
    rest: Option<Bytes>,
}

enum Inner {
    Tcp(Arc<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// HTTP/2 (extended CONNECT): rare, boxed to keep the common case small.
    Upgraded(Box<TokioIo<Upgraded>>),
}

impl ConnIo {
    pub(crate) fn new(up: Upgraded) -> Self {
        match up.downcast::<TokioIo<Accepted>>() {
            Ok(parts) => {
                let inner = match parts.io.into_inner() {
                    tokio_util::either::Either::Left(plain) => Inner::Tcp(plain.sock),
                    tokio_util::either::Either::Right(tls) => Inner::Tls(tls),
                };
                // hyper's read-ahead is a slice of its 8 KiB read buffer, which it
                // would keep alive (even empty) for the connection's whole life.
                let pre = match parts.read_buf.is_empty() {
                    true => Bytes::new(),
                    false => Bytes::copy_from_slice(&parts.read_buf),
                };
                Self::over(inner, pre)
            }
            Err(up) => Self::over(Inner::Upgraded(Box::new(TokioIo::new(up))), Bytes::new()),
        }
    }

    fn over(inner: Inner, pre: Bytes) -> Self {
        ConnIo {
            inner,
            pre,
            gate: None,
            claimed: false,
            rest: None,
        }
    }

    /// Shares a plain TCP socket with `conn`'s outbox for direct writes. Called by
    /// the connection task, between writes (nothing of its own is part-written).
    pub(crate) fn attach(&mut self, conn: &Arc<Connection>) {
        if let Inner::Tcp(sock) = &self.inner {
            conn.outbox().attach(Arc::new(DirectSocket(sock.clone())));
            self.gate = Some(conn.clone());
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            if this.pre.is_empty() {
                // An emptied slice would still keep hyper's read buffer alive.
                this.pre = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        match &mut this.inner {
            Inner::Tcp(sock) => read_tcp(sock, cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Inner::Upgraded(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Tcp(sock) => {
                if let (Some(conn), false) = (&this.gate, this.claimed) {
                    this.rest = conn.outbox().claim();
                    this.claimed = true;
                }
                while let Some(rest) = this.rest.as_mut() {
                    let n = ready!(write_tcp(sock, cx, &[IoSlice::new(rest)]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    rest.advance(n);
                    if rest.is_empty() {
                        this.rest = None;
                    }
                }
                write_tcp(sock, cx, bufs)
            }
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Inner::Upgraded(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Tcp(_) => true,
            Inner::Tls(s) => s.is_write_vectored(),
            Inner::Upgraded(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Tcp(_) => {
                // A TCP socket buffers nothing of ours: what was written is sent, and
                // the writer (tungstenite, or the frame writer) flushes only after
                // whole frames.
                if let (Some(conn), true, None) = (&this.gate, this.claimed, &this.rest) {
                    conn.outbox().task_flushed();
                    this.claimed = false;
                }
                Poll::Ready(Ok(()))
            }
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Inner::Upgraded(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Tcp(sock) => Poll::Ready(shutdown_tcp(sock)),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Inner::Upgraded(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A plain accepted socket, as hyper serves it until an upgrade or a hijack.
pub(crate) struct PlainTcp {
    sock: Arc<TcpStream>,
    hijack: Arc<Hijack>,
}

/// The handle to take a plain socket away from hyper (see the module docs). It does
/// not keep the socket open: once hyper and the upgrade have let go of it, there is
/// nothing to take.
#[derive(Debug)]
pub(crate) struct Hijack {
    sock: Weak<TcpStream>,
    taken: AtomicBool,
    notify: Notify,
}

impl PlainTcp {
    /// The socket, and the handle that takes it over (for the request's extensions).
    pub(crate) fn new(sock: TcpStream) -> (Self, Arc<Hijack>) {
        let sock = Arc::new(sock);
        let hijack = Arc::new(Hijack {
            sock: Arc::downgrade(&sock),
            taken: AtomicBool::new(false),
            notify: Notify::new(),
        });
        (
            PlainTcp {
                sock,
                hijack: hijack.clone(),
            },
            hijack,
        )
    }

    fn taken(&self) -> bool {
        self.hijack.taken.load(Ordering::Acquire)
    }
}

impl Hijack {
    /// Takes the socket: hyper's side of it reads nothing more and writes into the
    /// void, and [`taken`](Self::taken) resolves so that its connection is dropped.
    /// The caller writes the whole response. `None` if already taken.
    pub(crate) fn take(&self) -> Option<Arc<TcpStream>> {
        // The socket first: a take that finds nothing must leave hyper's side alive.
        let sock = self.sock.upgrade()?;
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.notify.notify_one();
        Some(sock)
    }

    /// Resolves once the socket was taken.
    pub(crate) async fn taken(&self) {
        self.notify.notified().await;
    }
}

impl AsyncRead for PlainTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.taken() {
            // The new owner reads; hyper is dropped as soon as its task sees the take.
            return Poll::Pending;
        }
        read_tcp(&self.sock, cx, buf)
    }
}

impl AsyncWrite for PlainTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.taken() {
            // hyper's answer to a hijacked request never reaches the socket.
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        write_tcp(&self.sock, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.taken() {
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(shutdown_tcp(&self.sock))
    }
}

fn read_tcp(sock: &TcpStream, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    loop {
        ready!(sock.poll_read_ready(cx))?;
        let unfilled = buf.initialize_unfilled();
        match sock.try_read(unfilled) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

fn shutdown_tcp(sock: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(sock).shutdown(std::net::Shutdown::Write)
}

fn write_tcp(
    sock: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(sock.poll_write_ready(cx))?;
        match sock.try_write_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

/// A plain TCP socket as the outbox's direct writes see it.
#[derive(Debug)]
struct DirectSocket(Arc<TcpStream>);

impl tether_core::DirectSink for DirectSocket {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        self.0.try_write(bytes)
    }
}
