//! The hub under an external broker (SPEC section 10): `deliver` only in offset
//! order, `follow` seeding and finding holes, another epoch resetting live
//! subscribers, `backfill` letting a resume recover from before the node followed,
//! `jump` closing the subscribers that needed lost messages, and the watcher.

use super::*;
use crate::hub::{Delivery, Followed, Incoming};

fn msg<'a>(epoch: &'a str, offset: u64, data: &'a str) -> Incoming<'a> {
    Incoming {
        epoch,
        offset,
        id: "id",
        data,
        age: Duration::ZERO,
    }
}

/// The positions of the channel messages among `items`, in order.
fn positions(items: &[Outgoing]) -> Vec<String> {
    items
        .iter()
        .filter_map(|o| match o {
            Outgoing::Message(p) => Some(p.position.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn deliver_takes_only_the_next_offset_and_says_what_is_missing() {
    let r = node(settings(), 10);
    let hub = r.hub();
    assert_eq!(hub.follow("ch", "e1", 0), Ok(Followed::Current));
    let a = connect(&r, "a");
    let s = hub.subscribe(a.conn(), "ch", None, None).unwrap();
    assert_eq!(s.position, "e1:0");
    assert_eq!(
        hub.deliver("ch", &msg("e1", 1, "1"), false),
        Ok(Delivery::Delivered(1))
    );
    assert_eq!(
        hub.deliver("ch", &msg("e1", 2, "2"), false),
        Ok(Delivery::Delivered(1))
    );
    assert_eq!(
        hub.deliver("ch", &msg("e1", 2, "2"), false),
        Ok(Delivery::Stale)
    );
    assert_eq!(
        hub.deliver("ch", &msg("e1", 4, "4"), false),
        Ok(Delivery::Gap { from: 3 })
    );
    assert_eq!(positions(&take(a.conn())), ["e1:1", "e1:2"]);
    assert_eq!(
        hub.deliver("ch", &msg("e1", 3, "3"), false),
        Ok(Delivery::Delivered(1))
    );
    assert_eq!(
        hub.deliver("ch", &msg("e1", 4, "4"), false),
        Ok(Delivery::Delivered(1))
    );
    let got = take(a.conn());
    assert_eq!(positions(&got), ["e1:3", "e1:4"]);
    assert_eq!(json_of(got[1].ws_frame())["data"], 4);
    // A channel without state here: nothing, unless asked to start it.
    assert_eq!(
        hub.deliver("new", &msg("e9", 7, "7"), false),
        Ok(Delivery::Absent)
    );
    assert_eq!(
        hub.deliver("new", &msg("e9", 7, "7"), true),
        Ok(Delivery::Delivered(0))
    );
    assert_eq!(
        hub.head("new").map(|h| (h.epoch, h.oldest, h.last)),
        Some(("e9".into(), 7, 7))
    );
}

#[test]
fn follow_seeds_a_new_channel_and_finds_holes() {
    let r = node(settings(), 10);
    let hub = r.hub();
    assert_eq!(hub.follow("ch", "e1", 5), Ok(Followed::Current));
    let a = connect(&r, "a");
    assert_eq!(
        hub.subscribe(a.conn(), "ch", None, None).unwrap().position,
        "e1:5"
    );
    assert_eq!(hub.follow("ch", "e1", 5), Ok(Followed::Current));
    assert_eq!(
        hub.follow("ch", "e1", 7),
        Ok(Followed::Gap { from: 6, to: 7 })
    );
    // A channel nobody here needs moves to the head without a fill.
    assert_eq!(hub.follow("idle", "e1", 3), Ok(Followed::Current));
    assert_eq!(hub.follow("idle", "e1", 9), Ok(Followed::Current));
    assert_eq!(hub.head("idle").unwrap().last, 9);
}

#[test]
fn another_epoch_resets_the_channel_and_old_positions_do_not_recover() {
    let r = node(settings(), 10);
    let hub = r.hub();
    hub.follow("ch", "e1", 0).unwrap();
    let a = connect(&r, "a");
    hub.subscribe(a.conn(), "ch", None, None).unwrap();
    for i in 1..=3 {
        hub.deliver("ch", &msg("e1", i, "1"), false).unwrap();
    }
    // Redis came back without its data: the new epoch's first message.
    assert_eq!(
        hub.deliver("ch", &msg("e2", 1, "9"), false),
        Ok(Delivery::Delivered(1))
    );
    assert_eq!(positions(&take(a.conn())), ["e1:1", "e1:2", "e1:3", "e2:1"]);
    let b = connect(&r, "b");
    let s = hub
        .subscribe(b.conn(), "ch", Some(&pos("e1:2")), None)
        .unwrap();
    assert_eq!(
        (s.position.as_str(), s.recovered, s.missed),
        ("e2:1", false, 0)
    );
    // A new epoch whose first messages this node missed: a hole from 1.
    assert_eq!(
        hub.deliver("ch", &msg("e3", 3, "3"), false),
        Ok(Delivery::Gap { from: 1 })
    );
    assert_eq!(
        hub.follow("ch", "e4", 2),
        Ok(Followed::Gap { from: 1, to: 2 })
    );
}

#[test]
fn backfill_lets_a_resume_recover_from_before_the_node_followed() {
    let r = node(settings(), 10);
    let hub = r.hub();
    hub.follow("ch", "e1", 10).unwrap();
    let data: Vec<String> = (1..=10).map(|i| i.to_string()).collect();
    let older: Vec<Incoming<'_>> = (6..=10)
        .map(|i| msg("e1", i, &data[i as usize - 1]))
        .collect();
    // Not joining the history (a hole before offset 11): nothing added.
    assert_eq!(hub.backfill("ch", "e1", &older[..4]), 0);
    assert_eq!(hub.backfill("ch", "e2", &older), 0, "another epoch");
    assert_eq!(hub.backfill("ch", "e1", &older), 5);
    let a = connect(&r, "a");
    let s = hub
        .subscribe(a.conn(), "ch", Some(&pos("e1:5")), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (true, 5));
    let got = drain(hub, a.conn());
    assert_eq!(offsets(&got), [6, 7, 8, 9, 10]);
    assert_eq!(json_of(got[0].ws_frame())["data"], 6);
    let b = connect(&r, "b");
    let s = hub
        .subscribe(b.conn(), "ch", Some(&pos("e1:4")), None)
        .unwrap();
    assert!(!s.recovered, "offset 5 is in no history");
}

#[test]
fn jump_closes_the_subscribers_that_needed_lost_messages() {
    let r = node(settings(), 10);
    let hub = r.hub();
    hub.follow("ch", "e1", 0).unwrap();
    let a = connect(&r, "a");
    hub.subscribe(a.conn(), "ch", None, None).unwrap();
    hub.deliver("ch", &msg("e1", 1, "1"), false).unwrap();
    assert!(!a.conn().is_closing());
    hub.jump("ch", "e1", 5);
    assert!(a.conn().is_closing(), "never a silent skip");
    let b = connect(&r, "b");
    let s = hub
        .subscribe(b.conn(), "ch", Some(&pos("e1:1")), None)
        .unwrap();
    assert_eq!((s.position.as_str(), s.recovered), ("e1:5", false));
    let before = drain(hub, a.conn());
    // Only b gets 6: `a` missed 2..5, and a 6 right after its 1 would look like no
    // gap at all (it is closing, and fed no more).
    assert_eq!(
        hub.deliver("ch", &msg("e1", 6, "6"), false),
        Ok(Delivery::Delivered(1))
    );
    assert_eq!(offsets(&before), [1]);
    assert!(
        drain(hub, a.conn()).is_empty(),
        "nothing after the jump reaches a"
    );
    // A jump to where the channel already is changes nothing.
    hub.jump("ch", "e1", 6);
    assert!(!b.conn().is_closing());
}

#[test]
fn the_watcher_hears_every_subscription_change_and_forget_drops_idle_history() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    assert!(hub.watch(tx.clone()));
    assert!(!hub.watch(tx), "set once");
    let a = connect(&r, "a");
    hub.subscribe(a.conn(), "ch", None, None).unwrap();
    hub.deliver("ch", &msg(&hub.head("ch").unwrap().epoch, 1, "1"), false)
        .unwrap();
    hub.forget("ch");
    assert_eq!(hub.head("ch").unwrap().oldest, 1, "kept while subscribed");
    hub.unsubscribe(a.conn(), "ch").unwrap();
    let heard: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|c| c.to_string())
        .collect();
    assert_eq!(heard, ["ch", "ch"]);
    hub.forget("ch");
    assert_eq!(hub.head("ch").unwrap().oldest, 2, "history dropped");
    assert_eq!(hub.sweep(), 1);
}
