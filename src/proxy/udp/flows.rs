//! The flow table of one udp service: client address -> its flow (the instance it was given
//! and the upstream socket that carries it), and the budget all services' tables share
//! (`--udp-max-flows`). Generic over the flow so that expiry, the bound and moving flows off an
//! instance are tested without sockets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What the table needs to know of a flow.
pub trait FlowLike {
    /// When a datagram last went either way, in ms on the process clock.
    fn last_ms(&self) -> u64;
    /// Whether its instance refused it (ICMP port unreachable): the flow must move.
    fn dead(&self) -> bool;
}

/// The flows of every udp service together may not exceed `max`: each holds a socket, and a
/// process may hold only so many (20,000 here).
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

/// One flow's place in the budget, given back when dropped (with its flow).
#[derive(Debug)]
pub struct Slot(Arc<Budget>);

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// A place for one more flow, or None when every place is taken.
    pub fn take(self: &Arc<Budget>) -> Option<Slot> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used >= self.max {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => used = now,
            }
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One service's flows by client address.
#[derive(Debug)]
pub struct Flows<F> {
    map: HashMap<SocketAddr, F>,
}

impl<F> Default for Flows<F> {
    fn default() -> Self {
        Flows {
            map: HashMap::new(),
        }
    }
}

impl<F: FlowLike> Flows<F> {
    /// The live flow of `client`; a dead one is removed (and dropped) on the way, so that the
    /// caller opens a new flow to another instance.
    pub fn live(&mut self, client: &SocketAddr) -> Option<&F> {
        if self.map.get(client).is_some_and(|f| f.dead()) {
            self.map.remove(client);
        }
        self.map.get(client)
    }

    pub fn insert(&mut self, client: SocketAddr, flow: F) {
        self.map.insert(client, flow);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Removes the flows idle for `idle_ms` or more at `now_ms`, and the dead ones; returns
    /// how many.
    pub fn expire(&mut self, now_ms: u64, idle_ms: u64) -> usize {
        let before = self.map.len();
        self.map
            .retain(|_, f| !f.dead() && now_ms.saturating_sub(f.last_ms()) < idle_ms);
        before - self.map.len()
    }

    /// Keeps only the flows `keep` accepts (those whose instance is still routed); returns
    /// how many were removed.
    pub fn retain(&mut self, mut keep: impl FnMut(&F) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|_, f| keep(f));
        before - self.map.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &F> {
        self.map.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct Fake {
        instance: &'static str,
        last: u64,
        dead: Cell<bool>,
        _slot: Option<Slot>,
    }

    impl FlowLike for Fake {
        fn last_ms(&self) -> u64 {
            self.last
        }
        fn dead(&self) -> bool {
            self.dead.get()
        }
    }

    fn fake(instance: &'static str, last: u64, slot: Option<Slot>) -> Fake {
        Fake {
            instance,
            last,
            dead: Cell::new(false),
            _slot: slot,
        }
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn idle_flows_expire_and_active_ones_stay() {
        let mut t = Flows::default();
        t.insert(client(1), fake("a", 1_000, None));
        t.insert(client(2), fake("a", 9_000, None));
        assert_eq!(t.expire(10_000, 5_000), 1);
        assert!(t.live(&client(1)).is_none());
        assert!(t.live(&client(2)).is_some());
        // Exactly at the limit counts as idle.
        assert_eq!(t.expire(14_000, 5_000), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn the_budget_bounds_flows_over_tables_and_frees_with_them() {
        let budget = Budget::new(2);
        let (mut a, mut b) = (Flows::default(), Flows::default());
        a.insert(client(1), fake("a", 0, budget.take()));
        b.insert(client(1), fake("b", 0, budget.take()));
        assert!(budget.take().is_none(), "a third flow must not fit");
        assert_eq!(budget.used(), 2);
        a.expire(10, 5);
        assert_eq!(budget.used(), 1);
        assert!(budget.take().is_some());
        // That slot was dropped at once: free again.
        assert_eq!(budget.used(), 1);
    }

    #[test]
    fn flows_move_off_a_removed_instance_and_dead_flows_go() {
        let mut t = Flows::default();
        t.insert(client(1), fake("gone", 0, None));
        t.insert(client(2), fake("kept", 0, None));
        t.insert(client(3), fake("kept", 0, None));
        assert_eq!(t.retain(|f| f.instance != "gone"), 1);
        assert!(t.live(&client(1)).is_none());
        t.live(&client(2)).unwrap().dead.set(true);
        assert!(t.live(&client(2)).is_none(), "a refused flow is not reused");
        assert_eq!(t.len(), 1);
        t.values().next().unwrap().dead.set(true);
        assert_eq!(t.expire(0, 1_000), 1);
    }
}
