//! The HTTP-aware path of `http` services: the client's connection is served as HTTP/1.1 or
//! HTTP/2 (prior knowledge, told by the connection preface) and every request is balanced on
//! its own. Per request: the service is looked up again (so a
//! kept-alive client follows instance changes), an instance is picked by the service's policy
//! and passive health, the request goes over a kept-alive connection from that instance's small
//! pool, and the response streams back to the client.
//!
//! Retries: a failed connect marks the instance failed and the next instance is tried, as on
//! the tcp path. A pooled connection that turns out closed before any response byte arrived is
//! replaced by a fresh connection to the same instance (whose failure moves on to the next
//! instance), but only while the request can be sent again: it was not sent at all, it has no
//! body, or it is idempotent with a body small enough to have been buffered. Nothing is retried
//! once response bytes have gone to the client. With no instance reachable the answer is 503;
//! an instance that takes longer than `--http-response-timeout-ms` to send its response
//! headers gets its connection closed and the client a 504 (the request is not sent again:
//! it may have been acted on, and a slow instance is not a dead one, so it is not marked
//! failed either).
//!
//! HTTP/2 (`link.rs`, `h2_pool.rs`): a request goes to its instance in the version the
//! service's `instance_protocol` says, by default the client's. HTTP/2 requests to one
//! instance share its HTTP/2 connection, one stream each, so per-request balancing holds for
//! the many requests of one HTTP/2 client connection. gRPC calls (`grpc.rs`) keep `TE:
//! trailers`, get their trailers through, are counted by `grpc-status`, and flux's own errors
//! reach them with a gRPC status too. An HTTP/1.1 `Upgrade: h2c` is not taken up (RFC 9113
//! deprecates it): the request is answered over HTTP/1.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1 as client, http2};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

mod body;
mod grpc;
pub mod h2_pool;
mod link;
pub mod pool;
mod to_instance;
pub mod upgrade;

use body::Done;
pub use body::Tracked;
use link::{to_h2, Link, Proto};
pub use pool::{Pool, IDLE_TIMEOUT, MAX_IDLE_PER_INSTANCE};
pub use to_instance::Counted;
use to_instance::ToInstance;

use super::limits::{is_local_exhaustion, Timeouts};
use super::route_table::{Backend, RouteTable};
use crate::metrics::code_class;

/// Idempotent requests with a body up to this size are buffered so that they can be retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// What goes back to the client: an instance's response, or flux's own short answer.
pub type ToClient = Either<Tracked, Full<Bytes>>;

struct Ctx {
    vip: SocketAddr,
    routes: Arc<ArcSwap<RouteTable>>,
    /// fluxd's limits; each request runs under its service's own where it has them, as the
    /// route is when the request comes (a kept-alive connection follows `service set`).
    daemon: Timeouts,
    /// The client's address, appended to `X-Forwarded-For`.
    client_ip: Option<HeaderValue>,
    /// The same address, for affinity: each request picks by it.
    client: Option<std::net::IpAddr>,
    /// Set when a request upgraded the connection: run once hyper let go of it.
    tunnel: upgrade::Slot,
}

/// Serves one client connection of an `http` service until the client closes it or fluxd
/// stops.
pub async fn serve(
    client: TcpStream,
    vip: SocketAddr,
    routes: Arc<ArcSwap<RouteTable>>,
    timeouts: Timeouts,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let peer = client.peer_addr().ok().map(|a| a.ip());
    serve_io(client, peer, vip, routes, timeouts, stop).await
}

/// `serve` over any byte stream from `peer` (the fuzz target feeds it bytes from memory).
pub async fn serve_io<I>(
    client: I,
    peer: Option<std::net::IpAddr>,
    vip: SocketAddr,
    routes: Arc<ArcSwap<RouteTable>>,
    timeouts: Timeouts,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let client_ip = peer.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok());
    let ctx = Arc::new(Ctx {
        vip,
        routes,
        daemon: timeouts,
        client_ip,
        client: peer,
        tunnel: Default::default(),
    });
    let serving = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = serving.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    // HTTP/1.1, or HTTP/2 when the client opens with the HTTP/2 preface (prior knowledge).
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    tokio::pin!(conn);
    // On a stop, the request in flight is answered (with `Connection: close`) and an idle
    // kept-alive connection is closed at once, so the drain does not wait on idle clients.
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::trace!(%vip, error = %e, "http client connection ended with an error");
    }
    if let Some(tunnel) = upgrade::take_tunnel(&ctx.tunnel) {
        tunnel.await;
    }
}

/// Counts an answer flux gave itself on `backend`'s behalf (502, 504) with the instance's
/// responses, so its error rate shows them.
fn count_own_answer(backend: &Backend, code: u16, started: Instant) {
    if let Some(h) = &backend.metrics.http {
        h.responses[code_class(code)].inc();
        h.request_seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// How one attempt on one instance ended.
enum Attempt {
    Answered(Response<Incoming>, Link),
    /// The instance could not be reached (marked failed); the request can go to another.
    Failed,
    /// The request was sent and the connection failed before an answer; it cannot be sent
    /// again.
    Lost,
    /// The request was sent and no answer began within the response timeout.
    TimedOut,
}

/// Why a request sent on one connection got no answer there.
enum Unanswered {
    /// The request may be sent again (it was not sent, or can be replayed).
    Resend,
    /// It was sent and cannot be sent again.
    Lost,
    /// No response headers within the response timeout.
    TimedOut,
}

impl Ctx {
    async fn handle(&self, req: Request<Incoming>) -> Response<ToClient> {
        let started = Instant::now();
        let grpc = grpc::is_grpc(req.headers());
        let Some(service) = self.routes.load().services.get(&self.vip).cloned() else {
            return own(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                "no service at this address\n",
            );
        };
        if req.method() == Method::CONNECT {
            return plain(StatusCode::NOT_IMPLEMENTED, "CONNECT is not supported\n");
        }
        let limits = service.timeouts(self.daemon);
        let proto = Proto::choose(service.instance_protocol, req.version());
        let (mut parts, body) = req.into_parts();
        let upgrade = upgrade::Requested::take(&mut parts);
        // An upgrade is an HTTP/1.1 exchange on a connection of its own, whatever the service
        // speaks to its instances otherwise.
        let proto = if upgrade.is_some() {
            Proto::Upgrade
        } else {
            proto
        };
        let trailers = grpc::wants_trailers(&parts.headers);
        self.prepare(&mut parts);
        if let Some(u) = &upgrade {
            u.restore(&mut parts.headers);
        }
        if proto == Proto::H2 {
            to_h2(&mut parts, self.vip, trailers);
        }
        let Ok(mut body) = ReqBody::new(&parts.method, body).await else {
            return plain(
                StatusCode::BAD_REQUEST,
                "the request body could not be read\n",
            );
        };
        // The policy's pick, then every other instance in connect order (computed only when
        // the first choice fails), as on the tcp path.
        let first = service.first_choice(self.client).cloned();
        let mut rest: Option<std::vec::IntoIter<Arc<Backend>>> = None;
        let mut retried = false;
        loop {
            let backend = match (&first, rest.is_none()) {
                (Some(f), true) if !retried => f.clone(),
                _ => {
                    let it =
                        rest.get_or_insert_with(|| service.connect_order(self.client).into_iter());
                    match it.find(|b| !first.as_ref().is_some_and(|f| Arc::ptr_eq(f, b))) {
                        Some(b) => b,
                        None => break,
                    }
                }
            };
            match self
                .attempt(&backend, &parts, &mut body, &mut retried, &limits, proto)
                .await
            {
                Attempt::Answered(resp, link) => {
                    return match upgrade {
                        Some(u) => u.answer(
                            backend,
                            resp,
                            started,
                            retried,
                            limits.half_closed_idle,
                            &self.tunnel,
                        ),
                        None => answer(backend, resp, Some(link), started, retried, grpc),
                    };
                }
                Attempt::Failed => {
                    retried = true;
                    if rest.is_none() {
                        rest = Some(service.connect_order(self.client).into_iter());
                    }
                }
                Attempt::Lost => {
                    count_own_answer(&backend, 502, started);
                    return own(
                        grpc,
                        StatusCode::BAD_GATEWAY,
                        "the instance closed the connection before answering\n",
                    );
                }
                Attempt::TimedOut => {
                    count_own_answer(&backend, 504, started);
                    tracing::debug!(service = %service.name, instance = %backend.instance, "no response within the response timeout; 504");
                    return own(
                        grpc,
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "the instance did not answer within {} ms\n",
                            limits.http_response.as_millis()
                        ),
                    );
                }
            }
        }
        tracing::debug!(service = %service.name, "no instance reachable; 503");
        own(
            grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no instance of service {} is reachable\n", service.name),
        )
    }

    /// One instance: its open connections (idle HTTP/1.1 ones, or its shared HTTP/2 one) while
    /// they turn out closed before answering, then one fresh connection (only that for an
    /// upgrade).
    async fn attempt(
        &self,
        backend: &Arc<Backend>,
        parts: &Parts,
        body: &mut ReqBody,
        retried: &mut bool,
        limits: &Timeouts,
        proto: Proto,
    ) -> Attempt {
        // Bounded: a closed connection leaves its list when found closed, but the loop must
        // end even if one were handed out again.
        let mut tries = 0;
        // Held while this request opens the instance's HTTP/2 connection, so that requests
        // arriving meanwhile share it instead of each opening their own.
        let mut opening = None;
        loop {
            let mut s = match Link::reuse(&backend.pool, proto) {
                Some(s) => s,
                None if proto == Proto::H2 && opening.is_none() => {
                    match backend.pool.h2.opening.try_lock() {
                        Ok(guard) => {
                            opening = Some(guard);
                            break;
                        }
                        Err(_) => {
                            let guard = backend.pool.h2.opening.lock().await;
                            match Link::reuse(&backend.pool, proto) {
                                Some(s) => s,
                                // The request that was opening it failed to connect and
                                // marked the instance failed: the next instance, rather
                                // than every waiter timing out on it in turn.
                                None if !backend.health.is_live() => return Attempt::Failed,
                                // It was opened and is already full or gone (the instance
                                // ends connections after so many requests): open the next.
                                None => {
                                    opening = Some(guard);
                                    break;
                                }
                            }
                        }
                    }
                }
                None => break,
            };
            tries += 1;
            if tries > MAX_IDLE_PER_INSTANCE + h2_pool::MAX_H2_PER_INSTANCE {
                break;
            }
            if !matches!(
                tokio::time::timeout(limits.connect, s.ready()).await,
                Ok(Ok(()))
            ) {
                continue; // closed while idle; nothing was sent
            }
            match self.send(backend, s, parts, body, false, limits).await {
                Ok((resp, s)) => return Attempt::Answered(resp, s),
                // A stale pooled connection: a fresh one to the same instance next (in
                // HTTP/2, another shared one, or the one being opened).
                Err(Unanswered::Resend) => {
                    *retried = true;
                    if proto == Proto::H2 {
                        continue;
                    }
                    break;
                }
                Err(Unanswered::Lost) => return Attempt::Lost,
                Err(Unanswered::TimedOut) => return Attempt::TimedOut,
            }
        }
        let connected = self.connect(backend, limits.connect, proto).await;
        drop(opening); // a new HTTP/2 connection is shared by now
        let Some(s) = connected else {
            return Attempt::Failed;
        };
        match self.send(backend, s, parts, body, true, limits).await {
            Ok((resp, s)) => Attempt::Answered(resp, s),
            Err(Unanswered::Resend) => {
                *retried = true;
                Attempt::Failed
            }
            Err(Unanswered::Lost) => Attempt::Lost,
            Err(Unanswered::TimedOut) => Attempt::TimedOut,
        }
    }

    /// Sends the request on one connection. On failure before any response byte: whether the
    /// request may be sent again. A fresh connection that fails so marks the instance failed,
    /// as an instance that accepted and hung up does on the tcp path.
    async fn send(
        &self,
        backend: &Backend,
        mut sender: Link,
        parts: &Parts,
        body: &mut ReqBody,
        fresh: bool,
        limits: &Timeouts,
    ) -> Result<(Response<Incoming>, Link), Unanswered> {
        let m = &backend.metrics;
        let Some(b) = body.take(&m.bytes_to_instance) else {
            return Err(Unanswered::Lost);
        };
        m.active.inc();
        // The response timeout runs from the end of the request body: at once for a body held
        // in memory, once the last byte has gone for a streamed one.
        let body_sent = match &b {
            Either::Left(streamed) => streamed.sent.clone(),
            Either::Right(_) => None,
        };
        let response = sender.send(request(parts, b));
        let too_late = async {
            if let Some(sent) = body_sent {
                sent.notified().await;
            }
            tokio::time::sleep(limits.http_response).await;
        };
        let answer = tokio::select! {
            answer = response => Ok(answer),
            _ = too_late => Err(()),
        };
        let Ok(answer) = answer else {
            // Dropping the sender closes an HTTP/1.1 connection: the instance sees the request
            // abandoned rather than a late answer read by the next request. In HTTP/2 only
            // this stream is cancelled (RST_STREAM); the connection goes on carrying others.
            m.active.dec();
            return Err(Unanswered::TimedOut);
        };
        match answer {
            Ok(resp) => {
                if fresh || !backend.health.is_live() {
                    backend.health.succeeded();
                }
                Ok((resp, sender))
            }
            Err(mut e) => {
                m.active.dec();
                sender.forget(&backend.pool);
                let unsent = e.take_message();
                let was_unsent = unsent.is_some();
                if let Some(req) = unsent {
                    body.give_back(req.into_body());
                }
                tracing::debug!(instance = %backend.instance, addr = %backend.addr, pooled = !fresh, error = %e.error(), "request failed before any response byte");
                if fresh {
                    backend.health.failed();
                    m.connect_failures.inc();
                }
                if was_unsent || body.replayable() {
                    Err(Unanswered::Resend)
                } else {
                    Err(Unanswered::Lost)
                }
            }
        }
    }

    /// A new connection to `backend`, with the HTTP/1.1 or HTTP/2 handshake (a new HTTP/2
    /// connection is shared at once); counted and timed like the tcp path's connects; a
    /// failure marks the instance failed. An upgrade's connection may switch protocols (hyper
    /// then hands it over rather than closing it).
    async fn connect(&self, backend: &Backend, timeout: Duration, proto: Proto) -> Option<Link> {
        let m = &backend.metrics;
        let started = Instant::now();
        let why = match tokio::time::timeout(timeout, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                m.connect_seconds.observe(started.elapsed().as_secs_f64());
                let _ = stream.set_nodelay(true);
                let io = TokioIo::new(stream);
                let handshake =
                    match proto {
                        Proto::H1 | Proto::Upgrade => {
                            client::handshake(io).await.map(|(sender, conn)| {
                                if proto == Proto::Upgrade {
                                    tokio::spawn(async move {
                                        let _ = conn.with_upgrades().await;
                                    });
                                } else {
                                    tokio::spawn(async move {
                                        let _ = conn.await;
                                    });
                                }
                                Link::H1(sender)
                            })
                        }
                        Proto::H2 => http2::handshake(TokioExecutor::new(), io).await.map(
                            |(sender, conn)| {
                                tokio::spawn(async move {
                                    let _ = conn.await;
                                });
                                let (sender, _slot) = backend.pool.h2.add(sender);
                                Link::H2 { sender, _slot }
                            },
                        ),
                    };
                match handshake {
                    Ok(link) => {
                        m.connections.inc();
                        return Some(link);
                    }
                    Err(e) => e.to_string(),
                }
            }
            // This host is out of fds, memory or ports: not the instance's fault, so it is not
            // marked failed (the request ends in 503 if every attempt meets the same).
            Ok(Err(e)) if is_local_exhaustion(&e) => {
                tracing::debug!(instance = %backend.instance, error = %e, "no resources for a connection to the instance");
                return None;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".to_string(),
        };
        tracing::debug!(instance = %backend.instance, addr = %backend.addr, error = %why, "instance failed; trying the next");
        backend.health.failed();
        m.connect_failures.inc();
        None
    }

    /// The request as the instance gets it: origin-form URI, HTTP/1.1, the client's Host (or
    /// the VIP when it sent none), no hop-by-hop headers, the client's address appended to
    /// `X-Forwarded-For`.
    fn prepare(&self, parts: &mut Parts) {
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST) {
            let host = match parts.uri.authority() {
                Some(a) => HeaderValue::from_str(a.as_str()).ok(),
                None => HeaderValue::from_str(&self.vip.to_string()).ok(),
            };
            if let Some(h) = host {
                parts.headers.insert(header::HOST, h);
            }
        }
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = parts
                .uri
                .path_and_query()
                .cloned()
                .map_or_else(|| Uri::from_static("/"), Uri::from);
        }
        parts.version = Version::HTTP_11;
        if let Some(ip) = &self.client_ip {
            let xff = HeaderName::from_static("x-forwarded-for");
            let mut all: Vec<&[u8]> = parts
                .headers
                .get_all(&xff)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            all.push(ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&all.join(&b", "[..])) {
                parts.headers.insert(xff, v);
            }
        }
    }
}

fn request(parts: &Parts, body: ToInstance) -> Request<ToInstance> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r
}

/// Removes the headers that describe one hop (RFC 9110 7.6.1), including those the
/// `Connection` header names. hyper sets framing and keep-alive for each side itself.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
}

/// The instance's response as the client gets it; its connection goes back to the pool at the
/// end of the body if `sender` is given.
fn answer(
    backend: Arc<Backend>,
    resp: Response<Incoming>,
    link: Option<Link>,
    started: Instant,
    retried: bool,
    grpc: bool,
) -> Response<ToClient> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // A gRPC call's status comes in the trailers, or in the headers of a trailers-only answer.
    let mut status_to_come = grpc;
    if let Some(h) = &backend.metrics.http {
        h.responses[code_class(parts.status.as_u16())].inc();
        if retried {
            h.retries.inc();
        }
        if grpc && grpc::count(h, &parts.headers) {
            status_to_come = false;
        }
    }
    let body = Tracked {
        inner: body,
        done: Some(Done {
            backend,
            started,
            link,
            grpc: status_to_come,
        }),
    };
    Response::from_parts(parts, Either::Left(body))
}

/// flux's own answer: plain text, or for a gRPC call a trailers-only response whose gRPC
/// status says the same (UNAVAILABLE, or DEADLINE_EXCEEDED for a timeout).
fn own(grpc: bool, status: StatusCode, text: &str) -> Response<ToClient> {
    if !grpc {
        return plain(status, text);
    }
    let code = if status == StatusCode::GATEWAY_TIMEOUT {
        grpc::Code::DeadlineExceeded
    } else {
        grpc::Code::Unavailable
    };
    grpc::own_answer(status, code, text)
}

fn plain(status: StatusCode, text: &str) -> Response<ToClient> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::copy_from_slice(
        text.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The request body, kept so that it can be sent again where the retry rule allows.
enum ReqBody {
    /// No body, or an idempotent request's small body, read in full.
    Replay(Bytes),
    /// Streamed as it arrives; `None` once sent.
    Once(Option<Counted>),
}

impl ReqBody {
    async fn new(method: &Method, body: Incoming) -> Result<ReqBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(ReqBody::Replay(Bytes::new()));
        }
        let small = body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BODY);
        if method.is_idempotent() && small {
            return Ok(ReqBody::Replay(body.collect().await?.to_bytes()));
        }
        Ok(ReqBody::Once(Some(Counted {
            inner: body,
            counter: None,
            sent: None,
        })))
    }

    /// The body for one attempt; `sent` counts its bytes.
    fn take(&mut self, sent: &Counter) -> Option<ToInstance> {
        match self {
            ReqBody::Replay(b) => {
                sent.inc_by(b.len() as u64);
                Some(Either::Right(Full::new(b.clone())))
            }
            ReqBody::Once(b) => b.take().map(|mut b| {
                b.counter = Some(sent.clone());
                b.sent = Some(Arc::new(tokio::sync::Notify::new()));
                Either::Left(b)
            }),
        }
    }

    fn give_back(&mut self, body: ToInstance) {
        if let (ReqBody::Once(slot), Either::Left(b)) = (self, body) {
            *slot = Some(b);
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, ReqBody::Replay(_))
    }
}
