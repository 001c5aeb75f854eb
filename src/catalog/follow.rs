//! Follows the store: one listing, then a watch from the revision after it, with every change
//! patched into the follower's `State` (see [`super::placement`]: one change costs what it
//! touches, not the catalog's size), which subscribers (the data plane controller, the Docker
//! agent) receive through a watch channel. Bursts of changes are coalesced into one new State (at most
//! one per `COALESCE`, the first of a burst without delay), and a
//! subscriber that is busy only ever sees the latest one (level-triggered, nothing to replay).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use super::placement::Placement;
use super::State;
use crate::store::{Store, WatchEvent};

/// Changes that arrive within this window become one new State.
/// A change after a quiet spell is published at once; changes that follow it within this window
/// are folded into the next State.
const COALESCE: Duration = Duration::from_millis(10);

pub struct Follower {
    store: Arc<dyn Store>,
    /// Every record as last seen, and the State they make, patched per event.
    placement: Placement,
    tx: watch::Sender<Arc<State>>,
    /// When the last State went out: a change after a quiet spell is published at once, and
    /// only changes that follow it within COALESCE wait to be folded together.
    published: Instant,
}

impl Follower {
    /// Lists the store once, so the first State is complete before anyone acts on it.
    pub async fn start(
        store: Arc<dyn Store>,
    ) -> crate::store::Result<(Follower, watch::Receiver<Arc<State>>)> {
        let placement = Placement::new(store.list("").await?);
        let (tx, rx) = watch::channel(Arc::new(placement.state()));
        let follower = Follower {
            store,
            placement,
            tx,
            published: Instant::now(),
        };
        Ok((follower, rx))
    }

    /// Watches until `stop`. A watch that ends is opened again from the last revision seen;
    /// the backends resume and resync by themselves, so this is only the last resort.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut retry = Duration::from_millis(100);
        loop {
            let mut events = match self.store.watch("", self.placement.revision() + 1).await {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the store; retrying");
                    tokio::select! {
                        _ = sleep(retry) => {}
                        _ = stop.changed() => return,
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            retry = Duration::from_millis(100);
            let mut due: Option<Instant> = None;
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => {
                            self.apply(ev);
                            // Whatever else has already arrived goes into the same State.
                            while let Ok(ev) = events.try_recv() {
                                self.apply(ev);
                            }
                            due.get_or_insert(self.published + COALESCE);
                        }
                        None => break,
                    },
                    _ = sleep_until_opt(due) => {
                        due = None;
                        self.publish();
                    }
                    _ = stop.changed() => return,
                }
            }
        }
    }

    fn apply(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => self.placement.put(kv),
            WatchEvent::Delete { key, revision } => self.placement.delete(&key, revision),
            WatchEvent::Reset(listing) => self.placement.reset(listing),
        }
    }

    fn publish(&mut self) {
        let state: State = self.placement.state();
        tracing::debug!(revision = state.revision, "catalog state published");
        self.tx.send_replace(Arc::new(state));
        self.published = Instant::now();
    }
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
