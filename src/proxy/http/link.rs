//! The instance connection one request goes over: an HTTP/1.1 connection of its own (from the
//! idle pool or fresh) or a stream on the instance's shared HTTP/2 connection, and which of
//! the two a request uses.

use std::future::Future;
use std::pin::Pin;

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri;
use hyper::{Request, Response, Uri, Version};

use super::h2_pool::{H2Sender, StreamSlot};
use super::pool::{Pool, Sender};
use super::to_instance::ToInstance;
use crate::model::InstanceProtocol;

/// The HTTP version spoken to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    H1,
    H2,
    /// HTTP/1.1 on a fresh connection of its own that may switch protocols (an `Upgrade`
    /// request, `upgrade.rs`): never taken from the idle pool nor returned to it.
    Upgrade,
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
            Proto::Upgrade => None,
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

    /// A request failed on this connection before any answer: an HTTP/2 connection is no
    /// longer shared (an HTTP/1.1 one is simply dropped).
    pub(super) fn forget(&self, pool: &Pool) {
        if let Link::H2 { _slot, .. } = self {
            pool.h2.forget(_slot);
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

/// Turns a request prepared for HTTP/1.1 (origin-form URI, `Host`) into its HTTP/2 form: the
/// authority goes into the URI (`:authority`), `TE: trailers` is kept when the client sent it
/// (gRPC needs it; it is the one `TE` HTTP/2 allows).
pub(super) fn to_h2(parts: &mut Parts, vip: SocketAddr, trailers: bool) {
    let host = parts
        .headers
        .remove(header::HOST)
        .and_then(|h| uri::Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| {
            // An IP:port is always a valid authority.
            uri::Authority::try_from(vip.to_string()).expect("IP:port authority")
        });
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| uri::PathAndQuery::from_static("/"));
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(path)
        .build()
    {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_2;
    if trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_speaks_the_clients_version_and_a_setting_overrides_it() {
        use InstanceProtocol::*;
        assert_eq!(Proto::choose(None, Version::HTTP_11), Proto::H1);
        assert_eq!(Proto::choose(None, Version::HTTP_10), Proto::H1);
        assert_eq!(Proto::choose(None, Version::HTTP_2), Proto::H2);
        assert_eq!(Proto::choose(Some(Http1), Version::HTTP_2), Proto::H1);
        assert_eq!(Proto::choose(Some(H2), Version::HTTP_11), Proto::H2);
    }

    fn parts(uri: &str, headers: &[(&'static str, &'static str)]) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_http2_form_carries_the_authority_in_the_uri() {
        let vip: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let mut p = parts("/a?b=c", &[("host", "web.example:8080"), ("x-y", "z")]);
        to_h2(&mut p, vip, true);
        assert_eq!(p.uri, "http://web.example:8080/a?b=c");
        assert_eq!(p.version, Version::HTTP_2);
        assert!(p.headers.get("host").is_none());
        assert_eq!(p.headers["te"], "trailers");
        assert_eq!(p.headers["x-y"], "z");
        // No usable Host: the VIP; no TE: trailers from the client, none sent.
        let mut p = parts("/", &[("host", "bad host")]);
        to_h2(&mut p, vip, false);
        assert_eq!(p.uri, "http://198.18.0.1:80/");
        assert!(p.headers.get("te").is_none());
    }
}
