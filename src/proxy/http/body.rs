//! An instance's response on its way back to the client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::link::Link;
use crate::proxy::route_table::Backend;

pub(super) struct Done {
    pub(super) backend: Arc<Backend>,
    pub(super) started: Instant,
    /// Goes back to the pool (HTTP/1.1) or frees its stream (HTTP/2) once the response has
    /// been read to its end (none for an upgrade's connection, which is never pooled).
    pub(super) link: Option<Link>,
    /// A gRPC call whose status is still to come in the trailers, to be counted.
    pub(super) grpc: bool,
}

/// An instance's response on its way to the client: counts bytes, and when it ends records the
/// request's duration and returns the connection to the pool (only if the response was read
/// to its end: otherwise hyper closes that connection).
pub struct Tracked {
    pub(super) inner: Incoming,
    pub(super) done: Option<Done>,
}

impl Tracked {
    fn finish(&mut self, complete: bool) {
        let Some(d) = self.done.take() else { return };
        let m = &d.backend.metrics;
        m.active.dec();
        if let Some(h) = &m.http {
            h.request_seconds.observe(d.started.elapsed().as_secs_f64());
        }
        if let (true, Some(link)) = (complete, d.link) {
            link.release(&d.backend.pool);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(data)) = (&self.done, f.data_ref()) {
                    d.backend.metrics.bytes_to_client.inc_by(data.len() as u64);
                }
                if let (Some(d), Some(trailers)) = (&mut self.done, f.trailers_ref()) {
                    if let (true, Some(h)) = (d.grpc, &d.backend.metrics.http) {
                        d.grpc = !super::grpc::count(h, trailers);
                    }
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
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

impl Drop for Tracked {
    fn drop(&mut self) {
        // hyper does not poll a body it knows to be empty (HEAD, 204, Content-Length: 0).
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
