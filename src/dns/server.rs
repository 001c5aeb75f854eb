//! The DNS listeners: UDP and TCP on every `--dns-listen` address, answering from the catalog
//! as it is at each query. The limits are here, beside their reasons: TCP connections at
//! most [`MAX_TCP`] at once and closed after [`IDLE`] without a query; forwarded queries at
//! most [`MAX_FORWARDS`] in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::answer::{answer, error_reply, rcode_name, Reply, Transport, Zone};
use super::catalog::Snapshot;
use super::forward::Forwarder;
use super::settings::Settings;
use crate::catalog::State;
use crate::controller::Status;
use crate::metrics::dns::DnsMetrics;

/// Concurrent TCP connections: DNS over TCP is for the rare truncated answer, so a few
/// hundred is plenty, and a client opening thousands cannot take fluxd's file descriptors.
pub const MAX_TCP: usize = 256;

/// A TCP connection with no query for this long is closed (RFC 7766 suggests seconds).
pub const IDLE: Duration = Duration::from_secs(10);

/// Queries relayed to resolvers at once; beyond, UDP queries are dropped (the client retries)
/// rather than queued without bound while a resolver is slow.
pub const MAX_FORWARDS: usize = 512;

/// The sockets, bound before fluxd says it is ready so that a port in use stops it at start.
pub struct Listeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl Listeners {
    pub async fn bind(settings: &Settings) -> anyhow::Result<Listeners> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for addr in &settings.listen {
            udp.push(
                UdpSocket::bind(addr)
                    .await
                    .with_context(|| format!("dns_listen: cannot listen on {addr}/udp"))?,
            );
            tcp.push(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("dns_listen: cannot listen on {addr}/tcp"))?,
            );
        }
        Ok(Listeners { udp, tcp })
    }

    /// The addresses bound, for the logs, `fluxd debug` and `/v1/host`.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }
}

/// What every listener answers with.
pub struct Responder {
    zone: Zone,
    /// The catalog as the store follower last saw it (kept while the store is down).
    states: watch::Receiver<Arc<State>>,
    /// The data plane's status (None without one): the proxy's table, for instances live from
    /// this host, and the VIP guard's verdict, for VIPs this host refuses to route.
    dataplane: Option<Arc<Status>>,
    forwarder: Option<Forwarder>,
    metrics: Option<DnsMetrics>,
    forwards: Arc<Semaphore>,
}

impl Responder {
    pub fn new(
        settings: &Settings,
        states: watch::Receiver<Arc<State>>,
        dataplane: Option<Arc<Status>>,
        metrics: Option<DnsMetrics>,
    ) -> anyhow::Result<Responder> {
        let forwarder = Forwarder::new(&settings.forward, &settings.listen)?;
        let zone = Zone::new(&settings.domain, forwarder.is_some()).map_err(anyhow::Error::msg)?;
        if let Some(f) = &forwarder {
            tracing::info!(resolvers = ?f.upstreams(), "dns: forwarding other zones");
        }
        Ok(Responder {
            zone,
            states,
            dataplane,
            forwarder,
            metrics,
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        })
    }

    fn snapshot(&self) -> Snapshot {
        let state = self.states.borrow().clone();
        match &self.dataplane {
            Some(d) => {
                Snapshot::new(state, Some(d.routes.load_full())).with_refused(d.guard.load_full())
            }
            None => Snapshot::new(state, None),
        }
    }

    /// The local answer, counted; Forward is left to the caller.
    fn local(&self, query: &[u8], transport: Transport) -> Reply {
        let reply = answer(&self.zone, &self.snapshot(), query, transport);
        if let (Reply::Message { rcode, .. }, Some(m)) = (&reply, &self.metrics) {
            m.answered(rcode_name(*rcode));
        }
        reply
    }

    /// The resolvers' answer to a query for another zone, or SERVFAIL if none answered.
    async fn forward(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let forwarder = self.forwarder.as_ref()?;
        let relayed = forwarder.relay(query, transport).await;
        if let Some(m) = &self.metrics {
            m.forwarded(relayed.is_some());
        }
        let (bytes, rcode) = match relayed {
            Some(bytes) => {
                let rcode = hickory_proto::op::Message::from_vec(&bytes)
                    .map(|m| m.response_code())
                    .unwrap_or(hickory_proto::op::ResponseCode::ServFail);
                (bytes, rcode)
            }
            None => error_reply(query, hickory_proto::op::ResponseCode::ServFail)?,
        };
        if let Some(m) = &self.metrics {
            m.answered(rcode_name(rcode));
        }
        Some(bytes)
    }

    /// One query's reply, whichever way it comes.
    async fn respond(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        match self.local(query, transport) {
            Reply::Message { bytes, .. } => Some(bytes),
            Reply::Forward => self.forward(query, transport).await,
            Reply::Drop => None,
        }
    }
}

/// Starts one task per socket; each ends when `stop` turns true.
pub fn spawn(
    listeners: Listeners,
    responder: Arc<Responder>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for socket in listeners.udp {
        tasks.push(tokio::spawn(serve_udp(
            Arc::new(socket),
            responder.clone(),
            stop.clone(),
        )));
    }
    for listener in listeners.tcp {
        tasks.push(tokio::spawn(serve_tcp(
            listener,
            responder.clone(),
            stop.clone(),
        )));
    }
    tasks
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    responder: Arc<Responder>,
    mut stop: watch::Receiver<bool>,
) {
    // The largest UDP payload; a query is far smaller, but a truncated read would be
    // answered as garbage.
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // An ICMP error from an earlier reply's destination, mostly: not fatal.
                    tracing::debug!(error = %e, "dns: udp receive failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let query = &buf[..n];
        match responder.local(query, Transport::Udp) {
            Reply::Message { bytes, .. } => {
                let _ = socket.send_to(&bytes, peer).await;
            }
            Reply::Forward => {
                // Relaying waits on a resolver: off this loop, so local names stay fast.
                let Ok(permit) = responder.forwards.clone().try_acquire_owned() else {
                    continue;
                };
                let (socket, responder, query) =
                    (socket.clone(), responder.clone(), query.to_vec());
                tokio::spawn(async move {
                    if let Some(bytes) = responder.forward(&query, Transport::Udp).await {
                        let _ = socket.send_to(&bytes, peer).await;
                    }
                    drop(permit);
                });
            }
            Reply::Drop => {}
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    responder: Arc<Responder>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, mostly: back off instead of spinning.
                    tracing::warn!(error = %e, "dns: tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // Over the limit, the connection is closed at once: the client falls back to another
        // resolver or retries, and fluxd keeps its descriptors.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (responder, stop) = (responder.clone(), stop.clone());
        tokio::spawn(async move {
            serve_connection(stream, &responder, stop).await;
            drop(slot);
        });
    }
}

/// Queries one after another on one connection, each framed by its two-byte length
/// (RFC 1035 4.2.2), until the client closes, goes idle, or fluxd stops.
async fn serve_connection(
    mut stream: TcpStream,
    responder: &Responder,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let query = tokio::select! {
            q = tokio::time::timeout(IDLE, read_framed(&mut stream)) => match q {
                Ok(Ok(q)) => q,
                _ => return,
            },
            _ = stop.changed() => return,
        };
        let Some(reply) = responder.respond(&query, Transport::Tcp).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(IDLE, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut query = vec![0u8; usize::from(len)];
    stream.read_exact(&mut query).await?;
    Ok(query)
}
