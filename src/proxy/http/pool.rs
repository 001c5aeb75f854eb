//! An instance's kept-alive HTTP/1.1 connections (its HTTP/2 ones are in `h2_pool.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http1 as client;

use super::to_instance::ToInstance;

/// Idle kept-alive connections kept per instance (by this fluxd, over all proxy threads).
pub const MAX_IDLE_PER_INSTANCE: usize = 16;
/// An idle pooled connection older than this is closed rather than reused: the instance may
/// have timed it out already.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) type Sender = client::SendRequest<ToInstance>;

/// An instance's idle kept-alive connections, most recently used last.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<(Sender, Instant)>>,
    /// The instance's shared HTTP/2 connections (instances spoken to in HTTP/2).
    pub(super) h2: super::h2_pool::H2Conns,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.idle.lock().map(|i| i.len()).unwrap_or(0);
        f.debug_struct("Pool")
            .field("idle", &n)
            .field("h2", &self.h2.open())
            .finish()
    }
}

impl Pool {
    /// The most recently used idle connection that is not known to be closed.
    pub(super) fn take(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_TIMEOUT);
        idle.pop().map(|(s, _)| s)
    }

    pub(super) fn put(&self, s: Sender) {
        if s.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE_PER_INSTANCE {
                idle.push((s, Instant::now()));
            }
        }
    }

    pub fn idle(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}
