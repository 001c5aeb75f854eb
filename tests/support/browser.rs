//! A real headless Chromium for web UI tests, driven without any protocol client: each page load
//! is one `chromium --headless --dump-dom [--screenshot]` run with a virtual time budget, so
//! that the page's timers (its 2 s polls) run as fast as its fetches answer, and the DOM is
//! dumped once the budget is spent. The page renders what the tests check into the DOM (ids,
//! classes, data attributes); `Dom` finds those elements again in the dump.
//!
//! Chromium runs inside the test's namespace (`ip netns exec`), because fluxd's `--http`
//! listener is on that namespace's loopback. It gets a fresh profile and home directory per
//! run, and its own process group, which is killed if it overruns its time limit.
//!
//! `GateProxy` sits between the page and fluxd, to stop fluxd at a chosen point of a page load
//! (after N answers to the page's polls), for the "stale" case.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::Netns;

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// One page load.
pub struct Load {
    pub url: String,
    /// Virtual milliseconds the page runs for before the DOM is dumped.
    pub budget_ms: u64,
    /// Where to save a PNG of the viewport, if anywhere.
    pub screenshot: Option<PathBuf>,
    pub window: (u32, u32),
    /// Real time allowed for the whole run.
    pub limit: Duration,
}

impl Load {
    pub fn new(url: impl Into<String>) -> Load {
        Load {
            url: url.into(),
            budget_ms: 5000,
            screenshot: None,
            window: (1280, 1000),
            limit: Duration::from_secs(60),
        }
    }

    pub fn budget(mut self, ms: u64) -> Load {
        self.budget_ms = ms;
        self
    }

    pub fn screenshot(mut self, path: impl Into<PathBuf>) -> Load {
        self.screenshot = Some(path.into());
        self
    }
}

/// A Chromium run in progress.
pub struct Running {
    child: Child,
    limit: Duration,
    started: Instant,
    out: PathBuf,
    err: PathBuf,
    _profile: tempfile::TempDir,
}

/// What a finished run left: the serialized DOM and Chromium's own messages.
pub struct Page {
    pub dom: Dom,
    pub stderr: String,
    pub took: Duration,
}

/// Starts Chromium on `load` inside `ns`; `wait` for its result.
pub fn spawn(ns: &Netns, load: &Load) -> Running {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} not found: install the Debian package \
         (DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)"
    );
    let profile = tempfile::Builder::new()
        .prefix("flux-chromium-")
        .tempdir()
        .unwrap();
    let dir = profile.path();
    let out = dir.join("dom.html");
    let err = dir.join("stderr.log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, CHROMIUM])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-extensions",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--virtual-time-budget={}", load.budget_ms))
        .arg(format!("--window-size={},{}", load.window.0, load.window.1));
    if let Some(shot) = &load.screenshot {
        if let Some(parent) = shot.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        let _ = std::fs::remove_file(shot);
        cmd.arg(format!("--screenshot={}", shot.display()));
    }
    cmd.arg("--dump-dom")
        .arg(&load.url)
        // Nothing of root's home: caches, NSS databases and crash reports go to the temp dir.
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        // Its own process group, so that an overrun kills the renderers and helpers too.
        .process_group(0);
    let child = cmd.spawn().unwrap();
    Running {
        child,
        limit: load.limit,
        started: Instant::now(),
        out,
        err,
        _profile: profile,
    }
}

/// Loads a page and returns its DOM once the virtual time budget is spent.
pub fn load(ns: &Netns, load: &Load) -> Page {
    spawn(ns, load).wait()
}

impl Running {
    pub fn wait(mut self) -> Page {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > self.limit {
                self.kill_group();
                panic!(
                    "chromium still running after {:?}: {}",
                    self.limit,
                    tail(&std::fs::read_to_string(&self.err).unwrap_or_default())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = std::fs::read_to_string(&self.err).unwrap_or_default();
        assert!(
            status.success(),
            "chromium exited with {status}: {}",
            tail(&stderr)
        );
        let dom = std::fs::read_to_string(&self.out).unwrap();
        assert!(
            dom.contains("<html"),
            "chromium dumped no DOM: {}",
            tail(&stderr)
        );
        Page {
            dom: Dom(dom),
            stderr,
            took: self.started.elapsed(),
        }
    }

    fn kill_group(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill_group();
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A start tag of the dumped DOM.
#[derive(Debug, Clone)]
pub struct Element {
    pub tag: String,
    pub attrs: BTreeMap<String, String>,
    /// Byte offset of the tag in the dump, to take the text that follows.
    pub at: usize,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    pub fn num(&self, name: &str) -> Option<f64> {
        self.attr(name)?.parse().ok()
    }
}

/// Chromium's serialization of the DOM, searched by start tags and attributes: enough for a
/// page that marks what matters with ids and data attributes.
pub struct Dom(pub String);

impl Dom {
    /// Every start tag, in document order.
    pub fn elements(&self) -> Vec<Element> {
        let s = self.0.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            if s[i] != b'<' || i + 1 >= s.len() || !s[i + 1].is_ascii_alphabetic() {
                i += 1;
                continue;
            }
            let start = i;
            i += 1;
            let name_start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'-') {
                i += 1;
            }
            let tag = self.0[name_start..i].to_ascii_lowercase();
            let mut attrs = BTreeMap::new();
            loop {
                while i < s.len() && s[i].is_ascii_whitespace() {
                    i += 1;
                }
                if i >= s.len() || s[i] == b'>' || s[i] == b'/' {
                    break;
                }
                let n0 = i;
                while i < s.len() && !b" \t\n\r=>/".contains(&s[i]) {
                    i += 1;
                }
                let name = self.0[n0..i].to_ascii_lowercase();
                let mut value = String::new();
                if i < s.len() && s[i] == b'=' {
                    i += 1;
                    if i < s.len() && (s[i] == b'"' || s[i] == b'\'') {
                        let q = s[i];
                        i += 1;
                        let v0 = i;
                        while i < s.len() && s[i] != q {
                            i += 1;
                        }
                        value = unescape(&self.0[v0..i]);
                        i += 1;
                    } else {
                        let v0 = i;
                        while i < s.len() && !s[i].is_ascii_whitespace() && s[i] != b'>' {
                            i += 1;
                        }
                        value = unescape(&self.0[v0..i]);
                    }
                }
                if name.is_empty() {
                    i += 1;
                    continue;
                }
                attrs.insert(name, value);
            }
            out.push(Element {
                tag,
                attrs,
                at: start,
            });
        }
        out
    }

    /// Start tags with this tag name (any if empty) that carry attribute `attr`.
    pub fn with_attr(&self, tag: &str, attr: &str) -> Vec<Element> {
        self.elements()
            .into_iter()
            .filter(|e| (tag.is_empty() || e.tag == tag) && e.attrs.contains_key(attr))
            .collect()
    }

    pub fn by_id(&self, id: &str) -> Option<Element> {
        self.elements()
            .into_iter()
            .find(|e| e.attr("id") == Some(id))
    }

    /// The text right after an element's start tag, up to the next tag.
    pub fn text_after(&self, e: &Element) -> String {
        let rest = &self.0[e.at..];
        let Some(open_end) = rest.find('>') else {
            return String::new();
        };
        let rest = &rest[open_end + 1..];
        unescape(&rest[..rest.find('<').unwrap_or(rest.len())])
    }
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// `GET path` to `addr` from inside `ns`: (status, body).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_string()))
    })
}

/// A one-connection-per-request HTTP proxy inside a namespace, in front of fluxd's `--http`,
/// that holds the request after `pass` requests whose path starts with `prefix` have gone
/// through: it reports on `reached` and waits for `resume` before forwarding it, so that a
/// test can stop fluxd at that exact point of a page load. (Chromium's virtual time does not
/// advance while a fetch is pending, so the page sees no time pass meanwhile.) Requests that
/// cannot reach the upstream get their connection closed without an answer, as a client of a
/// stopped fluxd sees.
pub struct GateProxy {
    pub addr: SocketAddr,
    pub reached: Receiver<()>,
    pub resume: Sender<()>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GateProxy {
    pub fn start(
        ns: &Netns,
        listen: SocketAddr,
        upstream: SocketAddr,
        prefix: &str,
        pass: usize,
    ) -> GateProxy {
        let (reached_tx, reached) = mpsc::channel();
        let (resume, resume_rx) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns.run(move || {
            let l = TcpListener::bind(listen).expect("bind proxy");
            l.set_nonblocking(true).unwrap();
            l
        });
        let (flag, prefix) = (stop.clone(), prefix.to_string());
        // Upstream connections must start inside the namespace: the thread joins it.
        let thread = ns.spawn(move || {
            let mut matched = 0;
            let mut held = false;
            while !flag.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = client.set_nonblocking(false);
                let Some(head) = read_head(&client) else {
                    continue;
                };
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                if path.starts_with(&prefix) {
                    matched += 1;
                    if matched > pass && !held {
                        held = true;
                        let _ = reached_tx.send(());
                        let _ = resume_rx.recv_timeout(Duration::from_secs(60));
                    }
                }
                forward(client, &head, upstream);
            }
        });
        GateProxy {
            addr: listen,
            reached,
            resume,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for GateProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The request line and headers (GETs carry no body), or None on a closed or slow client.
fn read_head(mut c: &TcpStream) -> Option<String> {
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 64 * 1024 || c.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Sends the request upstream with `Connection: close` and copies the answer back until the
/// upstream closes; any failure just closes the client's connection.
fn forward(mut client: TcpStream, head: &str, upstream: SocketAddr) {
    let Ok(mut up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    };
    let _ = up.set_read_timeout(Some(Duration::from_secs(10)));
    let mut req = String::new();
    for line in head.trim_end().split("\r\n") {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            req.push_str(line);
            req.push_str("\r\n");
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    if up.write_all(req.as_bytes()).is_err() {
        return;
    }
    let _ = std::io::copy(&mut up, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Both);
}
