//! `tether bench bare-server`: a bare coalescing fan-out server with Nchan's URL
//! layout (WebSocket subscribers at `/sub/{channel}`, `POST /pub/{channel}` with the
//! message as the body), to measure the load generator's own ceiling:
//! `tether bench fanout --target nchan --url ws://ADDR/sub` against it. Each publish
//! is framed once and shared; each connection's writer sends everything queued for it
//! in one write. No history, no limits, no SSE: a reference floor, not a product.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// Arguments of `tether bench bare-server`.
#[derive(Args, Debug)]
pub struct BareArgs {
    /// Where to listen (loopback only).
    #[arg(long, default_value = "127.0.0.1:18900")]
    listen: SocketAddr,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 600)]
    secs: u64,
}

type Frame = Arc<Vec<u8>>;
type Channels = Arc<Mutex<HashMap<String, broadcast::Sender<Frame>>>>;

/// Messages a subscriber may fall behind before it misses some.
const QUEUE: usize = 4096;
/// The most bytes one write carries.
const BATCH: usize = 256 << 10;

fn sender(channels: &Channels, name: &str) -> broadcast::Sender<Frame> {
    let mut map = match channels.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    map.entry(name.to_owned())
        .or_insert_with(|| broadcast::channel(QUEUE).0)
        .clone()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn connection(mut sock: TcpStream, channels: Channels) -> Result<(), String> {
    let _ = sock.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    loop {
        // One request head (keep-alive: publishers send many).
        let head_end = loop {
            if let Some(i) = memmem::find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 << 10 {
                return Err("request head too long".into());
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if let (Some(ch), "POST") = (path.strip_prefix("/pub/"), method) {
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if len > 1 << 20 {
                return Err("body too large".into());
            }
            while buf.len() < len {
                let mut chunk = [0u8; 4096];
                let n = sock.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            let _ = sender(&channels, ch).send(Arc::new(tether_protocol::wire::text_frame(&body)));
            sock.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            continue;
        }
        let (Some(ch), Some(key)) = (
            path.strip_prefix("/sub/"),
            header(&head, "sec-websocket-key"),
        ) else {
            sock.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .map_err(|e| e.to_string())?;
            return Ok(());
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut rx = sender(&channels, ch).subscribe();
        sock.write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        return subscriber(sock, &mut rx).await;
    }
}

/// Writes everything queued for this subscriber in one write per wake-up; ends when
/// the client closes (its frames are read and dropped).
async fn subscriber(
    mut sock: TcpStream,
    rx: &mut broadcast::Receiver<Frame>,
) -> Result<(), String> {
    let mut out = Vec::new();
    let mut sink = [0u8; 512];
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            n = sock.read(&mut sink) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
        };
        match first {
            Ok(f) => out.extend_from_slice(&f),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
        while out.len() < BATCH {
            match rx.try_recv() {
                Ok(f) => out.extend_from_slice(&f),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        sock.write_all(&out).await.map_err(|e| e.to_string())?;
        out.clear();
        if out.capacity() > BATCH {
            out.shrink_to(4096);
        }
    }
}

/// Runs the bare server for `secs` seconds.
pub async fn run(a: BareArgs) -> Result<(), String> {
    if !a.listen.ip().is_loopback() {
        return Err("--listen must be a loopback address".into());
    }
    let listener = TcpListener::bind(a.listen)
        .await
        .map_err(|e| format!("{}: {e}", a.listen))?;
    eprintln!("bare-server on {} for {} s", a.listen, a.secs);
    let channels: Channels = Arc::default();
    let serve = async {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let channels = channels.clone();
                    tokio::spawn(async move {
                        let _ = connection(sock, channels).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(a.secs), serve).await;
    Ok(())
}
