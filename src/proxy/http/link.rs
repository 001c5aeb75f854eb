//! The instance connection one request goes over: an HTTP/1.1 connection of its own (from the
//! idle pool or fresh) or a stream on the instance's shared HTTP/2 connection, and which of
//! the two a request uses.

use std::future::Future;
use std::pin::Pin;

use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::{Request, Response, Version};

use super::h2_pool::{H2Sender, StreamSlot};
use super::pool::{Pool, Sender, ToInstance};
use crate::model::InstanceProtocol;

/// The HTTP version spoken to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    H1,
    H2,
}

impl Proto {
    /// The service's `instance_protocol` setting, or with none (`auto`) the version the client
    /// spoke: HTTP/1.1 clients then behave exactly as before HTTP/2 existed in flux, and
    /// HTTP/2 clients (gRPC) reach instances that speak HTTP/2.
    pub(super) fn choose(setting: Option<InstanceProtocol>, client: Version) -> Proto {
        match setting {
            Some(InstanceProtocol::Http1) => Proto::H1,
            Some(InstanceProtocol::H2) => Proto::H2,
            None if client == Version::HTTP_2 => Proto::H2,
            None => Proto::H1,
        }
    }
}

/// A connection one request is sent on.
pub(super) enum Link {
    /// A kept-alive HTTP/1.1 connection, back to the idle pool when the response has ended.
    H1(Sender),
    /// A stream on a shared HTTP/2 connection, counted on it (`_slot`, released on drop) until
    /// the response has ended.
    H2 { sender: H2Sender, _slot: StreamSlot },
}

type Sending = Pin<
    Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<ToInstance>>>> + Send>,
>;

impl Link {
    /// A connection already open to the instance, if one can take the request now.
    pub(super) fn reuse(pool: &Pool, proto: Proto) -> Option<Link> {
        match proto {
            Proto::H1 => pool.take().map(Link::H1),
            Proto::H2 => pool
                .h2
                .take()
                .map(|(sender, _slot)| Link::H2 { sender, _slot }),
        }
    }

    pub(super) async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Link::H1(s) => s.ready().await,
            Link::H2 { sender, .. } => sender.ready().await,
        }
    }

    /// Sends the request; an error hands back the request when it was not sent.
    pub(super) fn send(&mut self, req: Request<ToInstance>) -> Sending {
        match self {
            Link::H1(s) => Box::pin(s.try_send_request(req)),
            Link::H2 { sender, .. } => Box::pin(sender.try_send_request(req)),
        }
    }

    /// The response has been read to its end: an HTTP/1.1 connection can carry the next
    /// request (an HTTP/2 stream just ends, and its slot with it).
    pub(super) fn release(self, pool: &Pool) {
        if let Link::H1(s) = self {
            pool.put(s);
        }
    }
}
