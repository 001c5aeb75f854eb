//! The `tcp` path: connect to an instance (the policy's pick, then every other one, before the
//! client notices a failure; `super::connect`), then forward both directions until both ended
//! (`super::session`). An instance that hangs up before anything was exchanged is replaced like
//! one that refused the connect. A failure on one side reaches the other as a reset, never as a
//! clean end of stream.
//!
//! Each connection is one task running `Connection`, a hand-written future: every idle
//! connection keeps one, so its layout is chosen rather than left to the compiler, which keeps
//! an async fn's arguments for its whole life and copies them again into each nested async fn
//! they are handed to (552 bytes as async fns, against what `future_size` reports now).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::connect::{self, Attempted, Connecting, Upstream};
use super::limits::{Timeouts, WARN_PERIOD_MS};
use super::reset::reset;
use super::route_table::{Backend, ServiceRoute};
use super::session::Session;
use super::way::Broken;

static LOCAL_FAILURE_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// The task of one accepted `tcp` connection: connects it, forwards it, and holds its place
/// under `--max-connections` until it is over.
pub(super) struct Connection {
    phase: Phase,
    /// Per connect attempt.
    connect_timeout: Duration,
    /// Idle limit of a half-closed connection.
    half_closed_idle: Duration,
    /// Given back (dropped) with the task.
    _permit: OwnedSemaphorePermit,
}

enum Phase {
    /// Finding an instance that accepts (boxed: its timer and waiter are only needed now).
    Connecting {
        client: TcpStream,
        connect: Connecting,
    },
    /// Forwarding between the client and `instance`.
    Forwarding(Forwarding),
    /// Failed: flushing what the peers were sent, then resetting both (boxed: only failing
    /// connections need it).
    Closing(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

struct Forwarding {
    client: TcpStream,
    backend: TcpStream,
    instance: Arc<Backend>,
    /// Kept for another connect phase if `instance` hangs up before anything is exchanged.
    service: Arc<ServiceRoute>,
    /// The instances that failed this connection so far (no allocation unless one did).
    tried: Vec<Arc<Backend>>,
    /// For the connection duration metric.
    started: Instant,
    session: Session,
}

impl Connection {
    /// `upstream` is the socket for the first connect attempt, made before the client was
    /// accepted; `peer` the client's address (for affinity).
    pub fn new(
        client: TcpStream,
        peer: Option<std::net::IpAddr>,
        upstream: Upstream,
        service: Arc<ServiceRoute>,
        timeouts: Timeouts,
        permit: OwnedSemaphorePermit,
    ) -> Connection {
        let connect = connect::start(Some(upstream), service, peer, Vec::new(), timeouts.connect);
        Connection {
            phase: Phase::Connecting { client, connect },
            connect_timeout: timeouts.connect,
            half_closed_idle: timeouts.half_closed_idle,
            _permit: permit,
        }
    }

    /// The connect phase ended: forward to the instance reached, or reset the client.
    fn connected(&self, client: TcpStream, attempted: Attempted) -> Phase {
        let Attempted {
            service,
            tried,
            result,
        } = attempted;
        match result {
            Ok(Some((instance, backend))) => {
                if let Err(e) = send_proxy_header(&service, &client, &backend) {
                    // The instance would take the client's bytes for a malformed header.
                    tracing::debug!(service = %service.name, instance = %instance.instance, error = %e, "cannot write the PROXY header; reset");
                    reset(backend);
                    reset(client);
                    return Phase::Done;
                }
                instance.metrics.active.inc();
                Phase::Forwarding(Forwarding {
                    client,
                    backend,
                    instance,
                    service,
                    tried,
                    started: Instant::now(),
                    session: Session::default(),
                })
            }
            Ok(None) => {
                tracing::debug!(service = %service.name, "no instance reachable; reset");
                reset(client);
                Phase::Done
            }
            Err(e) => {
                if let Some(suppressed) =
                    LOCAL_FAILURE_WARNINGS.check(super::health::now_ms(), WARN_PERIOD_MS)
                {
                    tracing::warn!(service = %service.name, error = %e, suppressed, "no local resources for the upstream connection; reset (instances not blamed)");
                }
                reset(client);
                Phase::Done
            }
        }
    }

    /// Forwarding ended: done, another connect phase after a hang-up, or closing after a
    /// failure (a FIN would tell the other side that the stream ended cleanly, and a reply cut
    /// short by a crashing instance would look complete to the client).
    fn forwarded(&self, f: Forwarding, result: Result<(), Broken>) -> Phase {
        let m = &f.instance.metrics;
        m.active.dec();
        match result {
            Ok(()) => {
                m.duration_seconds
                    .observe(f.started.elapsed().as_secs_f64());
                Phase::Done
            }
            Err(Broken::HungUp(e)) => {
                tracing::debug!(instance = %f.instance.instance, addr = %f.instance.addr, error = %e, "instance hung up before anything was exchanged; trying the next");
                f.instance.health.failed();
                m.connect_failures.inc();
                let mut tried = f.tried;
                tried.push(f.instance);
                // The client's address is read again rather than kept for the whole
                // connection: this phase is rare, an idle connection's size is not.
                let peer = f.client.peer_addr().ok().map(|a| a.ip());
                let connect = connect::start(None, f.service, peer, tried, self.connect_timeout);
                Phase::Connecting {
                    client: f.client,
                    connect,
                }
            }
            Err(Broken::Failed(e)) => {
                m.duration_seconds
                    .observe(f.started.elapsed().as_secs_f64());
                tracing::trace!(service = %f.service.name, instance = %f.instance.instance, error = %e, "connection ended with an error");
                Phase::Closing(Box::pin(flush_then_reset(f.client, f.backend)))
            }
        }
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let next = match &mut this.phase {
                Phase::Connecting { connect, .. } => {
                    let attempted = ready!(connect.as_mut().poll(cx));
                    let Phase::Connecting { client, .. } =
                        std::mem::replace(&mut this.phase, Phase::Done)
                    else {
                        unreachable!("matched above")
                    };
                    this.connected(client, attempted)
                }
                Phase::Forwarding(f) => {
                    let result = ready!(f.session.poll(
                        cx,
                        &f.client,
                        &f.backend,
                        &f.instance,
                        this.half_closed_idle
                    ));
                    let Phase::Forwarding(f) = std::mem::replace(&mut this.phase, Phase::Done)
                    else {
                        unreachable!("matched above")
                    };
                    this.forwarded(f, result.map(|_| ()))
                }
                Phase::Closing(closing) => {
                    ready!(closing.as_mut().poll(cx));
                    Phase::Done
                }
                Phase::Done => return Poll::Ready(()),
            };
            this.phase = next;
        }
    }
}

/// With `--proxy-protocol`, writes the header naming the client and the VIP to a freshly
/// connected instance, before any of the client's bytes. Its send buffer is empty, so the few
/// dozen bytes go in one non-blocking write; anything less is an error.
fn send_proxy_header(
    service: &ServiceRoute,
    client: &TcpStream,
    backend: &TcpStream,
) -> io::Result<()> {
    let Some((version, vip)) = service.proxy_protocol else {
        return Ok(());
    };
    let from = client.peer_addr()?;
    let header = super::proxy_header::Header::relayed(version, from, vip);
    let n = backend.try_write(header.bytes())?;
    if n != header.bytes().len() {
        return Err(io::Error::other("PROXY header only partly written"));
    }
    Ok(())
}

/// The size of a `tcp` connection's future, which every idle connection keeps in its task:
/// reported at start (debug level) and by a unit test.
pub(super) fn future_size() -> usize {
    std::mem::size_of::<Connection>()
}

/// What was already handed to a side's kernel goes out first (briefly): an instance that
/// answers in full and then closes with the request unread sends a reset, and its answer must
/// not be thrown away with it. Then both are reset. Also ends a failed upgraded `http`
/// connection (`super::http::upgrade`).
pub(super) async fn flush_then_reset(client: TcpStream, backend: TcpStream) {
    tokio::join!(flush(&client), flush(&backend));
    reset(backend);
    reset(client);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read, Write};

    /// A client already accepted by the proxy, and instances listening on loopback with the
    /// route to them: the proxy's connection makes its own upstream connections.
    struct Wires {
        client: std::net::TcpStream,
        /// The proxy's end of `client`, made a tokio stream inside the runtime.
        proxy_client: std::net::TcpStream,
        /// The instances' listeners, in the route's order (round-robin picks the first).
        instances: Vec<std::net::TcpListener>,
        route: Arc<ServiceRoute>,
    }

    fn wires(n: usize) -> Wires {
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (proxy_client, _) = front.accept().unwrap();
        proxy_client.set_nonblocking(true).unwrap();
        let instances: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let backends = instances
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let addr = l.local_addr().unwrap();
                Arc::new(instance(&format!("i{i}"), addr))
            })
            .collect();
        let route = Arc::new(ServiceRoute::new(
            "s".into(),
            crate::model::Protocol::Tcp,
            crate::model::Balance::RoundRobin,
            backends,
        ));
        Wires {
            client,
            proxy_client,
            instances,
            route,
        }
    }

    /// As `wires(1)`, with small buffers towards the client, so that what the client has not
    /// read yet waits in fluxd's pipe and send queue rather than in the client's kernel.
    fn slow_client_wires() -> Wires {
        let w = wires(1);
        socket2::SockRef::from(&w.client)
            .set_recv_buffer_size(8192)
            .unwrap();
        socket2::SockRef::from(&w.proxy_client)
            .set_send_buffer_size(8192)
            .unwrap();
        w
    }

    fn instance(name: &str, addr: std::net::SocketAddr) -> Backend {
        let labels = crate::metrics::InstanceLabels {
            service: "s".into(),
            instance: name.into(),
            host: String::new(),
            image: String::new(),
            tag: String::new(),
        };
        Backend {
            service: "s".into(),
            instance: name.into(),
            addr,
            health: Default::default(),
            metrics: crate::metrics::Metrics::new().instance(&labels, false),
            labels,
            extra: Default::default(),
            pool: Default::default(),
            group: 0,
            local: false,
            drained: false,
        }
    }

    fn timeouts(half_closed_idle: Duration) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(2),
            http_response: Duration::from_secs(2),
            half_closed_idle,
        }
    }

    /// The instance's side of the proxy's next connection to `l`, within 5 s.
    fn accept(l: &std::net::TcpListener) -> std::net::TcpStream {
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    return s;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("no connection from the proxy: {e}"),
            }
        }
    }

    /// Runs the proxy's `Connection` for the accepted client, to its end, bounded by 5 s.
    fn run(
        proxy_client: std::net::TcpStream,
        route: &Arc<ServiceRoute>,
        half_closed_idle: Duration,
    ) -> Result<(), tokio::time::error::Elapsed> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let limit = Arc::new(tokio::sync::Semaphore::new(1));
        rt.block_on(async {
            let client = TcpStream::from_std(proxy_client).unwrap();
            let permit = limit.try_acquire_owned().unwrap();
            let upstream = Upstream::new().unwrap();
            let c = Connection::new(
                client,
                None,
                upstream,
                route.clone(),
                timeouts(half_closed_idle),
                permit,
            );
            tokio::time::timeout(Duration::from_secs(5), c).await
        })
    }

    /// What an idle connection costs in userspace is mostly its task: this future, plus
    /// tokio's task header and one registration per socket. Reported (`--nocapture`), and
    /// bounded so that a change that makes it much larger shows here.
    #[test]
    fn the_connection_future_is_small() {
        let size = future_size();
        eprintln!("a tcp connection's future: {size} bytes");
        assert!(size <= 256, "connection future of {size} bytes");
    }

    /// An instance that closes (or resets) the connection before anything was exchanged is a
    /// failed connect: the client, which has not spoken, is served by the next instance
    /// without noticing, and the first one is marked failed.
    #[test]
    fn an_instance_that_hangs_up_before_anything_is_exchanged_is_replaced() {
        for reset_it in [false, true] {
            let w = wires(2);
            let [first, second] =
                [&w.instances[0], &w.instances[1]].map(|l| l.try_clone().unwrap());
            let quitter = std::thread::spawn(move || {
                let s = accept(&first);
                if reset_it {
                    socket2::SockRef::from(&s)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
            });
            let server = std::thread::spawn(move || {
                let mut s = accept(&second);
                s.write_all(b"second\n").unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                rest
            });
            let client = w.client;
            let reader = std::thread::spawn(move || {
                let mut line = String::new();
                std::io::BufReader::new(&client)
                    .read_line(&mut line)
                    .unwrap();
                client.shutdown(std::net::Shutdown::Write).unwrap();
                line
            });
            run(w.proxy_client, &w.route, Duration::from_secs(60)).expect("bounded");
            quitter.join().unwrap();
            assert_eq!(reader.join().unwrap(), "second\n", "reset: {reset_it}");
            assert_eq!(server.join().unwrap(), b"");
            let [a, b] = [&w.route.backends[0], &w.route.backends[1]];
            assert!(!a.health.is_live(), "reset: {reset_it}");
            assert_eq!(a.metrics.connect_failures.get(), 1);
            assert_eq!(a.metrics.connections.get(), 0);
            assert_eq!(b.metrics.connections.get(), 1);
            assert_eq!(b.metrics.retries.get(), 1);
            assert_eq!(b.metrics.bytes_to_client.get(), 7);
        }
    }

    /// An instance that closes after the client's first bytes reached it is not replaced (the
    /// request may have had effects): the client sees the end, and no other instance is
    /// tried.
    #[test]
    fn an_instance_that_hangs_up_after_the_client_spoke_is_kept() {
        let mut w = wires(2);
        w.client.write_all(b"hello").unwrap();
        let first = w.instances[0].try_clone().unwrap();
        let quitter = std::thread::spawn(move || {
            let mut s = accept(&first);
            let mut got = [0u8; 5];
            s.read_exact(&mut got).unwrap();
            got
        });
        let client = w.client;
        let reader = std::thread::spawn(move || {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut rest = Vec::new();
            let r = (&client).read_to_end(&mut rest).map(|_| rest);
            drop(client);
            r
        });
        run(w.proxy_client, &w.route, Duration::from_secs(60)).expect("bounded");
        assert_eq!(&quitter.join().unwrap(), b"hello");
        assert_eq!(
            reader.join().unwrap().unwrap(),
            b"",
            "a clean end, and nothing else"
        );
        w.instances[1].set_nonblocking(true).unwrap();
        assert!(
            w.instances[1].accept().is_err(),
            "the second instance must not be tried"
        );
        let a = &w.route.backends[0];
        assert!(a.health.is_live());
        assert_eq!(a.metrics.connections.get(), 1);
        assert_eq!(a.metrics.connect_failures.get(), 0);
        assert_eq!(a.metrics.bytes_to_instance.get(), 5);
    }

    /// An instance that resets the connection mid-stream: the client must see the reset, not
    /// a clean end of stream.
    #[test]
    fn a_reset_by_the_instance_reaches_the_client_as_a_reset() {
        let mut w = wires(1);
        w.client.write_all(b"request").unwrap();
        let l = w.instances[0].try_clone().unwrap();
        let resetter = std::thread::spawn(move || {
            let mut instance = accept(&l);
            let mut buf = [0u8; 7];
            instance.read_exact(&mut buf).unwrap();
            socket2::SockRef::from(&instance)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        run(w.proxy_client, &w.route, Duration::from_secs(60)).expect("bounded");
        resetter.join().unwrap();
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
        let l = w.instances[0].try_clone().unwrap();
        let answerer = std::thread::spawn(move || {
            let mut instance = accept(&l);
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
        run(w.proxy_client, &w.route, Duration::from_secs(60)).expect("bounded");
        answerer.join().unwrap();
        let (got, end) = reader.join().unwrap();
        assert_eq!(got, 128 << 10, "answer cut short; ended with {end:?}");
        assert_eq!(end, Some(io::ErrorKind::ConnectionReset));
    }

    /// The client is done sending and the instance neither answers nor closes: after the
    /// half-close limit both sockets are let go, and the client hears of it.
    #[test]
    fn a_half_closed_connection_idle_past_the_limit_is_ended() {
        let mut w = wires(1);
        w.client.write_all(b"request").unwrap();
        w.client.shutdown(std::net::Shutdown::Write).unwrap();
        let l = w.instances[0].try_clone().unwrap();
        let holder = std::thread::spawn(move || accept(&l));
        let started = Instant::now();
        run(w.proxy_client, &w.route, Duration::from_millis(300)).expect("bounded");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "ended after {took:?}");
        w.client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(
            w.client.read(&mut buf).is_err(),
            "the client must see the end"
        );
        drop(holder.join().unwrap());
    }

    /// Half-closed, and the client is slow to read: bytes waiting for it are not idleness.
    #[test]
    fn a_half_closed_connection_waiting_on_a_slow_reader_is_not_cut() {
        let mut w = slow_client_wires();
        w.client.write_all(b"request").unwrap();
        w.client.shutdown(std::net::Shutdown::Write).unwrap();
        let l = w.instances[0].try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut instance = accept(&l);
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
        run(w.proxy_client, &w.route, Duration::from_millis(300)).expect("bounded");
        writer.join().unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), 256 << 10);
        let m = &w.route.backends[0].metrics;
        assert_eq!(m.bytes_to_client.get(), 256 << 10);
    }

    /// Half-closed but still moving bytes the other way: never cut, however long it goes on.
    #[test]
    fn a_half_closed_connection_that_keeps_moving_is_not_cut() {
        let mut w = wires(1);
        w.client.write_all(b"request").unwrap();
        w.client.shutdown(std::net::Shutdown::Write).unwrap();
        let l = w.instances[0].try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut instance = accept(&l);
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
        run(w.proxy_client, &w.route, Duration::from_millis(300)).expect("bounded");
        writer.join().unwrap();
        let m = &w.route.backends[0].metrics;
        assert_eq!(m.bytes_to_client.get(), 80);
        assert_eq!(m.bytes_to_instance.get(), 7);
        let mut got = Vec::new();
        w.client.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 80);
    }
}
