//! The request body as it goes to an instance, over HTTP/1.1 or HTTP/2.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::counter::Counter;

/// What is sent to an instance: the client's body streamed, or bytes that can be sent again.
pub(super) type ToInstance = Either<Counted, Full<Bytes>>;

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
