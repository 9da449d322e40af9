//! Per-client turns: a node makes one client's transitions one at a time — the
//! script that decides one and the event it fires — so that the client's events
//! leave the node in the order Redis took the decisions (SPEC 3: webhooks carry
//! each client's events in order). Without a turn, a release and a commit of the
//! same client racing on two tasks could fire `client.online` before the
//! `client.offline` that Redis decided first.
//!
//! A turn is an async lock per client, made on demand and dropped with its last
//! holder: the table holds only the clients being decided now.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::OwnedMutexGuard;

/// The clients whose transitions are being decided on this node.
#[derive(Debug, Default)]
pub(crate) struct Turns(Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>);

/// One client's turn: held from the script to the event; its drop is the release.
#[derive(Debug)]
pub struct ClientTurn<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    turns: &'a Turns,
    client: Arc<str>,
}

impl Turns {
    /// Waits for `client`'s turn.
    pub(crate) async fn take(&self, client: &Arc<str>) -> ClientTurn<'_> {
        let lock = self.0.lock().entry(client.clone()).or_default().clone();
        let guard = lock.lock_owned().await;
        ClientTurn {
            guard: Some(guard),
            turns: self,
            client: client.clone(),
        }
    }

    /// How many clients have a turn taken or awaited (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

impl Drop for ClientTurn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut table = self.turns.0.lock();
        // Nobody else holds or awaits it (only the table's reference is left).
        if table
            .get(&self.client)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            table.remove(&self.client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_turn_at_a_time_per_client_and_the_table_empties() {
        let turns = Arc::new(Turns::default());
        let x: Arc<str> = Arc::from("x");
        let first = turns.take(&x).await;
        // Another client is not held up.
        drop(turns.take(&Arc::from("y")).await);
        let t = turns.clone();
        let x2 = x.clone();
        let waiting = tokio::spawn(async move {
            let _second = t.take(&x2).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "x's second turn waits for the first"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .map(Result::ok)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the second turn came"));
        assert_eq!(turns.len(), 0);
    }
}
