//! The active health checker: one task per routed instance of every service that has a
//! `health` check, asking the instance on the service's interval and feeding the answers to the
//! instance's shared `Health` (which the route table reads). The controller hands it each new
//! route table; it starts the tasks of backends that appeared, and aborts those of backends
//! that left or whose check changed. Each fluxd checks the instances it routes, so an instance
//! failing its check leaves the pool on every host that checks it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::verdict::CheckState;
use super::{now_ms, Health};
use crate::metrics::{CheckMetrics, InstanceLabels, Metrics};
use crate::model::{CheckKind, HealthCheck, ProxyProtocol};
use crate::proxy::limits::is_local_exhaustion;
use crate::proxy::route_table::{Backend, RouteTable};

/// Most bytes read looking for an HTTP status line; a health endpoint's first line is short.
const MAX_STATUS_LINE: usize = 1024;

/// The running checks, by backend.
pub struct Checker {
    /// Keyed by the address of the backend's shared `Health`, which identifies one instance at
    /// one address of one service across table rebuilds (the task holds the `Arc`, so the key
    /// cannot be reused while it runs). Looking it up allocates nothing, so a sync with 10,000
    /// unchanged checked instances costs 10,000 map lookups and no more.
    tasks: HashMap<usize, Task>,
    metrics: Arc<Metrics>,
    /// Bumped at every sync; a task not marked with the current one is gone from the table.
    generation: u64,
    /// Signalled whenever an instance enters or leaves the pool by its check's verdict, so that
    /// what depends on the verdicts beyond the route table (the kernel-forwarding rules) can
    /// follow. Signals coalesce: a burst of verdicts wakes the listener once.
    verdicts: Arc<tokio::sync::Notify>,
}

/// One instance's running check.
struct Task {
    health: Arc<Health>,
    check: HealthCheck,
    /// The PROXY header version the service's instances expect, sent before each check.
    header: Option<ProxyProtocol>,
    /// Its series' labels, to drop them when the task ends.
    labels: InstanceLabels,
    /// The last sync that found this backend in the table with this check.
    seen: u64,
    handle: JoinHandle<()>,
}

fn key(b: &Backend) -> usize {
    Arc::as_ptr(&b.health) as usize
}

impl Checker {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Checker {
            tasks: HashMap::new(),
            metrics,
            generation: 0,
            verdicts: Arc::default(),
        }
    }

    /// Signalled when an instance enters or leaves the pool by its check's verdict.
    pub fn verdicts(&self) -> Arc<tokio::sync::Notify> {
        self.verdicts.clone()
    }

    /// Instances checked now.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Makes the running checks those of `table`: level-triggered, so a sync that changed
    /// nothing changes nothing. Must run inside the tokio runtime.
    pub fn sync(&mut self, table: &RouteTable) {
        self.generation += 1;
        let generation = self.generation;
        let checked = || {
            table
                .by_name
                .values()
                .filter_map(|r| {
                    let header = r.proxy_protocol.map(|(v, _)| v);
                    Some((r.check.as_ref()?, header, &r.backends))
                })
                .flat_map(|(check, header, backends)| {
                    backends.iter().map(move |b| (check, header, b))
                })
        };
        for (check, header, b) in checked() {
            if let Some(t) = self.tasks.get_mut(&key(b)) {
                if &t.check == check && t.header == header {
                    t.seen = generation;
                }
            }
        }
        // End the checks that left before starting new ones: a backend rebuilt with the same
        // labels gets its series back from `start`.
        let metrics = &self.metrics;
        self.tasks.retain(|_, t| {
            if t.seen == generation {
                return true;
            }
            t.handle.abort();
            t.health.check_stopped();
            metrics.forget_check(&t.labels);
            false
        });
        for (check, header, b) in checked() {
            if !self.tasks.contains_key(&key(b)) {
                let task = self.start(b, check, header, generation);
                self.tasks.insert(key(b), task);
            }
        }
    }

    fn start(
        &self,
        b: &Backend,
        check: &HealthCheck,
        header: Option<ProxyProtocol>,
        generation: u64,
    ) -> Task {
        b.health.check_started(check);
        let probe = Probe {
            service: b.service.clone(),
            instance: b.instance.clone(),
            addr: b.addr,
            check: check.clone(),
            header,
            health: b.health.clone(),
            metrics: self.metrics.check(&b.labels),
            verdicts: self.verdicts.clone(),
        };
        Task {
            health: b.health.clone(),
            check: check.clone(),
            header,
            labels: b.labels.clone(),
            seen: generation,
            handle: tokio::spawn(probe.run()),
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.handle.abort();
        }
    }
}

/// What one task checks and where it reports.
struct Probe {
    service: String,
    instance: String,
    addr: SocketAddr,
    check: HealthCheck,
    header: Option<ProxyProtocol>,
    health: Arc<Health>,
    metrics: CheckMetrics,
    /// [`Checker::verdicts`].
    verdicts: Arc<tokio::sync::Notify>,
}

impl Probe {
    async fn run(self) {
        let interval = Duration::from_millis(self.check.interval_ms.into());
        // A random start within one interval, so that many instances (or one instance checked
        // by many services) are not checked in step.
        tokio::time::sleep(interval.mul_f64(rand::random::<f64>())).await;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(result) = probe(self.addr, &self.check, self.header).await else {
                // This host is out of fds or ports: no verdict on the instance either way.
                if let Some(suppressed) = NO_RESULT_WARNINGS.check(now_ms(), 10_000) {
                    tracing::warn!(
                        suppressed,
                        "health checks cannot run: this host is out of sockets"
                    );
                }
                continue;
            };
            match &result {
                Ok(()) => self.metrics.passed.inc(),
                Err(_) => self.metrics.failed.inc(),
            };
            let why = result.as_ref().err().cloned();
            let was_failing = self.health.check_failing();
            let changed = self.health.check_result(&self.check, result);
            self.metrics
                .failing
                .set(i64::from(self.health.check_failing()));
            if was_failing != self.health.check_failing() {
                self.verdicts.notify_one();
            }
            match changed {
                Some(CheckState::Failing) => tracing::warn!(
                    service = %self.service,
                    instance = %self.instance,
                    addr = %self.addr,
                    reason = why.as_deref().unwrap_or(""),
                    "instance fails its health check: out of the pool on this host"
                ),
                // Only a return is news; a first pass (Unknown -> Passing) is not worth a line
                // per instance at start.
                Some(CheckState::Passing) if was_failing => tracing::info!(
                    service = %self.service,
                    instance = %self.instance,
                    addr = %self.addr,
                    "instance passes its health check again: back in the pool"
                ),
                _ => {}
            }
        }
    }
}

static NO_RESULT_WARNINGS: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// Why a check did not pass.
enum Failure {
    /// The instance's doing, in words for `fluxctl query`.
    Instance(String),
    /// This host could not make the check (out of fds, memory or local ports).
    Local,
}

/// One check of `addr`, bounded by the check's timeout; `Err` says why it failed, in words an
/// operator reads in `fluxctl query` (`http GET /healthz answered 503`, `tcp connect refused`,
/// `tcp connect timed out after 1000 ms`). None when this host could not make the check at all
/// (see [`is_local_exhaustion`]): that says nothing about the instance.
pub async fn probe(
    addr: SocketAddr,
    check: &HealthCheck,
    header: Option<ProxyProtocol>,
) -> Option<Result<(), String>> {
    let what = match (check.kind, &check.path) {
        (CheckKind::Tcp, _) => "tcp connect".to_string(),
        (CheckKind::Http, p) => format!("http GET {}", p.as_deref().unwrap_or("/")),
    };
    let timeout = Duration::from_millis(check.timeout_ms.into());
    match tokio::time::timeout(timeout, attempt(addr, check, header, &what)).await {
        Ok(Ok(mut stream)) => {
            drain(&mut stream).await;
            Some(Ok(()))
        }
        Ok(Err(Failure::Instance(why))) => Some(Err(why)),
        Ok(Err(Failure::Local)) => None,
        Err(_) => Some(Err(format!(
            "{what} timed out after {} ms",
            check.timeout_ms
        ))),
    }
}

/// Reads what is left of the answer (briefly, and at most 64 KiB): closing with unread bytes
/// would send the instance a reset after every check from every host, which instances may log
/// as errors.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        for _ in 0..16 {
            if !matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {
                break;
            }
        }
    })
    .await;
}

/// The check itself; on a pass, the connection (to be drained before it is closed).
async fn attempt(
    addr: SocketAddr,
    check: &HealthCheck,
    header: Option<ProxyProtocol>,
    what: &str,
) -> Result<TcpStream, Failure> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| {
        if is_local_exhaustion(&e) {
            return Failure::Local;
        }
        let how = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
            _ => format!("failed: {e}"),
        };
        Failure::Instance(match check.kind {
            CheckKind::Tcp => format!("tcp connect {how}"),
            CheckKind::Http => format!("{what}: connect {how}"),
        })
    })?;
    // An instance that expects a PROXY header takes a connection without one for a broken
    // client: the check says "my own connection" (LOCAL / UNKNOWN) first.
    if let Some(v) = header {
        stream
            .write_all(crate::proxy::proxy_header::Header::local(v).bytes())
            .await
            .map_err(|e| Failure::Instance(format!("{what}: PROXY header: {e}")))?;
    }
    let Some(path) = check
        .path
        .as_deref()
        .filter(|_| check.kind == CheckKind::Http)
    else {
        // A tcp check reads nothing: closing sends a FIN, no reset.
        return Ok(stream);
    };
    let fail = |why: String| Failure::Instance(why);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: fluxd-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| fail(format!("{what}: {e}")))?;
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    let line_end = loop {
        if let Some(i) = buf[..len].windows(2).position(|w| w == b"\r\n") {
            break i;
        }
        if len == buf.len() {
            return Err(fail(format!(
                "{what}: no status line in the first {len} bytes"
            )));
        }
        match stream.read(&mut buf[len..]).await {
            Ok(0) => {
                return Err(fail(format!(
                    "{what}: connection closed before a status line"
                )))
            }
            Ok(n) => len += n,
            Err(e) => return Err(fail(format!("{what}: {e}"))),
        }
    };
    let status = status_code(&buf[..line_end])
        .ok_or_else(|| fail(format!("{what}: not an HTTP status line")))?;
    if (200..400).contains(&status) {
        Ok(stream)
    } else {
        Err(fail(format!("{what} answered {status}")))
    }
}

/// The code of `HTTP/1.x NNN reason`.
fn status_code(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then_some(())?;
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A table of one service with one backend at `addr`, checked by `check`.
    fn table(health: &Arc<Health>, addr: SocketAddr, check: Option<HealthCheck>) -> RouteTable {
        let labels = InstanceLabels {
            service: "s".into(),
            instance: "i0".into(),
            host: String::new(),
            image: String::new(),
            tag: String::new(),
        };
        let backend = Arc::new(Backend {
            service: "s".into(),
            instance: "i0".into(),
            addr,
            health: health.clone(),
            metrics: Metrics::new().instance(&labels, false),
            labels,
            extra: Default::default(),
            pool: Default::default(),
            group: 0,
            local: false,
            drained: false,
        });
        let route = Arc::new(
            crate::proxy::route_table::ServiceRoute::new(
                "s".into(),
                crate::model::Protocol::Tcp,
                crate::model::Balance::RoundRobin,
                vec![backend],
            )
            .with_check(check),
        );
        let mut t = RouteTable::default();
        t.by_name.insert("s".into(), route.clone());
        t.services.insert(
            SocketAddr::new(std::net::Ipv4Addr::from([198, 18, 0, 1]).into(), 80),
            route,
        );
        t
    }

    async fn wait_for(limit: Duration, f: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn tasks_follow_the_table() {
        // A port nothing listens on: bound, then closed.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let metrics = Arc::new(Metrics::new());
        let mut checker = Checker::new(metrics.clone());
        let health = Arc::new(Health::default());
        let check = HealthCheck {
            interval_ms: 100,
            timeout_ms: 50,
            fall: 2,
            ..HealthCheck::tcp()
        };
        checker.sync(&table(&health, addr, Some(check.clone())));
        assert_eq!(checker.len(), 1);
        assert!(wait_for(Duration::from_secs(2), || health.check_failing()).await);
        let text = metrics.encode();
        assert!(
            text.contains("flux_health_check_failing{service=\"s\",instance=\"i0\""),
            "{text}"
        );
        // The same table again (a rebuild): the same task, the verdict stands.
        checker.sync(&table(&health, addr, Some(check.clone())));
        assert_eq!(checker.len(), 1);
        assert!(health.check_failing());
        // Another check: a new task, the verdict starts over.
        let slower = HealthCheck {
            interval_ms: 1000,
            ..check.clone()
        };
        checker.sync(&table(&health, addr, Some(slower)));
        assert_eq!(checker.len(), 1);
        assert!(!health.check_failing());
        // The check removed: no task, no verdict, no series.
        checker.sync(&table(&health, addr, None));
        assert!(checker.is_empty());
        assert!(health
            .view(&Metrics::new().instance(
                &InstanceLabels {
                    service: "s".into(),
                    instance: "i0".into(),
                    host: String::new(),
                    image: String::new(),
                    tag: String::new(),
                },
                false
            ))
            .check
            .is_none());
        assert!(
            !metrics.encode().contains("flux_health_check"),
            "{}",
            metrics.encode()
        );
        // The backend gone: its task goes with it.
        checker.sync(&table(&health, addr, Some(check)));
        assert_eq!(checker.len(), 1);
        checker.sync(&RouteTable::default());
        assert!(checker.is_empty());
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503"), Some(503));
        assert_eq!(status_code(b"HTTP/2 200"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(b"HTTP/1.1 20 OK"), None);
    }

    /// A listener answering one request with `answer`, recording what it received.
    async fn answering(answer: &'static str) -> (SocketAddr, JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let n = s.read(&mut req).await.unwrap();
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        (addr, task)
    }

    fn http(path: &str) -> HealthCheck {
        HealthCheck {
            timeout_ms: 500,
            ..HealthCheck::http(path)
        }
    }

    #[tokio::test]
    async fn checks_of_proxy_protocol_instances_say_local_first() {
        for (version, first) in [
            (ProxyProtocol::V1, b"PROXY UNKNOWN\r\n".to_vec()),
            (ProxyProtocol::V2, {
                let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
                v.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
                v
            }),
        ] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                // Until the request's blank line (a v2 header itself starts with CRLF CRLF).
                while !(got.len() > 16 && got.ends_with(b"\r\n\r\n")) {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
                got
            });
            assert_eq!(
                probe(addr, &http("/healthz"), Some(version))
                    .await
                    .expect("a verdict"),
                Ok(()),
                "{version}"
            );
            let got = server.await.unwrap();
            assert!(got.starts_with(&first), "{version}: {got:?}");
            assert!(
                got[first.len()..].starts_with(b"GET /healthz HTTP/1.1\r\n"),
                "{version}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn http_checks_judge_the_status() {
        let (addr, req) = answering("HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            probe(addr, &http("/healthz"), None)
                .await
                .expect("a verdict"),
            Ok(())
        );
        let req = req.await.unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {addr}\r\n")), "{req}");
        assert!(req.contains("Connection: close\r\n"), "{req}");

        let (addr, _) = answering("HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n").await;
        assert_eq!(
            probe(addr, &http("/"), None).await.expect("a verdict"),
            Ok(())
        );
        let (addr, _) = answering("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(
            probe(addr, &http("/healthz"), None)
                .await
                .expect("a verdict"),
            Err("http GET /healthz answered 503".into())
        );
        let (addr, _) = answering("").await;
        assert_eq!(
            probe(addr, &http("/x"), None).await.expect("a verdict"),
            Err("http GET /x: connection closed before a status line".into())
        );
    }

    #[tokio::test]
    async fn silence_times_out_and_refusal_is_named() {
        // Accepts (the backlog does) but never answers.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let check = HealthCheck {
            timeout_ms: 50,
            ..HealthCheck::http("/healthz")
        };
        assert_eq!(
            probe(addr, &check, None).await.expect("a verdict"),
            Err("http GET /healthz timed out after 50 ms".into())
        );
        drop(l);
        assert_eq!(
            probe(addr, &HealthCheck::tcp(), None)
                .await
                .expect("a verdict"),
            Err("tcp connect refused".into())
        );
        assert_eq!(
            probe(addr, &check, None).await.expect("a verdict"),
            Err("http GET /healthz: connect refused".into())
        );
    }
}
