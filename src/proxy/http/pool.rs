//! An instance's kept-alive connections, and the request body sent over them.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as client;
use prometheus_client::metrics::counter::Counter;

/// Idle kept-alive connections kept per instance (by this fluxd, over all proxy threads).
pub const MAX_IDLE_PER_INSTANCE: usize = 16;
/// An idle pooled connection older than this is closed rather than reused: the instance may
/// have timed it out already.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What is sent to an instance: the client's body streamed, or bytes that can be sent again.
pub(super) type ToInstance = Either<Counted, Full<Bytes>>;
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

/// A streamed request body: counts its bytes as they go, once it knows its instance, and says
/// when it has all gone (the response timeout starts then, as nginx's proxy_read_timeout
/// does: an upload may take as long as it takes).
pub struct Counted {
    pub(super) inner: Incoming,
    pub(super) counter: Option<Counter>,
    pub(super) sent: Option<Arc<tokio::sync::Notify>>,
}

impl Counted {
    fn ended(&self) {
        if let Some(n) = &self.sent {
            // A stored permit: the waiter may start waiting after this.
            n.notify_one();
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(f))), Some(c)) = (&r, &self.counter) {
            if let Some(d) = f.data_ref() {
                c.inc_by(d.len() as u64);
            }
        }
        // hyper stops polling once `is_end_stream` says so, without asking for the `None`.
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
