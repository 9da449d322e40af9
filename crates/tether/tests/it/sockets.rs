//! Socket-level protections shared by both listeners: an idle or half-sent request
//! is cut, open sockets are capped, and a refused upgrade counts against the
//! pending cap until its socket is gone (issue 13's attacker run, items 1 and 2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether the server ends `s` (EOF or reset) within `limit`, reading past anything
/// it sends first.
async fn ended_by_server(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// Whether `/healthz` on a fresh socket answers 200 (a shed socket is reset, at
/// connect or at the first read).
async fn healthz_answers(addr: SocketAddr) -> bool {
    let Ok(mut sock) = TcpStream::connect(addr).await else {
        return false;
    };
    let req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    if sock.write_all(req).await.is_err() {
        return false;
    }
    let got = raw_read_until(&mut sock, b"\r\n\r\n", Duration::from_secs(1)).await;
    got.starts_with(b"HTTP/1.1 200")
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Attack 1: idle and half-sent API requests used to stay open for minutes. Now
/// the API caps its open sockets (`max_pending_handshakes`), cuts a head not
/// complete within `handshake_timeout_ms`, and answers a body that never comes 408.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_listener_times_out_and_caps_its_sockets() {
    let s = start(|c| {
        c.limits.handshake_timeout_ms = 500.try_into().unwrap();
        c.limits.max_pending_handshakes = 6.try_into().unwrap();
    })
    .await;
    let mut held = Vec::new();
    for i in 0..6 {
        let mut sock = connect(s.api).await;
        if i % 2 == 1 {
            sock.write_all(b"GET /api/stats HTTP/1.1\r\nHo")
                .await
                .unwrap();
        }
        held.push(sock);
    }
    // The accept loop has taken all six once the seventh is cut at once.
    let shed = match TcpStream::connect(s.api).await {
        Err(_) => true, // reset before connect returned
        Ok(mut extra) => ended_by_server(&mut extra, Duration::from_secs(2)).await,
    };
    assert!(shed, "a socket over the cap is reset");
    for (i, sock) in held.iter_mut().enumerate() {
        assert!(
            ended_by_server(sock, Duration::from_secs(3)).await,
            "socket {i} (idle or half-sent) is closed by the server"
        );
    }
    // A body that never comes: 408, not a socket held open.
    let mut slow = connect(s.api).await;
    let head =
        "POST /api/publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\n\r\n{\"channel\"";
    slow.write_all(head.as_bytes()).await.unwrap();
    let got = raw_read_until(&mut slow, b"\r\n\r\n", Duration::from_secs(3)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        s.stats().await["connections"]["ws"],
        0,
        "the API still answers"
    );
    s.assert_clean().await;
}

/// Attack 2: a refused upgrade under `?refusal=close` is held for its close
/// handshake; until its socket is gone it counts against `max_pending_handshakes`.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_upgrade_counts_as_pending_until_its_socket_is_gone() {
    let s = start(|c| {
        c.limits.max_pending_handshakes = 4.try_into().unwrap();
        c.clients.max_connections_per_client = 1.try_into().unwrap();
    })
    .await;
    let (ws, _) = s.ws("?client=one").await;
    // Refused (client_limit) peers that never answer the close handshake.
    let mut refused = Vec::new();
    for _ in 0..4 {
        refused.push(raw_ws(s.client, "/ws?client=one&refusal=close").await);
    }
    assert_eq!(s.stats().await["pending_handshakes"], 4);
    assert!(
        !healthz_answers(s.client).await,
        "a fifth socket is shed while four refused ones are open"
    );
    for mut r in refused {
        let got = raw_read_until(&mut r, &[0x11, 0x39], Duration::from_secs(3)).await;
        assert!(has_close(&got, 4409), "the refusal was announced");
    }
    client_close(ws).await;
    s.assert_clean().await;
    assert!(
        healthz_answers(s.client).await,
        "sockets are taken again once they are gone"
    );
}
