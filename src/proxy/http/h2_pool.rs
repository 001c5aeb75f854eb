//! An instance's shared HTTP/2 connections. Unlike HTTP/1.1 connections, which carry one
//! request at a time and wait idle in `pool.rs`, one HTTP/2 connection carries many requests
//! at once: every request to the instance clones the connection's `SendRequest` and opens a
//! stream on it. A second connection is opened only when the first is closed or every open one
//! carries `STREAMS_PER_CONNECTION` streams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hyper::client::conn::http2;

use super::to_instance::ToInstance;

/// A handle on one HTTP/2 connection to an instance; clones open streams on the same
/// connection.
pub(super) type H2Sender = http2::SendRequest<ToInstance>;

/// Open HTTP/2 connections kept per instance (by this fluxd, over all proxy threads). Past
/// this, a request whose connections are all at their stream limit waits on the least busy
/// one (hyper queues it until a stream closes) rather than opening ever more connections.
pub const MAX_H2_PER_INSTANCE: usize = 4;

/// Streams in flight on one connection before the next request opens another. The limit the
/// instance announces (SETTINGS_MAX_CONCURRENT_STREAMS) is known only to the connection task
/// hyper runs, not to the `SendRequest` handles; 100 is the smallest limit RFC 9113 advises
/// (nginx announces 128, gRPC servers 100 or more), so a connection is not made to queue.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// One shared connection and the number of its streams in flight.
#[derive(Clone)]
struct Shared {
    sender: H2Sender,
    /// Streams open on it now (from the request sent to the response's end), to find a
    /// connection with room before the instance's limit makes hyper queue the request.
    streams: Arc<AtomicUsize>,
}

impl Shared {
    fn has_room(&self) -> bool {
        self.streams.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION
    }
}

/// An instance's open HTTP/2 connections.
#[derive(Default)]
pub struct H2Conns {
    open: Mutex<Vec<Shared>>,
    /// Held by the one request opening a connection to the instance; the requests that find
    /// no connection meanwhile wait for it and share it (rather than each opening its own).
    pub(super) opening: tokio::sync::Mutex<()>,
}

/// One stream's claim on its connection: counted while it lives (see `Shared::streams`).
pub(super) struct StreamSlot {
    streams: Arc<AtomicUsize>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl H2Conns {
    /// A connection to open the next stream on: the first open one with room, else (when no
    /// more may be opened) the least busy; None when a new connection should be opened.
    pub(super) fn take(&self) -> Option<(H2Sender, StreamSlot)> {
        let mut open = self.open.lock().ok()?;
        open.retain(|c| !c.sender.is_closed());
        let pick = match open.iter().find(|c| c.has_room()) {
            Some(c) => c,
            None if open.len() >= MAX_H2_PER_INSTANCE => open
                .iter()
                .min_by_key(|c| c.streams.load(Ordering::Relaxed))?,
            None => return None,
        };
        Some(claim(pick))
    }

    /// Shares a newly opened connection (when there is room for it) and claims its first
    /// stream.
    pub(super) fn add(&self, sender: H2Sender) -> (H2Sender, StreamSlot) {
        let shared = Shared {
            sender,
            streams: Arc::new(AtomicUsize::new(0)),
        };
        let (_, slot) = claim(&shared);
        if let Ok(mut open) = self.open.lock() {
            open.retain(|c| !c.sender.is_closed());
            if open.len() < MAX_H2_PER_INSTANCE {
                open.push(shared.clone());
            }
        }
        (shared.sender, slot)
    }

    /// Takes the connection `slot` belongs to out of the shared list: a stream on it failed
    /// (it is closing, or the instance sent GOAWAY and refuses new streams on it), so the next
    /// requests open or share another.
    pub(super) fn forget(&self, slot: &StreamSlot) {
        if let Ok(mut open) = self.open.lock() {
            open.retain(|c| !Arc::ptr_eq(&c.streams, &slot.streams));
        }
    }

    /// Open connections (for `fluxd debug` and tests).
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .map(|o| o.iter().filter(|c| !c.sender.is_closed()).count())
            .unwrap_or(0)
    }
}

fn claim(c: &Shared) -> (H2Sender, StreamSlot) {
    c.streams.fetch_add(1, Ordering::Relaxed);
    (
        c.sender.clone(),
        StreamSlot {
            streams: c.streams.clone(),
        },
    )
}
