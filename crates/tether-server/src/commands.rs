//! Tether's client commands (SPEC section 5), one function each: the frames a
//! client sends on `/ws`, and what the connection does about them. Every reply goes
//! through the connection's outbox, so it is ordered with the channel messages.
//! Channels are reached only through the broker.

use std::sync::Arc;

use tether_core::{Connection, Outgoing};
use tether_protocol::{valid_channel, ClientFrame, FrameError, Position, ServerFrame};

use crate::auth::Identity;
use crate::driver::{Cx, End};

/// Acts on one decoded (or undecodable) client frame; `Some` ends the connection.
pub(crate) async fn apply(
    cx: Cx<'_>,
    identity: &mut Option<Identity>,
    frame: Result<ClientFrame, FrameError>,
) -> Option<End> {
    // A `ping` keeps a connection alive but does not make it active (`idle_ms`).
    if !matches!(frame, Ok(ClientFrame::Ping { .. })) {
        cx.conn.touch();
    }
    match frame {
        Ok(ClientFrame::Ping { reference }) => {
            push(cx.conn, &ServerFrame::Pong { reference }.encode());
            None
        }
        Ok(ClientFrame::Subscribe {
            reference,
            channel,
            since,
        }) => {
            subscribe(
                &cx,
                identity.as_ref(),
                reference,
                &channel,
                since.as_deref(),
            )
            .await;
            None
        }
        Ok(ClientFrame::Unsubscribe { reference, channel }) => {
            unsubscribe(&cx, reference, &channel).await;
            None
        }
        Ok(ClientFrame::Refresh { reference, token }) => refresh(cx, identity, reference, &token),
        Ok(ClientFrame::Connect { .. }) => {
            reply_error(
                cx.conn,
                None,
                "unexpected_connect",
                "connect is only valid as the first frame",
            );
            None
        }
        Err(e) => {
            reply_error(cx.conn, e.reference, e.code, &e.message);
            None
        }
    }
}

/// `subscribe`: checks the name and the token's permission, then asks the broker.
/// On success the `subscribed` frame was queued by the broker, ahead of the
/// channel's messages.
async fn subscribe(
    cx: &Cx<'_>,
    identity: Option<&Identity>,
    reference: Option<u64>,
    channel: &str,
    since: Option<&str>,
) {
    if !valid_channel(channel) {
        return reply_error(
            cx.conn,
            reference,
            "bad_channel",
            "channel names are 1-200 of A-Z a-z 0-9 _ . : / -",
        );
    }
    if identity.is_some_and(|id| !id.may_subscribe(channel)) {
        return reply_error(
            cx.conn,
            reference,
            "forbidden_channel",
            "the token does not permit this channel",
        );
    }
    let since = since.and_then(Position::parse);
    let subscribed = cx
        .ctx
        .broker
        .subscribe(cx.conn, channel, since.as_ref(), Some(reference))
        .await;
    if let Err(e) = subscribed {
        reply_error(cx.conn, reference, e.code(), e.message());
    }
}

/// `unsubscribe`: once the broker let go, nothing of the channel follows the reply.
async fn unsubscribe(cx: &Cx<'_>, reference: Option<u64>, channel: &str) {
    match cx.ctx.broker.unsubscribe(cx.conn, channel).await {
        Ok(()) => push(
            cx.conn,
            &ServerFrame::Unsubscribed { reference, channel }.encode(),
        ),
        Err(e) => reply_error(cx.conn, reference, e.code(), e.message()),
    }
}

/// `refresh`: a fresh token for the same subject moves the expiry; one for another
/// subject ends the connection (4004).
fn refresh(
    cx: Cx<'_>,
    identity: &mut Option<Identity>,
    reference: Option<u64>,
    token: &str,
) -> Option<End> {
    if !cx.ctx.auth.is_jwt() {
        reply_error(
            cx.conn,
            reference,
            "unsupported",
            "refresh needs [auth] mode = \"jwt\"",
        );
        return None;
    }
    match cx.ctx.auth.verify(token) {
        Ok(id) if id.client_id != cx.conn.client_id() => Some(End::SessionError),
        Ok(id) => {
            cx.deadlines.expire_at(Some(cx.ctx.auth.expires_at(&id)));
            *identity = Some(id);
            None
        }
        Err(_) => {
            reply_error(
                cx.conn,
                reference,
                "unauthorized",
                "invalid or expired token",
            );
            None
        }
    }
}

/// Queues an `error` reply.
pub(crate) fn reply_error(
    conn: &Arc<Connection>,
    reference: Option<u64>,
    code: &str,
    message: &str,
) {
    let frame = ServerFrame::Error {
        reference,
        code,
        message,
    };
    push(conn, &frame.encode());
}

fn push(conn: &Connection, json: &str) {
    conn.outbox().push(Outgoing::text(json));
}
