//! Small HTTP/1.1 backends and a keep-alive client for tests of `http` services. A backend
//! answers every request with a fixed status and its name as the body, and echoes what it saw
//! of the request in headers (`X-Backend`, `X-Seen-Host`, `X-Seen-Xff`); it keeps connections
//! alive until the client closes them or the backend is killed. `GET /healthz` answers a status
//! of its own, which a test may change (`set_health`), for active health checks.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::Netns;

pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddrV4,
    /// Connections accepted, and requests answered (`/healthz` apart).
    pub accepted: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    /// `GET /healthz` requests answered, and the status they get.
    pub health_checks: Arc<AtomicU64>,
    health: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpBackend {
    /// Listens on 127.0.0.1:`port` inside `ns` and answers every request with `status`.
    pub fn start(ns: &Netns, name: &str, port: u16, status: u16) -> HttpBackend {
        let addr = SocketAddrV4::new([127, 0, 0, 1].into(), port);
        let listener = ns.run(move || {
            let l = TcpListener::bind(addr).expect("bind backend");
            l.set_nonblocking(true).unwrap();
            l
        });
        let b = HttpBackend {
            name: name.into(),
            addr,
            accepted: Arc::default(),
            requests: Arc::default(),
            health_checks: Arc::default(),
            health: Arc::new(AtomicU16::new(status)),
            stop: Arc::default(),
            conns: Arc::default(),
            thread: None,
        };
        let (n, stop, conns, accepted) = (
            name.to_string(),
            b.stop.clone(),
            b.conns.clone(),
            b.accepted.clone(),
        );
        let counts = Counts {
            requests: b.requests.clone(),
            health_checks: b.health_checks.clone(),
            health: b.health.clone(),
        };
        let thread = std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let _ = s.set_nonblocking(false);
                        if let Ok(c) = s.try_clone() {
                            conns.lock().unwrap().push(c);
                        }
                        let (n, counts) = (n.clone(), counts.clone());
                        std::thread::spawn(move || serve(s, &n, status, &counts));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let mut b = b;
        b.thread = Some(thread);
        b
    }

    /// What `GET /healthz` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    /// As after a crash: the listening socket closes (new connections are refused) and every
    /// open connection is cut.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the connections of one backend share.
#[derive(Clone)]
struct Counts {
    requests: Arc<AtomicU64>,
    health_checks: Arc<AtomicU64>,
    health: Arc<AtomicU16>,
}

fn serve(s: TcpStream, name: &str, status: u16, counts: &Counts) {
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    loop {
        let Ok(Some(req)) = read_message(&mut r) else {
            return;
        };
        let status = if req.start.starts_with("GET /healthz ") {
            counts.health_checks.fetch_add(1, Ordering::Relaxed);
            counts.health.load(Ordering::SeqCst)
        } else {
            counts.requests.fetch_add(1, Ordering::Relaxed);
            status
        };
        let body = format!("{name}\n");
        let reason = if status < 400 { "OK" } else { "Error" };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\nx-backend: {name}\r\nx-seen-host: {}\r\nx-seen-xff: {}\r\nx-seen-body: {}\r\n\r\n",
            body.len(),
            req.headers.get("host").map_or("", String::as_str),
            req.headers.get("x-forwarded-for").map_or("", String::as_str),
            req.body.len(),
        );
        let mut out = head.into_bytes();
        if req.start.split(' ').next() != Some("HEAD") {
            out.extend_from_slice(body.as_bytes());
        }
        if w.write_all(&out).is_err() {
            return;
        }
    }
}

/// One HTTP/1.1 message (request or response), with a Content-Length body or none.
pub struct Message {
    /// The request line or the status line.
    pub start: String,
    /// Lower-cased names.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Message {
    pub fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// Reads one message; None on a clean end of stream before it.
pub fn read_message(r: &mut impl BufRead) -> std::io::Result<Option<Message>> {
    let mut start = String::new();
    if r.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let n: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(Some(Message {
        start: start.trim_end().to_string(),
        headers,
        body,
    }))
}

/// A keep-alive HTTP/1.1 client on one connection (from the calling thread's namespace).
pub struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddrV4) -> std::io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// Sends one request and reads its response.
    pub fn request(&mut self, method: &str, host: &str, body: &[u8]) -> std::io::Result<Message> {
        let mut req =
            format!("{method} /path?q=1 HTTP/1.1\r\nhost: {host}\r\nuser-agent: flux-test\r\n");
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req += &format!("content-length: {}\r\n", body.len());
        }
        req += "\r\n";
        let mut out = req.into_bytes();
        out.extend_from_slice(body);
        self.w.write_all(&out)?;
        read_message(&mut self.r)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"))
    }

    /// Sends a request whose body goes in `chunks`, `gap` apart (a slow upload), and reads
    /// its response.
    pub fn request_slowly(
        &mut self,
        method: &str,
        host: &str,
        chunks: &[&[u8]],
        gap: Duration,
    ) -> std::io::Result<Message> {
        let len: usize = chunks.iter().map(|c| c.len()).sum();
        let head =
            format!("{method} /upload HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len}\r\n\r\n");
        self.w.write_all(head.as_bytes())?;
        for c in chunks {
            std::thread::sleep(gap);
            self.w.write_all(c)?;
        }
        read_message(&mut self.r)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"))
    }

    pub fn get(&mut self, host: &str) -> std::io::Result<Message> {
        self.request("GET", host, b"")
    }
}
