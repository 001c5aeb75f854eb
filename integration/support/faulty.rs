//! Backends that misbehave on purpose, for the fault suite: small TCP servers on threads, with
//! their listening socket inside a host's namespace (on 127.0.0.1, registered with `fluxctl
//! instance add`), each showing one fault the way a broken application does, deterministically.
//! Every loop and every read is bounded, and everything stops on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::netns::Netns;

/// What a `Faulty` backend does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Resets (SO_LINGER 0, close) as soon as it accepts, before a byte either way: a process
    /// that dies right after the kernel accepted for it.
    ResetOnAccept,
    /// Reads one request line, then resets: a crash in the middle of a request.
    ResetAfterRequest,
    /// Reads and discards whatever arrives, never writes a byte; closes at end of stream: a
    /// hung request handler.
    Silent,
    /// Half-closes, on the request's first line: `server-first` writes `reply\n`, shuts its
    /// write side, then counts the bytes that still arrive until end of stream and reports
    /// them (`next_report`); `client-first` counts bytes until end of stream, then writes
    /// `got N\n` and closes.
    HalfClose,
    /// Writes `slow\n`, then `SLOW_BYTES` of `pattern` in `SLOW_CHUNK` pieces `SLOW_PAUSE`
    /// apart (about 20 KiB/s), then closes.
    Slow,
}

pub const SLOW_BYTES: usize = 64 * 1024;
const SLOW_CHUNK: usize = 4 * 1024;
const SLOW_PAUSE: Duration = Duration::from_millis(200);

/// Longest any handler waits for its peer; handlers also end when the backend is dropped.
const HANDLER_LIMIT: Duration = Duration::from_secs(60);

/// Byte `i` of the slow backend's body: not periodic at any power of two, so a dropped,
/// repeated or reordered chunk shows.
pub fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i / 251)) as u8
}

pub struct Faulty {
    pub addr: SocketAddrV4,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// `HalfClose`: bytes received after the backend shut its write side, per connection.
    reports: Mutex<Receiver<u64>>,
    thread: Option<JoinHandle<()>>,
}

impl Faulty {
    /// Listens on 127.0.0.1 (a free port) inside `ns`.
    pub fn start(ns: &Netns, fault: Fault) -> Faulty {
        let listener = ns.run(|| {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind faulty backend");
            l.set_nonblocking(true).unwrap();
            l
        });
        // The socket stays in `ns` wherever it is used: the accept loop may run anywhere.
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            a => panic!("{a}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (tx, rx) = channel();
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            accept_loop(&listener, &s, &a, |c| {
                let (stop, tx) = (s.clone(), tx.clone());
                std::thread::spawn(move || serve(c, fault, &stop, &tx));
            })
        });
        Faulty {
            addr,
            accepted,
            stop,
            reports: Mutex::new(rx),
            thread: Some(thread),
        }
    }

    /// The next `HalfClose` report: bytes received after the write side was shut.
    pub fn next_report(&self, limit: Duration) -> Option<u64> {
        self.reports.lock().unwrap().recv_timeout(limit).ok()
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until `stop`, handing each connection (blocking, accepted count bumped) to `each`.
fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    accepted: &AtomicU64,
    mut each: impl FnMut(TcpStream),
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((c, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let _ = c.set_nonblocking(false);
                each(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve(c: TcpStream, fault: Fault, stop: &AtomicBool, reports: &Sender<u64>) {
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    match fault {
        Fault::ResetOnAccept => rst(c),
        Fault::ResetAfterRequest => {
            let mut r = BufReader::new(&c);
            if read_line(&mut r, stop).is_some() {
                rst(c);
            }
        }
        Fault::Silent => {
            count_until_eof(&mut &c, stop);
        }
        Fault::HalfClose => {
            let mut r = BufReader::new(&c);
            match read_line(&mut r, stop).as_deref() {
                Some("server-first") => {
                    if (&c).write_all(b"reply\n").is_err() || c.shutdown(Shutdown::Write).is_err() {
                        return;
                    }
                    if let Some(n) = count_until_eof(&mut r, stop) {
                        let _ = reports.send(n);
                    }
                }
                Some("client-first") => {
                    if let Some(n) = count_until_eof(&mut r, stop) {
                        let _ = (&c).write_all(format!("got {n}\n").as_bytes());
                    }
                }
                _ => {}
            }
        }
        Fault::Slow => {
            let mut w = &c;
            if w.write_all(b"slow\n").is_err() {
                return;
            }
            let body: Vec<u8> = (0..SLOW_BYTES).map(pattern).collect();
            for chunk in body.chunks(SLOW_CHUNK) {
                if stop.load(Ordering::SeqCst) || w.write_all(chunk).is_err() {
                    return;
                }
                std::thread::sleep(SLOW_PAUSE);
            }
        }
    }
}

/// Closes with RST: SO_LINGER 0, then close.
fn rst(c: TcpStream) {
    let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
    drop(c);
}

/// One line without its newline; None at end of stream, on error, on stop or after the limit.
fn read_line(r: &mut impl BufRead, stop: &AtomicBool) -> Option<String> {
    let started = Instant::now();
    let mut line = Vec::new();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < HANDLER_LIMIT {
        match r.read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) if line.ends_with(b"\n") => {
                line.pop();
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Reads until end of stream; the byte count, or None on error, on stop or after the limit.
fn count_until_eof(r: &mut impl Read, stop: &AtomicBool) -> Option<u64> {
    let started = Instant::now();
    let mut buf = [0u8; 16 * 1024];
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < HANDLER_LIMIT {
        match r.read(&mut buf) {
            Ok(0) => return Some(n),
            Ok(k) => n += k as u64,
            Err(e) if is_timeout(&e) => {}
            Err(_) => return None,
        }
    }
    None
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// An instance that flaps: a name server (the `who_serves` protocol: its name and a newline,
/// then an echo until end of stream) whose listening socket is open for `period`, closed for
/// `period`, again and again for `flapping`, then open for good. Connections it accepted are
/// served to the end either way, as by a process whose listener restarts.
pub struct Flapper {
    pub addr: SocketAddrV4,
    /// Whether the flapping is over (the listener stays open from then on).
    pub steady: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Flapper {
    pub fn start(ns: &Netns, name: &str, period: Duration, flapping: Duration) -> Flapper {
        let stop = Arc::new(AtomicBool::new(false));
        let steady = Arc::new(AtomicBool::new(false));
        let (s, st, name) = (stop.clone(), steady.clone(), name.to_string());
        let (addr_tx, addr_rx) = channel();
        // The thread lives in the namespace, so each new listener is bound there.
        let thread = ns.spawn(move || {
            // std sets SO_REUSEADDR: the port can be bound again at once.
            let bind = |addr: &str| {
                let l = TcpListener::bind(addr).expect("bind flapper");
                l.set_nonblocking(true).unwrap();
                l
            };
            let first = bind("127.0.0.1:0");
            let addr = first.local_addr().unwrap().to_string();
            let _ = addr_tx.send(first.local_addr().unwrap());
            let started = Instant::now();
            let mut listener = Some(first);
            while !s.load(Ordering::SeqCst) {
                let flapping_now = started.elapsed() < flapping;
                st.store(!flapping_now, Ordering::SeqCst);
                let l = listener.take().unwrap_or_else(|| bind(&addr));
                // Open for one period, or for good once steady.
                let opened = Instant::now();
                while !s.load(Ordering::SeqCst) && !(flapping_now && opened.elapsed() >= period) {
                    match l.accept() {
                        Ok((c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let name = name.clone();
                            std::thread::spawn(move || name_and_echo(c, &name));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
                // Closing the listener resets what waits in its backlog, as a crash does.
                drop(l);
                if flapping_now {
                    std::thread::sleep(period);
                }
            }
        });
        let addr = match addr_rx.recv().expect("flapper bound") {
            std::net::SocketAddr::V4(a) => a,
            a => panic!("{a}"),
        };
        Flapper {
            addr,
            steady,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Flapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn name_and_echo(mut c: TcpStream, name: &str) {
    let _ = c.set_read_timeout(Some(HANDLER_LIMIT));
    if c.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = c.shutdown(Shutdown::Write);
}
