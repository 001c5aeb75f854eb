//! The `tcp` path: connect to an instance (the policy's pick, then every other one, before the
//! client notices a failure), then splice both directions until both ended. A failure on one
//! side reaches the other as a reset, never as a clean end of stream.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};

use super::limits::{is_local_exhaustion, Timeouts};
use super::listener::{reset, WARN_PERIOD_MS};
use super::route_table::{Backend, ServiceRoute};
use super::splice;

static LOCAL_FAILURE_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// Serves one accepted client of a `tcp` service; `upstream` is the socket for the first
/// connect attempt, made before the client was accepted.
pub(super) async fn serve(
    client: TcpStream,
    upstream: TcpSocket,
    service: &ServiceRoute,
    timeouts: Timeouts,
) {
    let (backend, stream) = match connect_any(&client, upstream, service, timeouts.connect).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

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
