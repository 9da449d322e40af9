//! The hub under an external broker (Redis, SPEC section 10): positions are
//! assigned elsewhere and arrive here, in any order and possibly with holes, and
//! the hub keeps its promise to this node's subscribers anyway. [`Hub::deliver`]
//! appends a message through the same critical section and fan-out as
//! [`Hub::publish`] only when it is the next offset of the channel's epoch, and
//! otherwise says what is missing; [`Hub::follow`] compares the broker's head with
//! the hub's; [`Hub::backfill`] extends the history backwards (for a resume from
//! before this node followed the channel); [`Hub::jump`] moves past messages no
//! store holds any more, closing (4008) the subscribers that needed them. An epoch
//! other than the channel's resets it: its history is dropped, live subscribers
//! continue in the new epoch, resumes from the old one answer `recovered: false`.

use std::sync::Arc;
use std::time::Duration;

use tether_protocol::{CloseCode, Closing};
use tokio::time::Instant;

use super::{encode, expire, fan_out, ChannelState, Hub, HubError, Published};

/// A message whose position an external broker assigned.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// Its epoch.
    pub epoch: &'a str,
    /// Its offset in that epoch.
    pub offset: u64,
    /// Its id.
    pub id: &'a str,
    /// The raw JSON `data`, on one line.
    pub data: &'a str,
    /// How long ago it was published (for `history.ttl_ms`).
    pub age: Duration,
}

/// What [`Hub::deliver`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Appended to history and handed to this many subscribers.
    Delivered(u64),
    /// The channel already had it (a repeat): nothing done.
    Stale,
    /// Offsets `from` up to the message's own are missing: nothing done (deliver
    /// them first).
    Gap {
        /// The first missing offset.
        from: u64,
    },
    /// The channel has no state on this node: nothing done.
    Absent,
}

/// What [`Hub::follow`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Followed {
    /// The hub is at the broker's head (or ahead of it: messages in flight).
    Current,
    /// Offsets `from..=to` are missing: deliver them.
    Gap {
        /// The first missing offset.
        from: u64,
        /// The broker's head.
        to: u64,
    },
}

/// Where a channel stands on this node (see [`Hub::head`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Its epoch.
    pub epoch: String,
    /// The oldest offset in its history (`last + 1` when the history is empty).
    pub oldest: u64,
    /// Its latest offset.
    pub last: u64,
    /// Subscribers on this node.
    pub subscribers: usize,
}

/// Encodes a message of `channel` that an external broker positioned.
pub fn published(channel: &str, m: &Incoming<'_>) -> Published {
    let now = Instant::now();
    encode(
        channel.into(),
        m.id.to_owned(),
        m.offset,
        format!("{}:{}", m.epoch, m.offset),
        m.data,
        now.checked_sub(m.age).unwrap_or(now),
    )
}

/// Moves `st` to a new epoch at `last`: history dropped, live subscribers continue
/// after `last`, catching-up ones lose their replay (their next catch-up step
/// answers `Lost`).
fn reset(st: &mut ChannelState, epoch: &str, last: u64) {
    st.epoch = epoch.to_owned();
    st.last = last;
    st.history.clear();
    st.idem.clear();
    st.idem_order.clear();
    for sub in st.subs.values_mut() {
        sub.next = if sub.live { last + 1 } else { 0 };
    }
}

impl Hub {
    /// Has `tx` told the name of every channel whose subscriptions on this node
    /// change (added or removed). Set once; `false` if a watcher was already set.
    pub fn watch(&self, tx: tokio::sync::mpsc::UnboundedSender<Arc<str>>) -> bool {
        self.inner.watcher.set(tx).is_ok()
    }

    /// Tells the watcher (if any) that `channel`'s subscriptions changed.
    pub(super) fn changed(&self, channel: &Arc<str>) {
        if let Some(tx) = self.inner.watcher.get() {
            let _ = tx.send(channel.clone());
        }
    }

    /// Delivers `m` to `channel`'s subscribers on this node when it is the
    /// channel's next offset (see [`Delivery`]). A message of another epoch first
    /// resets the channel to that epoch at offset 0. With `create`, a channel with
    /// no state starts just before `m`.
    pub fn deliver(
        &self,
        channel: &str,
        m: &Incoming<'_>,
        create: bool,
    ) -> Result<Delivery, HubError> {
        let seed = create.then_some(Some((m.epoch, m.offset.saturating_sub(1))));
        loop {
            let Some(ch) = self.channel_at(channel, seed)? else {
                return Ok(Delivery::Absent);
            };
            let mut fanned_out = ch.publishing.lock();
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            if st.epoch != m.epoch {
                reset(&mut st, m.epoch, 0);
                self.inner.metrics.epoch_reset();
            }
            if m.offset <= st.last {
                return Ok(Delivery::Stale);
            }
            if m.offset > st.last + 1 {
                return Ok(Delivery::Gap { from: st.last + 1 });
            }
            let now = Instant::now();
            expire(&mut st, &self.inner.settings, now);
            st.last = m.offset;
            let p = Arc::new(published(&ch.name, m));
            st.history.push_back(p.clone());
            while st.history.len() > self.inner.settings.history_size {
                st.history.pop_front();
            }
            let delivered = fan_out(&ch, st, &mut fanned_out, m.offset, &p, now);
            *fanned_out = Some(Instant::now());
            drop(fanned_out);
            self.inner.metrics.delivered(delivered);
            return Ok(Delivery::Delivered(delivered));
        }
    }

    /// Compares the broker's head of `channel` (`epoch`, `last`) with the hub's,
    /// creating the channel there if it has no state. Another epoch resets the
    /// channel (to `last` when nobody here needs the messages before it, else to
    /// 0, leaving them to fill).
    pub fn follow(&self, channel: &str, epoch: &str, last: u64) -> Result<Followed, HubError> {
        let r = self.with_channel_at(channel, Some(Some((epoch, last))), |_, st| {
            let idle = st.subs.is_empty() && st.history.is_empty();
            if st.epoch != epoch {
                reset(st, epoch, if idle { last } else { 0 });
                self.inner.metrics.epoch_reset();
            } else if idle && last > st.last {
                st.last = last;
            }
            if last > st.last {
                Followed::Gap {
                    from: st.last + 1,
                    to: last,
                }
            } else {
                Followed::Current
            }
        })?;
        r.ok_or(HubError::ChannelLimit)
    }

    /// Adds `msgs` (ascending offsets of `epoch`) in front of `channel`'s history,
    /// as far as they join it without a hole and it holds `history.size`; returns
    /// how many were added.
    pub fn backfill(&self, channel: &str, epoch: &str, msgs: &[Incoming<'_>]) -> usize {
        let size = self.inner.settings.history_size;
        self.with_channel(channel, false, |ch, st| {
            if st.epoch != epoch {
                return 0;
            }
            let mut front = st.history.front().map_or(st.last + 1, |p| p.offset);
            let mut added = 0;
            for m in msgs.iter().rev() {
                if st.history.len() >= size || front <= 1 {
                    break;
                }
                if m.offset == front - 1 {
                    st.history.push_front(Arc::new(published(&ch.name, m)));
                    front -= 1;
                    added += 1;
                }
            }
            added
        })
        .ok()
        .flatten()
        .unwrap_or(0)
    }

    /// Moves `channel` past messages that no store holds any more, to `epoch` at
    /// `last`: its history is dropped and every subscriber that still needed one
    /// of them is closed (4008; it resumes and learns `recovered: false`). Never a
    /// silent skip.
    pub fn jump(&self, channel: &str, epoch: &str, last: u64) {
        let Ok(Some(ch)) = self.channel(channel, false) else {
            return;
        };
        let _publishing = ch.publishing.lock();
        let mut st = ch.state.lock();
        if st.removed || (st.epoch == epoch && last <= st.last) {
            return;
        }
        let same = st.epoch == epoch;
        let behind: Vec<(u64, Arc<crate::connection::Connection>)> = st
            .subs
            .iter()
            .filter(|(_, s)| !same || s.next <= last)
            .map(|(seq, s)| (*seq, s.conn.clone()))
            .collect();
        reset(&mut st, epoch, last);
        // Fed no more: a message after the jump must not reach a subscriber that
        // missed the ones before it (it would look like no gap at all); its close
        // says why.
        for (seq, _) in &behind {
            if let Some(sub) = st.subs.get_mut(seq) {
                sub.live = false;
            }
        }
        drop(st);
        for (_, conn) in behind {
            conn.request_close(Closing::new(
                CloseCode::SLOW_CONSUMER,
                "missed messages the channel history no longer holds",
            ));
        }
    }

    /// Where `channel` stands on this node; `None` without state.
    pub fn head(&self, channel: &str) -> Option<Head> {
        self.with_channel(channel, false, |_, st| Head {
            epoch: st.epoch.clone(),
            oldest: st.history.front().map_or(st.last + 1, |p| p.offset),
            last: st.last,
            subscribers: st.subs.len(),
        })
        .ok()
        .flatten()
    }

    /// Drops the history of `channel` if nobody here subscribes to it (the node
    /// stopped following it: what it holds would go stale), so the cleanup removes
    /// it.
    pub fn forget(&self, channel: &str) {
        let _ = self.with_channel(channel, false, |_, st: &mut ChannelState| {
            if st.subs.is_empty() {
                st.history.clear();
            }
        });
    }
}
