//! `Upgrade` requests on `http` services (WebSocket the main case, any protocol allowed): the
//! request goes to the instance the service's policy picks, like any other (connect failures
//! move on to the next instance), but always over a fresh connection that is never taken from
//! the pool nor returned to it, with its `Connection: upgrade` and `Upgrade` headers kept. If
//! the instance switches protocols (101), the client gets the 101 with the instance's headers
//! and both connections become one tunnel, forwarded as a `tcp` service's connection is
//! (`super::super::session`: spliced, per-instance byte counts, the half-close limit). Any other
//! answer goes to the client as it came, and its connection is closed after it.
//!
//! `Upgrade: h2c` is not passed on: RFC 9113 (3.1) deprecates that upgrade, and a server may
//! ignore an `Upgrade` it does not take. The request is answered over HTTP/1.1 like one without
//! it (the other protocols of the same header are still asked for).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{strip_hop_by_hop, ToClient};
use crate::proxy::route_table::Backend;
use crate::proxy::session::Session;
use crate::proxy::way::Broken;

/// Index of `switched` and `refused` in `HttpMetrics::upgrades` (`crate::metrics::UPGRADE_RESULTS`).
const SWITCHED: usize = 0;
const REFUSED: usize = 1;

/// The tunnel a client connection becomes after a 101, set by the request's handler and run
/// by the task serving the connection once hyper let go of it, so that the tunnel stays under
/// the connection's `--max-connections` permit and fluxd's stop drains it like a `tcp`
/// connection.
pub(super) type Slot = Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>;

/// Takes the tunnel left in `slot`, if the connection was upgraded.
pub(super) fn take_tunnel(slot: &Slot) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// An upgrade the client asked for.
pub(super) struct Requested {
    /// The protocols, as sent on to the instance.
    protocols: HeaderValue,
    /// hyper's handle on the client's connection: resolves once the 101 has been written.
    client: OnUpgrade,
}

impl Requested {
    /// The upgrade `parts` asks for, if any (see `protocols`), with hyper's handle on the
    /// client's connection taken out of the request. To be called before the hop-by-hop
    /// headers are stripped.
    pub(super) fn take(parts: &mut Parts) -> Option<Requested> {
        let protocols = protocols(parts.version, &parts.headers)?;
        let client = parts.extensions.remove::<OnUpgrade>()?;
        Some(Requested { protocols, client })
    }

    /// Puts back the two headers the instance needs to see the upgrade, which the request's
    /// preparation stripped with the other hop-by-hop headers.
    pub(super) fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocols.clone());
    }

    /// The client's answer to the instance's: a 101 starts the tunnel (left in `slot` for the
    /// connection's task); anything else goes back as it came, its connection not pooled.
    pub(super) fn answer(
        self,
        backend: Arc<Backend>,
        mut resp: Response<Incoming>,
        started: Instant,
        retried: bool,
        half_closed_idle: Duration,
        slot: &Slot,
    ) -> Response<ToClient> {
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let Some(h) = &backend.metrics.http {
            h.upgrades[if switched { SWITCHED } else { REFUSED }].inc();
        }
        if !switched {
            tracing::debug!(instance = %backend.instance, status = %resp.status(), "upgrade refused by the instance");
            return super::answer(backend, resp, None, started, retried, false);
        }
        if retried {
            if let Some(h) = &backend.metrics.http {
                h.retries.inc();
            }
        }
        let instance = hyper::upgrade::on(&mut resp);
        let tunnel = tunnel(self.client, instance, backend, half_closed_idle);
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::pin(tunnel));
        let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *r.headers_mut() = switched_headers(resp.headers());
        r
    }
}

/// The protocols an HTTP/1.1 request asks to upgrade to: its `Upgrade` header, if its
/// `Connection` header names `upgrade`, without `h2c` (see the module's comment). None when
/// nothing is left to ask for.
pub fn protocols(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || !lists(headers, header::CONNECTION, "upgrade") {
        return None;
    }
    let wanted: Vec<&str> = tokens(headers, header::UPGRADE)
        .filter(|p| {
            let name = p.split('/').next().unwrap_or_default();
            !name.trim().eq_ignore_ascii_case("h2c")
        })
        .collect();
    if wanted.is_empty() {
        return None;
    }
    HeaderValue::from_str(&wanted.join(", ")).ok()
}

/// The comma-separated elements of every `name` header, trimmed, empty ones left out (values
/// that are not visible ASCII are skipped whole).
fn tokens(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// The 101 as the client gets it: the instance's headers without those of its hop, except
/// `Connection: upgrade` and the `Upgrade` it switched to.
pub fn switched_headers(instance: &HeaderMap) -> HeaderMap {
    let upgrade: Vec<HeaderValue> = instance.get_all(header::UPGRADE).iter().cloned().collect();
    let mut h = instance.clone();
    strip_hop_by_hop(&mut h);
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    for v in upgrade {
        h.append(header::UPGRADE, v);
    }
    h
}

/// Runs the upgraded connection: both sides' raw sockets, then the bytes either side sent
/// past the switch that hyper read already, then the splice session until both directions
/// ended, one failed (both are reset) or the half-close limit passed.
async fn tunnel(
    client: OnUpgrade,
    instance: OnUpgrade,
    backend: Arc<Backend>,
    half_closed_idle: Duration,
) {
    let m = &backend.metrics;
    let started = Instant::now();
    let (client, instance) = tokio::join!(client, instance);
    let sides = match (client, instance) {
        (Ok(c), Ok(i)) => raw(c).zip(raw(i)),
        (c, i) => {
            let e = c.err().or(i.err()).map(|e| e.to_string());
            tracing::debug!(instance = %backend.instance, error = ?e, "upgrade not completed");
            None
        }
    };
    if let Some(((mut client, from_client), (mut server, from_server))) = sides {
        let result = async {
            server.write_all(&from_client).await?;
            m.bytes_to_instance.inc_by(from_client.len() as u64);
            client.write_all(&from_server).await?;
            m.bytes_to_client.inc_by(from_server.len() as u64);
            let mut session = Session::served();
            std::future::poll_fn(|cx| {
                session.poll(cx, &client, &server, &backend, half_closed_idle)
            })
            .await
            .map_err(|(Broken::HungUp(e) | Broken::Failed(e))| e)
        }
        .await;
        if let Err(e) = result {
            tracing::trace!(instance = %backend.instance, error = %e, "upgraded connection ended with an error");
            crate::proxy::tcp::flush_then_reset(client, server).await;
        }
    }
    m.active.dec();
    m.duration_seconds.observe(started.elapsed().as_secs_f64());
}

/// The socket under an upgraded connection and the bytes hyper read from it past the switch.
/// The server side is hyper's own connection or, with hyper-util's auto (h1+h2) builder, that
/// connection behind its rewind buffer; the instance side is hyper's client connection.
fn raw(upgraded: Upgraded) -> Option<(TcpStream, Bytes)> {
    let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => return Some((p.io.into_inner(), p.read_buf)),
        Err(u) => hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<TcpStream>>(u),
    };
    match parts {
        Ok(p) => Some((p.io.into_inner(), p.read_buf)),
        Err(_) => {
            // Not reached with the connections fluxd makes; closing is the safe answer.
            tracing::warn!("upgraded connection is not a TCP socket; closed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn asked(pairs: &[(&str, &str)]) -> Option<String> {
        protocols(Version::HTTP_11, &headers(pairs)).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let ws = [("connection", "Upgrade"), ("upgrade", "websocket")];
        assert_eq!(asked(&ws).as_deref(), Some("websocket"));
        assert_eq!(asked(&[("upgrade", "websocket")]), None);
        assert_eq!(asked(&[("connection", "upgrade")]), None);
        assert_eq!(
            asked(&[("connection", "keep-alive"), ("upgrade", "websocket")]),
            None
        );
        // Connection lists several options, in any case, over several lines.
        assert_eq!(
            asked(&[
                ("connection", "keep-alive"),
                ("connection", "x-foo, UPGRADE"),
                ("upgrade", "websocket")
            ])
            .as_deref(),
            Some("websocket")
        );
        // HTTP/1.0 has no upgrade.
        assert_eq!(protocols(Version::HTTP_10, &headers(&ws)), None);
    }

    #[test]
    fn h2c_is_left_out_and_other_protocols_kept() {
        let c = ("connection", "Upgrade, HTTP2-Settings");
        assert_eq!(asked(&[c, ("upgrade", "h2c")]), None);
        assert_eq!(asked(&[c, ("upgrade", " H2C ")]), None);
        assert_eq!(
            asked(&[c, ("upgrade", "h2c, foo/2"), ("upgrade", "websocket")]).as_deref(),
            Some("foo/2, websocket")
        );
        assert_eq!(asked(&[c, ("upgrade", " , ,")]), None);
    }

    #[test]
    fn restore_puts_back_what_prepare_strips() {
        let mut h = headers(&[
            ("connection", "upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let protocols = protocols(Version::HTTP_11, &h).unwrap();
        strip_hop_by_hop(&mut h);
        assert!(h.get(header::UPGRADE).is_none());
        let mut req = hyper::Request::new(());
        let on = hyper::upgrade::on(&mut req);
        let r = Requested {
            protocols,
            client: on,
        };
        r.restore(&mut h);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(h.get("x-hop").is_none());
    }

    #[test]
    fn the_101_keeps_the_instance_headers_but_its_hop() {
        let h = switched_headers(&headers(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("sec-websocket-protocol", "chat"),
        ]));
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(h["sec-websocket-protocol"], "chat");
        assert!(h.get("keep-alive").is_none() && h.get("transfer-encoding").is_none());
    }
}
