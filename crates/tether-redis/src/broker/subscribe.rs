//! A subscribe on Redis: follow the channel's pub/sub (acknowledged), then read its
//! head (starting its epoch if it has none), bring the hub to it, extend the hub's
//! history back to `since` from the stream when it does not reach that far (a
//! resume from another node), and only then register the subscriber in the hub,
//! which answers `recovered` and replays exactly what was missed. Nothing can fall
//! between: messages published after the follow reach the hub by pub/sub, those
//! before it are in the head the hub was brought to.

use std::sync::Arc;

use tether_core::{BrokerError, Connection, Subscribed};
use tether_protocol::Position;

use super::scripts::{self, meta_ttl, Want};
use super::{delivery, unavailable, Shared};

/// Subscribes `conn` to `channel` (see the module's text).
pub(super) async fn subscribe(
    s: &Shared,
    conn: &Arc<Connection>,
    channel: &str,
    since: Option<&Position>,
    announce: Option<Option<u64>>,
) -> Result<Subscribed, BrokerError> {
    if conn.has_channel(channel) {
        return Err(BrokerError::Hub(tether_core::HubError::AlreadySubscribed));
    }
    if !s.link.is_up() {
        return Err(BrokerError::Unavailable);
    }
    let _hold = s
        .follower
        .acquire(channel)
        .await
        .map_err(|e| unavailable("subscribe", e))?;
    let want = Want {
        create: Some(meta_ttl(s.history_ttl)),
        ..Want::default()
    };
    let head = scripts::range(
        &s.link.channel_commands(channel),
        s.link.keys(),
        channel,
        want,
    )
    .await
    .map_err(|e| unavailable("subscribe", e))?
    .ok_or(BrokerError::Unavailable)?;
    delivery::catch_up_head(s, channel, &head.epoch, head.last).await?;
    if let Some(since) = since {
        backfill(s, channel, since).await?;
    }
    s.hub
        .subscribe_at(
            conn,
            channel,
            since,
            announce,
            Some((&head.epoch, head.last)),
        )
        .map_err(BrokerError::Hub)
}

/// Extends the hub's history of `channel` back to just after `since` from the
/// stream, if it is in the channel's epoch and the hub's history starts later.
async fn backfill(s: &Shared, channel: &str, since: &Position) -> Result<(), BrokerError> {
    let Some(head) = s.hub.head(channel) else {
        return Ok(());
    };
    let first = since.offset + 1;
    if since.epoch != head.epoch || first >= head.oldest || since.offset >= head.last {
        return Ok(());
    }
    let want = Want {
        epoch: &head.epoch,
        first,
        last: head.oldest - 1,
        count: ((head.oldest - first) as usize).min(s.history_size),
        create: None,
    };
    let Some(range) = scripts::range(
        &s.link.channel_commands(channel),
        s.link.keys(),
        channel,
        want,
    )
    .await
    .map_err(|e| unavailable("subscribe", e))?
    else {
        return Ok(());
    };
    if range.epoch == head.epoch {
        let msgs = delivery::incoming(&range, s.history_ttl);
        s.hub.backfill(channel, &range.epoch, &msgs);
    }
    Ok(())
}
