//! The proxy's listener: accepts redirected connections, bounded by `--max-connections`, finds
//! the service from the original destination and hands the connection to its protocol's path:
//! `super::tcp` (connect with retry, then splice) or `super::http` (balanced per request).

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::connect::Upstream;
use super::destination::{self, VipSource};
use super::limits::{Timeouts, WARN_PERIOD_MS};
use super::reset::reset;
use super::route_table::RouteTable;
use crate::model::Protocol;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where redirected connections arrive. 0.0.0.0 so that both host processes (redirected to
    /// 127.0.0.1) and containers (redirected to their bridge's address) reach it.
    pub listen: SocketAddrV4,
    /// Per-attempt connect timeout; a dead instance on a live host refuses at once, a dead
    /// host only times out.
    pub connect_timeout: Duration,
    /// `http` services: how long an instance may take to send its response headers before the
    /// client gets 504.
    pub http_response_timeout: Duration,
    /// `tcp` services: how long the direction still open after the other's end may stay idle.
    pub half_close_timeout: Duration,
    /// Concurrent proxied connections; each costs two fds, plus two pipes while bytes move.
    pub max_connections: usize,
    /// After a stop, how long established connections may go on before they are cut.
    pub drain: Duration,
    /// Where each connection's VIP is read (the steering in use).
    pub vip_source: VipSource,
}

pub struct Proxy {
    pub config: ProxyConfig,
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// One listening socket per core, all bound to the same port with SO_REUSEPORT: the kernel
    /// spreads new connections over them, and each is served by its own thread with its own
    /// single-threaded runtime, so a connection lives on one thread from accept to close (no
    /// cross-thread wakeups; per-thread pipe pools stay warm). The same option lets a new fluxd
    /// bind the port before the old one lets go (upgrades). With a socket passed by systemd,
    /// every thread accepts on a duplicate of that one socket instead.
    listeners: Vec<std::net::TcpListener>,
    /// Whether the listening socket came from outside (systemd) and outlives this process.
    pub inherited: bool,
    /// IPv6 twins of `listeners` (IPv6-only sockets on `[::]` and the same port), one per
    /// thread, when `config.listen` is the unspecified address and the host has IPv6: IPv6
    /// VIPs arrive there, while IPv4 ones keep their own sockets exactly as before. Bound by
    /// fluxd, or the one systemd passed (`add_inherited6`).
    listeners6: Vec<std::net::TcpListener>,
}

impl Proxy {
    /// Binds one listener per core on `config.listen`, or, given a socket passed by systemd,
    /// shares that one between the proxy threads.
    pub fn bind(
        config: ProxyConfig,
        routes: Arc<ArcSwap<RouteTable>>,
        inherited: Option<std::net::TcpListener>,
    ) -> io::Result<Proxy> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let listeners = match &inherited {
            Some(l) => {
                // File status flags belong to the socket, not the fd: set once for all.
                l.set_nonblocking(true)?;
                socket2::SockRef::from(l).set_nodelay(true)?;
                set_client_keepalive(l)?;
                (0..n)
                    .map(|_| l.try_clone())
                    .collect::<io::Result<Vec<_>>>()?
            }
            None => (0..n)
                .map(|_| listen(SocketAddr::V4(config.listen)))
                .collect::<io::Result<Vec<_>>>()?,
        };
        // Also beside a socket from systemd: `add_inherited6` replaces these when systemd
        // passed an IPv6 one too.
        let listeners6 = if config.listen.ip().is_unspecified() {
            listen6(config.listen.port(), n)
        } else {
            Vec::new()
        };
        Ok(Proxy {
            config,
            routes,
            listeners,
            inherited: inherited.is_some(),
            listeners6,
        })
    }

    /// Adds an IPv6 listening socket passed by systemd (`fluxd.socket`'s `[::]` line), shared
    /// by every proxy thread like the IPv4 one.
    pub fn add_inherited6(&mut self, l: std::net::TcpListener) -> io::Result<()> {
        l.set_nonblocking(true)?;
        socket2::SockRef::from(&l).set_nodelay(true)?;
        set_client_keepalive(&l)?;
        self.listeners6 = (0..self.listeners.len())
            .map(|_| l.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(())
    }

    /// The IPv6 listening socket, if any (the bpf steering hands IPv6 VIP connections to it).
    pub fn socket6(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.listeners6.first().map(std::os::fd::AsFd::as_fd)
    }

    /// The listening socket VIP connections arrive on (the first of the reuseport group: the
    /// kernel spreads what the bpf steering hands to it over the whole group).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listeners[0])
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listeners[0].local_addr()
    }

    /// Accepts until `stop` turns true, then closes its listeners (a socket passed by
    /// systemd stays open there, queueing connections for the next fluxd) and lets the
    /// established connections go on for up to `config.drain`: `tcp` connections until either
    /// side closes, `http` ones until the request in flight is answered. What is left then is
    /// cut.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        // One limit over all listeners: it bounds fds, which are per process.
        let limit = Arc::new(Semaphore::new(self.config.max_connections));
        let mut sixes = self.listeners6.into_iter();
        let threads: Vec<_> = self
            .listeners
            .into_iter()
            .map(|l| std::iter::once(l).chain(sixes.next()).collect::<Vec<_>>())
            .enumerate()
            .map(|(i, l)| {
                let (routes, limit, stop) = (self.routes.clone(), limit.clone(), stop.clone());
                let timeouts = Timeouts {
                    connect: self.config.connect_timeout,
                    http_response: self.config.http_response_timeout,
                    half_closed_idle: self.config.half_close_timeout,
                };
                let (max, drain) = (self.config.max_connections, self.config.drain);
                let source = self.config.vip_source;
                std::thread::Builder::new()
                    .name(format!("flux-proxy-{i}"))
                    .spawn(move || {
                        serve_thread(l, routes, source, timeouts, limit, max, drain, stop, i == 0)
                    })
            })
            .collect();
        // Waiting on OS threads blocks: do it off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads.into_iter().flatten() {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// One proxy thread: a single-threaded runtime accepting on its own listener until `stop`,
/// then draining. Connections still open after the drain end with the runtime.
#[allow(clippy::too_many_arguments)]
fn serve_thread(
    listeners: Vec<std::net::TcpListener>,
    routes: Arc<ArcSwap<RouteTable>>,
    source: VipSource,
    timeouts: Timeouts,
    limit: Arc<Semaphore>,
    max: usize,
    drain: Duration,
    stop: watch::Receiver<bool>,
    report: bool,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a proxy thread");
            return;
        }
    };
    if report {
        tracing::debug!(
            bytes = super::tcp::future_size(),
            "the future of each tcp connection"
        );
    }
    rt.block_on(async move {
        tokio::spawn(anchor_timers());
        let loops = listeners
            .into_iter()
            .filter_map(|l| match TcpListener::from_std(l) {
                Ok(l) => Some(accept_loop(
                    l,
                    routes.clone(),
                    source,
                    timeouts,
                    limit.clone(),
                    stop.clone(),
                )),
                Err(e) => {
                    tracing::error!(error = %e, "cannot register the proxy listener");
                    None
                }
            });
        futures::future::join_all(loops).await;
        drain_connections(&limit, max, drain, report).await;
    });
}

/// How far ahead a proxy thread always has a timer due (see `anchor_timers`).
const TIMER_ANCHOR: Duration = Duration::from_secs(1);

/// Keeps a timer due within `TIMER_ANCHOR` on this thread, for as long as its runtime runs.
/// tokio wakes its own driver (an eventfd write, then one more epoll round) whenever a new
/// timer is due before every timer already set, and a connection sets two: its connect
/// timeout, and its half-close limit once one side has finished. Due later than this anchor,
/// neither does: two syscalls and a wakeup less per short connection, for one wakeup a second
/// per proxy thread.
async fn anchor_timers() {
    let mut tick = tokio::time::interval(TIMER_ANCHOR);
    loop {
        tick.tick().await;
    }
}

/// Waits until no proxied connection is open (every permit is back) or `drain` has passed.
/// The limit is shared by all proxy threads, so each waits for all: they end together.
async fn drain_connections(limit: &Semaphore, max: usize, drain: Duration, report: bool) {
    let open = max.saturating_sub(limit.available_permits());
    if open == 0 {
        return;
    }
    if report {
        tracing::info!(
            open,
            seconds = drain.as_secs_f64(),
            "draining established connections"
        );
    }
    let deadline = tokio::time::Instant::now() + drain;
    while limit.available_permits() < max {
        if tokio::time::Instant::now() >= deadline {
            if report {
                tracing::info!(
                    open = max.saturating_sub(limit.available_permits()),
                    "drain time over; cutting the connections still open"
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if report {
        tracing::info!("every connection ended");
    }
}

/// `n` IPv6-only listeners on `[::]:port`; none (with a note in the log) where the host has
/// no IPv6, which leaves IPv4 service untouched.
fn listen6(port: u16, n: usize) -> Vec<std::net::TcpListener> {
    let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    match (0..n).map(|_| listen(addr)).collect::<io::Result<Vec<_>>>() {
        Ok(l) => l,
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 proxy listener; IPv6 VIPs are not served here");
            Vec::new()
        }
    }
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        // IPv4 connections keep their own listener, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener, not per connection.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    let listener = socket.into();
    set_client_keepalive(&listener)?;
    Ok(listener)
}

/// TCP keepalive on client connections, inherited from the listener (no cost per connection):
/// a client whose host vanished without a FIN or RST is noticed within about 7 minutes
/// (5 min idle, then 4 probes 30 s apart) and both of its sockets are freed, instead of being
/// held until fluxd restarts. The instance side gets none: that would cost syscalls on every
/// connection, and a dead instance host is noticed as soon as the client sends again.
fn set_client_keepalive(listener: &std::net::TcpListener) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(300))
        .with_interval(Duration::from_secs(30))
        .with_retries(4);
    socket2::SockRef::from(listener).set_tcp_keepalive(&keepalive)
}

/// Pause after a failed accept (or a failed socket for the upstream side): EMFILE and friends
/// stay until some connection closes, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

static ACCEPT_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new();

async fn accept_loop(
    listener: TcpListener,
    routes: Arc<ArcSwap<RouteTable>>,
    source: VipSource,
    timeouts: Timeouts,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    // The upstream socket of the next connection, made before that connection is accepted: a
    // client is only taken off the listen backlog once both of its sockets exist. Otherwise,
    // at the fd limit, the accept would take the last fd and the connection would have to be
    // reset for want of an upstream socket, and so would every next one from the backlog;
    // this way they wait in the backlog and are served as soon as fds are free again.
    let mut upstream: Option<Upstream> = None;
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let socket = match upstream.take() {
            Some(s) => s,
            None => match Upstream::new() {
                Ok(s) => s,
                Err(e) => {
                    accept_backoff(&e, "no socket for the next connection").await;
                    continue;
                }
            },
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                let peer = Some(peer.ip());
                upstream = dispatch(
                    client, peer, socket, permit, &routes, source, timeouts, &stop,
                );
            }
            Err(e) => {
                upstream = Some(socket);
                accept_backoff(&e, "proxy accept failed").await;
            }
        }
    }
}

/// Backs off after an accept-side failure instead of spinning on a full fd table, with a
/// rate-limited warning.
async fn accept_backoff(e: &io::Error, what: &'static str) {
    if let Some(suppressed) = ACCEPT_WARNINGS.check(super::health::now_ms(), WARN_PERIOD_MS) {
        tracing::warn!(error = %e, suppressed, "{what}; backing off");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Hands an accepted connection to its service's path, on a task of its own that holds
/// `permit` until the connection is over, or resets it at once when it is for no service.
/// Returns the upstream socket if that path does not use it, for the next connection.
///
/// Each path is a task of its own type, so that a `tcp` connection's task is sized by the
/// `tcp` path alone (userspace memory per idle connection is a target).
#[allow(clippy::too_many_arguments)]
fn dispatch(
    client: TcpStream,
    peer: Option<std::net::IpAddr>,
    upstream: Upstream,
    permit: OwnedSemaphorePermit,
    routes: &Arc<ArcSwap<RouteTable>>,
    source: VipSource,
    timeouts: Timeouts,
    stop: &watch::Receiver<bool>,
) -> Option<Upstream> {
    let table = routes.load();
    let Some(vip) = destination::vip(&client, source, |v| table.services.contains_key(v)) else {
        reset(client);
        return Some(upstream);
    };
    let Some(service) = table.services.get(&vip).cloned() else {
        tracing::debug!(%vip, "connection to an address that is no service; reset");
        reset(client);
        return Some(upstream);
    };
    // A TCP connection to a `udp` service's VIP:port reaches no stream service.
    if service.protocol == Protocol::Udp {
        tracing::debug!(%vip, "tcp connection to a udp service; reset");
        reset(client);
        return Some(upstream);
    }
    // `http` connections take the service's own limits per request (`http::serve`).
    if service.protocol == Protocol::Http {
        let (routes, stop) = (routes.clone(), stop.clone());
        tokio::spawn(async move {
            super::http::serve(client, vip, routes, timeouts, stop).await;
            drop(permit);
        });
        return Some(upstream);
    }
    // The service's own limits where it has them, for the connection's whole life.
    let timeouts = service.timeouts(timeouts);
    tokio::spawn(super::tcp::Connection::new(
        client, peer, upstream, service, timeouts, permit,
    ));
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn accepted_client_sockets_inherit_keepalive() {
        let l = listen(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.set_nonblocking(false).unwrap();
        let (accepted, _) = l.accept().unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(300));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(30));
        assert_eq!(s.keepalive_retries().unwrap(), 4);
    }
}
