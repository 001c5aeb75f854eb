//! Connecting a `tcp` connection to an instance: the policy's pick, then every other instance
//! not yet tried for this connection, until one accepts. Each failure is recorded so that the
//! next connections avoid that instance until its retry is due. Runs boxed, apart from the
//! connection's long-lived state: its timer and readiness waiter are only needed meanwhile.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::limits::is_local_exhaustion;
use super::route_table::{Backend, ServiceRoute};

/// A socket for the upstream side, made before the client is accepted (see the accept loop):
/// non-blocking, close-on-exec, not yet connected.
pub(crate) struct Upstream(socket2::Socket);

impl Upstream {
    /// One syscall: the flags are given to socket(2) itself. IPv4, the family of nearly every
    /// instance; `for_addr` makes one for an IPv6 instance.
    pub fn new() -> io::Result<Upstream> {
        Upstream::of(AddressFamily::Inet)
    }

    /// A socket of `addr`'s family.
    fn for_addr(addr: &SocketAddr) -> io::Result<Upstream> {
        match addr {
            SocketAddr::V4(_) => Upstream::of(AddressFamily::Inet),
            SocketAddr::V6(_) => Upstream::of(AddressFamily::Inet6),
        }
    }

    fn of(family: AddressFamily) -> io::Result<Upstream> {
        let fd = socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        Ok(Upstream(socket2::Socket::from(fd)))
    }
}

/// The connect phase of one connection, boxed (see the module's doc).
pub(super) type Connecting = Pin<Box<dyn Future<Output = Attempted> + Send>>;

/// What a connect phase ends with: the service and the instances tried (handed back for a
/// later phase), and the instance reached with its socket, if any (see `any`).
pub(super) struct Attempted {
    pub service: Arc<ServiceRoute>,
    pub tried: Vec<Arc<Backend>>,
    pub result: io::Result<Option<(Arc<Backend>, TcpStream)>>,
}

/// Starts a connect phase: `any`, owning what it needs until it ends.
pub(super) fn start(
    upstream: Option<Upstream>,
    service: Arc<ServiceRoute>,
    client: Option<IpAddr>,
    mut tried: Vec<Arc<Backend>>,
    timeout: Duration,
) -> Connecting {
    Box::pin(async move {
        let result = any(upstream, &service, client, &mut tried, timeout).await;
        Attempted {
            service,
            tried,
            result,
        }
    })
}

/// Tries the policy's pick, then every other instance, skipping those in `tried` (which failed
/// this connection already); each one that fails now joins `tried`. The full order is only
/// computed when the first choice fails. `upstream` is the socket for the first attempt.
///
/// Ok(None) when no instance could be reached; Err when this process could not make the
/// upstream connection at all (out of fds, memory or local ports): no instance is to blame
/// for that, none is marked failed, and the others would fail the same way.
async fn any(
    upstream: Option<Upstream>,
    service: &ServiceRoute,
    client: Option<IpAddr>,
    tried: &mut Vec<Arc<Backend>>,
    timeout: Duration,
) -> io::Result<Option<(Arc<Backend>, TcpStream)>> {
    let mut upstream = upstream;
    let was_tried =
        |tried: &[Arc<Backend>], b: &Arc<Backend>| tried.iter().any(|t| Arc::ptr_eq(t, b));
    if let Some(b) = service.first_choice(client).cloned() {
        if !was_tried(tried, &b) {
            if let Some(stream) = attempt(upstream.take(), &b, timeout).await? {
                if !tried.is_empty() {
                    b.metrics.retries.inc();
                }
                return Ok(Some((b, stream)));
            }
            tried.push(b);
        }
    }
    for b in service.connect_order(client) {
        if was_tried(tried, &b) {
            continue;
        }
        if let Some(stream) = attempt(upstream.take(), &b, timeout).await? {
            // Reached only after another instance failed this connection.
            b.metrics.retries.inc();
            return Ok(Some((b, stream)));
        }
        tried.push(b);
    }
    Ok(None)
}

/// One connect attempt, on `socket` or a new one. Ok(None) when the instance failed (and is
/// marked so); Err when the failure is this process's own (see `is_local_exhaustion`).
async fn attempt(
    socket: Option<Upstream>,
    backend: &Backend,
    timeout: Duration,
) -> io::Result<Option<TcpStream>> {
    let started = Instant::now();
    // The socket made ahead is IPv4; an IPv6 instance needs its own (the IPv4 one is closed).
    let socket = match socket {
        Some(s) if backend.addr.is_ipv4() => s,
        _ => Upstream::for_addr(&backend.addr)?,
    };
    let why = match tokio::time::timeout(timeout, connect(socket, backend.addr)).await {
        Ok(Ok(stream)) => {
            backend
                .metrics
                .connect_seconds
                .observe(started.elapsed().as_secs_f64());
            return Ok(Some(stream));
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

/// Connects `socket` to `addr`. A connect that failed shows in the readiness event itself
/// (EPOLLHUP, EPOLLERR), so the socket's error is only read then: a successful connect costs
/// no getsockopt(SO_ERROR).
async fn connect(socket: Upstream, addr: SocketAddr) -> io::Result<TcpStream> {
    let Upstream(socket) = socket;
    socket.set_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream
        .ready(Interest::WRITABLE.add(Interest::ERROR))
        .await?;
    if ready.is_write_closed() || ready.is_error() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}
