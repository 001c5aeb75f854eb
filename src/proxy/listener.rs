//! The proxy's listener: accepts redirected connections, finds the service from the original
//! destination, connects to an instance (trying the next on failure) and splices the bytes;
//! connections of `http` services go to the HTTP-aware path (`super::http`) instead.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::limits::{is_local_exhaustion, Timeouts};
use super::routes::{Backend, RouteTable, ServiceRoute};
use super::splice;
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
                .map(|_| listen(config.listen))
                .collect::<io::Result<Vec<_>>>()?,
        };
        Ok(Proxy {
            config,
            routes,
            listeners,
            inherited: inherited.is_some(),
        })
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
        let threads: Vec<_> = self
            .listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let (routes, limit, stop) = (self.routes.clone(), limit.clone(), stop.clone());
                let timeouts = Timeouts {
                    connect: self.config.connect_timeout,
                    http_response: self.config.http_response_timeout,
                    half_closed_idle: self.config.half_close_timeout,
                };
                let (max, drain) = (self.config.max_connections, self.config.drain);
                std::thread::Builder::new()
                    .name(format!("flux-proxy-{i}"))
                    .spawn(move || {
                        serve_thread(l, routes, timeouts, limit, max, drain, stop, i == 0)
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
    listener: std::net::TcpListener,
    routes: Arc<ArcSwap<RouteTable>>,
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
    rt.block_on(async move {
        match TcpListener::from_std(listener) {
            Ok(l) => accept_loop(l, routes, timeouts, limit.clone(), stop).await,
            Err(e) => tracing::error!(error = %e, "cannot register the proxy listener"),
        }
        drain_connections(&limit, max, drain, report).await;
    });
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

fn listen(addr: SocketAddrV4) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener, not per connection.
    socket.set_nodelay(true)?;
    socket.bind(&SocketAddr::V4(addr).into())?;
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

/// At most one warning per this period for each kind of resource failure; the rest are
/// counted and reported with the next warning. A full fd table fails every accept attempt
/// (20 a second per proxy thread) for as long as it lasts.
const WARN_PERIOD_MS: u64 = 10_000;

static ACCEPT_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new();
static LOCAL_FAILURE_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new();

async fn accept_loop(
    listener: TcpListener,
    routes: Arc<ArcSwap<RouteTable>>,
    timeouts: Timeouts,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    // The upstream socket of the next connection, made before that connection is accepted: a
    // client is only taken off the listen backlog once both of its sockets exist. Otherwise,
    // at the fd limit, the accept would take the last fd and the connection would have to be
    // reset for want of an upstream socket, and so would every next one from the backlog;
    // this way they wait in the backlog and are served as soon as fds are free again.
    let mut upstream: Option<TcpSocket> = None;
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
            None => match TcpSocket::new_v4() {
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
            Ok((client, _)) => {
                let (routes, stop) = (routes.clone(), stop.clone());
                tokio::spawn(async move {
                    handle(client, socket, routes, timeouts, stop).await;
                    drop(permit);
                });
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

async fn handle(
    client: TcpStream,
    upstream: TcpSocket,
    routes: Arc<ArcSwap<RouteTable>>,
    timeouts: Timeouts,
    stop: watch::Receiver<bool>,
) {
    let Some(vip) = original_dst(&client) else {
        return reset(client);
    };
    let table = routes.load();
    let Some(service) = table.services.get(&vip).cloned() else {
        tracing::debug!(%vip, "connection to an address that is no service; reset");
        return reset(client);
    };
    drop(table);
    if service.protocol == Protocol::Http {
        drop(upstream);
        // Boxed: the HTTP path's state is large, and inline it would size every idle `tcp`
        // connection's future too (userspace memory per idle connection is a target).
        return Box::pin(super::http::serve(client, vip, routes, timeouts, stop)).await;
    }
    let (backend, stream) = match connect_any(&client, upstream, &service, timeouts.connect).await {
        Ok(Some(connected)) => connected,
        Ok(None) => {
            tracing::debug!(service = %service.name, "no instance reachable; reset");
            return reset(client);
        }
        Err(e) => {
            if let Some(suppressed) =
                LOCAL_FAILURE_WARNINGS.check(super::health::now_ms(), WARN_PERIOD_MS)
            {
                tracing::warn!(service = %service.name, error = %e, suppressed, "no local resources for the upstream connection; reset (instances not blamed)");
            }
            return reset(client);
        }
    };
    // The client side has TCP_NODELAY from the listener.
    let _ = stream.set_nodelay(true);
    let m = &backend.metrics;
    m.connections.inc();
    m.active.inc();
    let started = Instant::now();
    let result = forward(client, stream, m, timeouts.half_closed_idle).await;
    m.duration_seconds.observe(started.elapsed().as_secs_f64());
    m.active.dec();
    if let Err(e) = result {
        tracing::trace!(service = %service.name, instance = %backend.instance, error = %e, "connection ended with an error");
    }
}

/// Splices until both directions ended, then closes both sockets. If one side failed (a reset
/// by the instance or the client, a failed write, no pipe), the other side is reset too: a
/// FIN would tell it that the stream ended cleanly, and a reply cut short by a crashing
/// instance would look complete to the client.
async fn forward(
    client: TcpStream,
    backend: TcpStream,
    metrics: &crate::metrics::InstanceMetrics,
    half_closed_idle: Duration,
) -> io::Result<splice::Transferred> {
    let result = splice::bidirectional(&client, &backend, metrics, half_closed_idle).await;
    if result.is_err() {
        // What was already handed to a side's kernel goes out first (briefly): an instance that
        // answers in full and then closes with the request unread sends a reset, and its answer
        // must not be thrown away with it.
        tokio::join!(flush(&client), flush(&backend));
        reset(backend);
        reset(client);
    }
    result
}

/// Waits, at most `FLUSH_LIMIT`, until the peer has acknowledged everything queued on `s`.
async fn flush(s: &TcpStream) {
    const FLUSH_LIMIT: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + FLUSH_LIMIT;
    while unacknowledged(s).is_ok_and(|n| n > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Bytes queued on `s` that its peer has not acknowledged yet (SIOCOUTQ); 0 once the
/// connection is closed (a reset from the peer leaves the count standing, and nothing more will
/// be acknowledged).
fn unacknowledged(s: &impl std::os::fd::AsRawFd) -> io::Result<usize> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO fills at most `len` bytes of `info`, a live local of that size.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    const TCP_CLOSE: u8 = 7;
    if info.tcpi_state == TCP_CLOSE {
        return Ok(0);
    }
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ on sockets) writes one int through the pointer, which points
    // to a live local; the fd stays open for the call (`s` is borrowed).
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n.max(0) as usize)
    }
}

/// Tries the policy's pick, then every other instance, until one accepts and is still there;
/// each failure is recorded so that the next connections avoid that instance until its retry
/// is due. The full order is only computed when the first choice fails. `upstream` is the
/// socket for the first attempt, made before the client was accepted.
///
/// Ok(None) when no instance could be reached; Err when this process could not make the
/// upstream connection at all (out of fds, memory or local ports): no instance is to blame
/// for that, none is marked failed, and the others would fail the same way.
async fn connect_any(
    client: &TcpStream,
    upstream: TcpSocket,
    service: &ServiceRoute,
    timeout: Duration,
) -> io::Result<Option<(Arc<Backend>, TcpStream)>> {
    let mut upstream = Some(upstream);
    let first = service.first_choice().cloned();
    if let Some(b) = &first {
        if let Some(stream) = try_backend(client, upstream.take(), b, timeout).await? {
            return Ok(Some((b.clone(), stream)));
        }
    }
    for b in service.connect_order() {
        if first.as_ref().is_some_and(|f| Arc::ptr_eq(f, &b)) {
            continue;
        }
        if let Some(stream) = try_backend(client, upstream.take(), &b, timeout).await? {
            // Reached only after another instance failed this connection.
            b.metrics.retries.inc();
            return Ok(Some((b, stream)));
        }
    }
    Ok(None)
}

/// One connect attempt, on `socket` or a new one. Ok(None) when the instance failed (and is
/// marked so); Err when the failure is this process's own (see `is_local_exhaustion`).
async fn try_backend(
    client: &TcpStream,
    socket: Option<TcpSocket>,
    backend: &Backend,
    timeout: Duration,
) -> io::Result<Option<TcpStream>> {
    let started = Instant::now();
    let socket = match socket {
        Some(s) => s,
        None => TcpSocket::new_v4()?,
    };
    let why = match tokio::time::timeout(timeout, socket.connect(backend.addr.into())).await {
        Ok(Ok(stream)) => {
            // Connect time only: first_ready waits for whoever speaks first.
            backend
                .metrics
                .connect_seconds
                .observe(started.elapsed().as_secs_f64());
            match first_ready(client, &stream).await {
                Ok(()) => {
                    backend.health.succeeded();
                    return Ok(Some(stream));
                }
                Err(e) => e.to_string(),
            }
        }
        Ok(Err(e)) if is_local_exhaustion(&e) => return Err(e),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "connect timed out".to_string(),
    };
    tracing::debug!(instance = %backend.instance, addr = %backend.addr, error = %why, "instance failed; trying the next");
    backend.health.failed();
    backend.metrics.connect_failures.inc();
    Ok(None)
}

/// A process that dies just after the kernel accepted a connection for it resets that
/// connection before anything is exchanged. Until the client has sent a byte, such a backend
/// can be swapped for another without the client noticing: wait for whichever side speaks
/// first, and if it is the backend hanging up, report it as a failed connect.
async fn first_ready(client: &TcpStream, backend: &TcpStream) -> io::Result<()> {
    // Peeks, not readiness: tokio reports a fresh accepted socket readable before any data.
    let (mut a, mut b) = ([0u8; 1], [0u8; 1]);
    tokio::select! {
        biased;
        _ = client.peek(&mut a) => Ok(()),
        r = backend.peek(&mut b) => match r {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed before the client spoke",
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// The VIP:port the client connected to, before the nat redirect.
fn original_dst(client: &TcpStream) -> Option<SocketAddrV4> {
    let sin = getsockopt(client, OriginalDst).ok()?;
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

/// Closes with RST, so the peer learns at once that nothing serves it (no FIN, no hang).
fn reset(socket: TcpStream) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    drop(socket);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn accepted_client_sockets_inherit_keepalive() {
        let l = listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.set_nonblocking(false).unwrap();
        let (accepted, _) = l.accept().unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(300));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(30));
        assert_eq!(s.keepalive_retries().unwrap(), 4);
    }

    /// A client, the proxy's two sockets (as tokio streams, to be made inside a runtime), and
    /// the instance: real loopback connections.
    struct Wires {
        client: std::net::TcpStream,
        proxy_client: std::net::TcpStream,
        proxy_backend: std::net::TcpStream,
        instance: std::net::TcpStream,
    }

    fn wires() -> Wires {
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let back = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (proxy_client, _) = front.accept().unwrap();
        let proxy_backend = std::net::TcpStream::connect(back.local_addr().unwrap()).unwrap();
        let (instance, _) = back.accept().unwrap();
        for s in [&proxy_client, &proxy_backend] {
            s.set_nonblocking(true).unwrap();
        }
        Wires {
            client,
            proxy_client,
            proxy_backend,
            instance,
        }
    }

    /// As `wires`, with small buffers towards the client, so that what the client has not read
    /// yet waits in fluxd's pipe and send queue rather than in the client's kernel.
    fn slow_client_wires() -> Wires {
        let w = wires();
        socket2::SockRef::from(&w.client)
            .set_recv_buffer_size(8192)
            .unwrap();
        socket2::SockRef::from(&w.proxy_client)
            .set_send_buffer_size(8192)
            .unwrap();
        w
    }

    /// Runs `forward` between the proxy's two sockets, bounded by 5 s.
    fn run_forward(
        proxy_client: std::net::TcpStream,
        proxy_backend: std::net::TcpStream,
        half_closed_idle: Duration,
    ) -> Result<io::Result<splice::Transferred>, tokio::time::error::Elapsed> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let labels = crate::metrics::InstanceLabels {
            service: "s".into(),
            instance: "i".into(),
            host: String::new(),
            image: String::new(),
            tag: String::new(),
        };
        let metrics = crate::metrics::Metrics::new().instance(&labels, false);
        rt.block_on(async {
            let c = TcpStream::from_std(proxy_client).unwrap();
            let b = TcpStream::from_std(proxy_backend).unwrap();
            tokio::time::timeout(
                Duration::from_secs(5),
                forward(c, b, &metrics, half_closed_idle),
            )
            .await
        })
    }

    /// An instance that resets the connection mid-stream: the client must see the reset, not
    /// a clean end of stream.
    #[test]
    fn a_reset_by_the_instance_reaches_the_client_as_a_reset() {
        let mut w = wires();
        w.client.write_all(b"request").unwrap();
        let instance = w.instance;
        let resetter = std::thread::spawn(move || {
            let mut instance = instance;
            let mut buf = [0u8; 7];
            instance.read_exact(&mut buf).unwrap();
            socket2::SockRef::from(&instance)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let result = run_forward(w.proxy_client, w.proxy_backend, Duration::from_secs(60));
        resetter.join().unwrap();
        assert!(matches!(result, Ok(Err(_))), "{result:?}");
        w.client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let read = w.client.read(&mut buf);
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the client must see a reset"
        );
    }

    /// An instance that answers in full and then closes with the rest of the request unread
    /// (its kernel sends a reset, not a FIN): the client gets the whole answer before it hears
    /// of the reset, even when it is slow to read it.
    #[test]
    fn an_answer_sent_before_a_reset_reaches_the_client_in_full() {
        let mut w = slow_client_wires();
        // 64 KiB of request, of which the instance reads 7 bytes before answering and closing.
        w.client.write_all(&[1u8; 64 << 10]).unwrap();
        let instance = w.instance;
        let answerer = std::thread::spawn(move || {
            let mut instance = instance;
            let mut head = [0u8; 7];
            instance.read_exact(&mut head).unwrap();
            instance.write_all(&[5u8; 128 << 10]).unwrap();
            // Its kernel drops what it has not sent when it resets: let all of it go first.
            let deadline = Instant::now() + Duration::from_secs(5);
            while unacknowledged(&instance).unwrap() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let mut client = w.client;
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut got = 0;
            let mut buf = [0u8; 16 << 10];
            loop {
                match client.read(&mut buf) {
                    Ok(0) => return (got, None),
                    Ok(n) => got += n,
                    Err(e) => return (got, Some(e.kind())),
                }
            }
        });
        let result = run_forward(w.proxy_client, w.proxy_backend, Duration::from_secs(60));
        answerer.join().unwrap();
        assert!(matches!(&result, Ok(Err(_))), "{result:?}");
        let (got, end) = reader.join().unwrap();
        assert_eq!(got, 128 << 10, "answer cut short; ended with {end:?}");
        assert_eq!(end, Some(io::ErrorKind::ConnectionReset));
    }

    /// The client is done sending and the instance neither answers nor closes: after the
    /// half-close limit both sockets are let go, and the client hears of it.
    #[test]
    fn a_half_closed_connection_idle_past_the_limit_is_ended() {
        let mut w = wires();
        w.client.write_all(b"request").unwrap();
        w.client.shutdown(std::net::Shutdown::Write).unwrap();
        let started = Instant::now();
        let result = run_forward(w.proxy_client, w.proxy_backend, Duration::from_millis(300));
        let took = started.elapsed();
        assert!(
            matches!(&result, Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{result:?}"
        );
        assert!(took >= Duration::from_millis(300), "ended after {took:?}");
        w.client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(
            w.client.read(&mut buf).is_err(),
            "the client must see the end"
        );
        drop(w.instance);
    }

    /// Half-closed, and the client is slow to read: bytes waiting for it are not idleness.
    #[test]
    fn a_half_closed_connection_waiting_on_a_slow_reader_is_not_cut() {
        let mut w = slow_client_wires();
        w.client.write_all(b"request").unwrap();
        w.client.shutdown(std::net::Shutdown::Write).unwrap();
        let instance = w.instance;
        let writer = std::thread::spawn(move || {
            let mut instance = instance;
            let mut got = Vec::new();
            instance.read_to_end(&mut got).unwrap();
            // More than the small buffers and the pipe hold together.
            instance.write_all(&[5u8; 256 << 10]).unwrap();
        });
        let mut client = w.client;
        let reader = std::thread::spawn(move || {
            // Reads nothing for twice the limit, then everything.
            std::thread::sleep(Duration::from_millis(600));
            let mut got = Vec::new();
            client.read_to_end(&mut got).map(|_| got.len())
        });
        let result = run_forward(w.proxy_client, w.proxy_backend, Duration::from_millis(300));
        writer.join().unwrap();
        assert!(matches!(&result, Ok(Ok(_))), "{result:?}");
        assert_eq!(reader.join().unwrap().unwrap(), 256 << 10);
    }

    /// Half-closed but still moving bytes the other way: never cut, however long it goes on.
    #[test]
    fn a_half_closed_connection_that_keeps_moving_is_not_cut() {
        let mut w = wires();
        w.client.write_all(b"request").unwrap();
        w.client.shutdown(std::net::Shutdown::Write).unwrap();
        let instance = w.instance;
        let writer = std::thread::spawn(move || {
            let mut instance = instance;
            // Read first: closing with unread bytes would send a reset, not a FIN.
            let mut got = Vec::new();
            instance.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"request");
            // 8 writes 100 ms apart: 800 ms in all, well past the 300 ms limit.
            for _ in 0..8 {
                instance.write_all(b"0123456789").unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let result = run_forward(w.proxy_client, w.proxy_backend, Duration::from_millis(300));
        writer.join().unwrap();
        let moved = result.expect("bounded").expect("not cut");
        assert_eq!(moved.backend_to_client, 80);
        assert_eq!(moved.client_to_backend, 7);
        let mut got = Vec::new();
        w.client.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 80);
    }
}
