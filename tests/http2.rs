//! Issue 17, part 4: HTTP/2 cleartext and gRPC in `http` services. Real clients and servers:
//! curl (`--http2-prior-knowledge`, and HTTP/1.1), Debian's nginx with h2c listeners, and
//! grpcio (Python) servers and clients. Everything runs inside a network namespace each test
//! creates.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::fluxd::{wait_until, Fluxd};
use support::http_backend::HttpBackend;
use support::netns::Netns;
use support::nginx::Nginx;
use support::openmetrics;

const HTTP: &str = "127.0.0.1:7070";
const KEEPALIVE_REQUESTS: usize = 25;
const GRPC_ECHO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_echo.py");

/// An `http` service with one static instance per (name, address), routed.
fn service(fluxd: &Fluxd, name: &str, vip: &str, extra: &[&str], instances: &[(&str, String)]) {
    let mut args = vec![
        "service",
        "add",
        name,
        "--address",
        vip,
        "--protocol",
        "http",
    ];
    args.extend_from_slice(extra);
    fluxd.ok(&args);
    for (i, addr) in instances {
        fluxd.add_instance(name, i, addr);
    }
    fluxd.wait_routed(name);
}

/// nginx serving HTTP/2 with prior knowledge (h2c, no HTTP/1.1) on 127.0.0.1:PORT for each
/// (port, name); each answers `NAME PROTOCOL HOST`, and ends a connection (GOAWAY) after
/// `KEEPALIVE_REQUESTS` requests, as nginx does after 1000 by default.
fn h2c_nginx(ns: &Netns, servers: &[(u16, &str)]) -> Nginx {
    let nginx = Nginx::start(ns);
    let conf: String = servers
        .iter()
        .map(|(port, name)| {
            format!(
                "server {{ listen 127.0.0.1:{port} http2; keepalive_requests {KEEPALIVE_REQUESTS}; location / {{ add_header x-backend {name}; return 200 \"{name} $server_protocol $http_host\\n\"; }} }}\n"
            )
        })
        .collect();
    std::fs::write(nginx.dir.join("conf.d/h2c.conf"), conf).unwrap();
    let out = ns.exec(&["sh", "-c", &nginx.reload_cmd()]);
    assert!(out.status.success(), "nginx reload: {out:?}");
    for (port, _) in servers {
        let url = format!("http://127.0.0.1:{port}/");
        let up = wait_until(Duration::from_secs(10), || {
            curl(ns, &["--http2-prior-knowledge", &url]).0 == 0
        });
        assert!(up.is_some(), "nginx h2c on {port}: {}", nginx.error_log());
    }
    nginx
}

/// curl inside the namespace, bounded in time: (exit code, stdout).
fn curl(ns: &Netns, args: &[&str]) -> (i32, String) {
    let mut a = vec!["curl", "-s", "--max-time", "10"];
    a.extend_from_slice(args);
    let out = ns.exec(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `/metrics`' samples named `name`, as (instance, label `extra`'s value) -> value.
fn samples(ns: &Netns, name: &str, extra: &str) -> HashMap<(String, String), f64> {
    openmetrics::by_instance(ns, HTTP.parse().unwrap(), name, extra)
}

#[test]
fn h2_clients_are_balanced_per_request_over_shared_h2c_instance_connections() {
    let ns = Netns::new("h2c");
    let _nginx = h2c_nginx(&ns, &[(9001, "n1"), (9002, "n2")]);
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    let instances = [
        ("n1", "127.0.0.1:9001".to_string()),
        ("n2", "127.0.0.1:9002".to_string()),
    ];
    service(&fluxd, "web", "198.18.0.20:80", &[], &instances);

    // curl speaks HTTP/2 with prior knowledge through the VIP (curl 7.88 cannot reuse an
    // h2c connection, so one request per curl).
    let (code, out) = curl(
        &ns,
        &[
            "--http2-prior-knowledge",
            "-w",
            "version=%{http_version}",
            "http://198.18.0.20/",
        ],
    );
    assert_eq!(code, 0, "{out}\n{}", fluxd.log());
    assert!(out.ends_with(" HTTP/2.0 198.18.0.20\nversion=2"), "{out}");

    // 20 requests as concurrent streams of ONE client connection (nghttp makes exactly one).
    const N: usize = 20;
    let out = ns.exec(&[
        "timeout",
        "30",
        "nghttp",
        "-m",
        &N.to_string(),
        "http://198.18.0.20/",
    ]);
    assert!(out.status.success(), "nghttp: {out:?}\n{}", fluxd.log());
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut by_instance: HashMap<&str, usize> = HashMap::new();
    for line in out.lines() {
        // `NAME PROTOCOL HOST` from nginx: the instance was spoken to in HTTP/2 and got the
        // client's authority.
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(&parts[1..], ["HTTP/2.0", "198.18.0.20"], "{out}");
        *by_instance.entry(parts[0]).or_default() += 1;
    }
    assert_eq!(by_instance.values().sum::<usize>(), N, "{out}");
    // Round-robin per request over the one client connection.
    for i in ["n1", "n2"] {
        assert!(
            by_instance.get(i).copied().unwrap_or(0) >= N / 4,
            "{by_instance:?}"
        );
    }
    // The streams share each instance's HTTP/2 connection rather than opening one each.
    let conns = samples(&ns, "flux_connections_total", "");
    for i in ["n1", "n2"] {
        let n = conns
            .get(&(i.to_string(), String::new()))
            .copied()
            .unwrap_or(0.0);
        assert!((1.0..=2.0).contains(&n), "{i}: {n} connections: {conns:?}");
    }

    // 200 concurrent streams: each instance ends its connection every 25 requests; the streams
    // it refuses go on the connection opened next, shared, rather than each on its own.
    const M: usize = 200;
    let out = ns.exec(&[
        "timeout",
        "30",
        "nghttp",
        "-m",
        &M.to_string(),
        "http://198.18.0.20/",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nghttp: {out:?}\n{}", fluxd.log());
    let bad: Vec<&str> = text.lines().filter(|l| !l.contains(" HTTP/2.0 ")).collect();
    assert!(bad.is_empty(), "{bad:?}\n{}", fluxd.log());
    assert_eq!(text.lines().count(), M, "{text}");
    let conns = samples(&ns, "flux_connections_total", "");
    for i in ["n1", "n2"] {
        let n = conns
            .get(&(i.to_string(), String::new()))
            .copied()
            .unwrap_or(0.0);
        let most = (N + M) / 2 / KEEPALIVE_REQUESTS + 4;
        assert!(
            n <= most as f64,
            "{i}: {n} connections for {} requests: {conns:?}",
            (N + M) / 2
        );
    }

    // An HTTP/1.1 client of a service set to speak h2 to its instances.
    fluxd.ok(&["service", "set", "web", "--instance-protocol", "h2"]);
    let info = fluxd.ok(&["info", "web"]);
    assert!(info.contains("instance-protocol h2"), "{info}");
    let got = wait_until(Duration::from_secs(10), || {
        let (code, out) = curl(&ns, &["--http1.1", "http://198.18.0.20/"]);
        code == 0 && out.contains("HTTP/2.0")
    });
    assert!(got.is_some(), "h1 client to h2 instances: {}", fluxd.log());
}

#[test]
fn h2_and_h1_clients_reach_http1_instances() {
    let ns = Netns::new("h2-h1");
    let b = HttpBackend::start(&ns, "b1", 9000, 200);
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    service(
        &fluxd,
        "web",
        "198.18.0.21:80",
        &["--instance-protocol", "http1"],
        &[("b1", b.addr.to_string())],
    );
    for version in ["--http2-prior-knowledge", "--http1.1"] {
        let (code, out) = curl(&ns, &[version, "-D", "-", "http://198.18.0.21/"]);
        assert_eq!(code, 0, "{version}: {out}\n{}", fluxd.log());
        let lower = out.to_ascii_lowercase();
        assert!(lower.contains("x-backend: b1"), "{version}: {out}");
        assert!(lower.contains(" 200"), "{version}: {out}");
    }
    // `Upgrade: h2c` (RFC 9113 deprecates it) is answered over HTTP/1.1.
    let (code, out) = curl(
        &ns,
        &[
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "http://198.18.0.21/",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "1.1 200"));

    // An HTTP/2 protocol error (a SETTINGS frame of 5 bytes): GOAWAY and the connection
    // closes; fluxd goes on serving.
    let out = ns.exec(&["timeout", "20", "/usr/bin/python3", "-c", BAD_FRAME]);
    let types = String::from_utf8_lossy(&out.stdout);
    assert!(
        types.split_whitespace().any(|t| t == "7"),
        "no GOAWAY: {types} {out:?}"
    );
    let (code, out) = curl(&ns, &["--http2-prior-knowledge", "http://198.18.0.21/"]);
    assert_eq!(code, 0, "after a protocol error: {out}\n{}", fluxd.log());

    // Bad settings: one line naming the flag, exit 2, nothing changed.
    let bad = fluxd.ctl(&["service", "set", "web", "--instance-protocol", "h3"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("instance-protocol") && err.trim().lines().count() == 1,
        "{err}"
    );
    fluxd.ok(&["service", "add", "db", "--address", "198.18.0.22:5432"]);
    let bad = fluxd.ctl(&["service", "set", "db", "--instance-protocol", "h2"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("instance_protocol"), "{err}");
    let info = fluxd.ok(&["info", "web"]);
    assert!(info.contains("instance-protocol http1"), "{info}");
    // Back to auto: the record loses the field.
    fluxd.ok(&["service", "set", "web", "--instance-protocol", "auto"]);
    let info = fluxd.ok(&["info", "web"]);
    assert!(!info.contains("instance-protocol"), "{info}");
}

/// Sends the HTTP/2 preface and a malformed SETTINGS frame to the VIP at 198.18.0.21:80 and
/// prints the types of the frames that come back until the connection closes.
const BAD_FRAME: &str = r#"
import socket
s = socket.create_connection(("198.18.0.21", 80), timeout=5)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"12345")
buf = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    buf += d
types = []
while len(buf) >= 9:
    n = int.from_bytes(buf[:3], "big")
    types.append(buf[3])
    buf = buf[9 + n:]
print(*types)
"#;

/// A grpcio test server in the namespace, killed when dropped.
struct GrpcServer(Child);

impl GrpcServer {
    fn start(ns: &Netns, port: u16, name: &str) -> GrpcServer {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "/usr/bin/python3",
                GRPC_ECHO,
                "serve",
            ])
            .args([&port.to_string(), name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with grpcio (scripts/deps --test installs it)");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let up = ns.run(move || {
            wait_until(Duration::from_secs(15), || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        });
        assert!(up.is_some(), "grpc server {name} did not start");
        GrpcServer(child)
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the grpcio client in the namespace and parses its JSON line.
fn grpc_client(ns: &Netns, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["timeout", "60", "/usr/bin/python3", GRPC_ECHO];
    a.extend_from_slice(args);
    let out = ns.exec(&a);
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "grpc client {args:?}: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn grpc_calls_are_balanced_per_call_and_counted_by_status() {
    let ns = Netns::new("grpc");
    let g1 = GrpcServer::start(&ns, 9101, "g1");
    let g2 = GrpcServer::start(&ns, 9102, "g2");
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    let instances = [
        ("g1", "127.0.0.1:9101".to_string()),
        ("g2", "127.0.0.1:9102".to_string()),
    ];
    service(&fluxd, "echo", "198.18.0.30:50051", &[], &instances);

    // 20 unary calls, one server-streaming call, one failing call, all on one channel.
    const N: usize = 20;
    let r = grpc_client(&ns, &["call", "198.18.0.30:50051", &N.to_string()]);
    let who: Vec<&str> = r["who"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(who.len(), N, "{r}");
    for g in ["g1", "g2"] {
        let n = who.iter().filter(|w| **w == g).count();
        assert!(n >= N / 4, "balanced per call: {g} answered {n}: {r}");
    }
    let streamed: Vec<&str> = r["streamed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(streamed.len(), 5, "{r}");
    let from = streamed[0].split(':').next().unwrap();
    let expected: Vec<String> = (0..5).map(|i| format!("{from}:{i}")).collect();
    assert_eq!(streamed, expected, "{r}");
    assert_eq!(r["fail"], "NOT_FOUND", "{r}");

    // Counted by grpc-status from the trailers: N + 1 OK, one NOT_FOUND (5).
    let by_status = samples(&ns, "flux_grpc_responses_total", "grpc_status");
    let total = |status: &str| -> f64 {
        by_status
            .iter()
            .filter(|((_, s), _)| s == status)
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(total("0"), (N + 1) as f64, "{by_status:?}");
    assert_eq!(total("5"), 1.0, "{by_status:?}");

    // g1 restarts: the shared HTTP/2 connection to it is dead; no call fails for that (a call
    // not sent on it goes on a fresh connection) and g1 gets calls again.
    drop(g1);
    let g1 = GrpcServer::start(&ns, 9101, "g1");
    let r = grpc_client(&ns, &["call", "198.18.0.30:50051", "10"]);
    let who: Vec<&str> = r["who"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(who.len(), 10, "{r}");
    assert!(who.contains(&"g1") && who.contains(&"g2"), "{r}");

    // An instance slower than the response timeout: DEADLINE_EXCEEDED from flux.
    fluxd.ok(&[
        "service",
        "set",
        "echo",
        "--http-response-timeout-ms",
        "500",
    ]);
    let got = wait_until(Duration::from_secs(10), || {
        let r = grpc_client(&ns, &["one", "198.18.0.30:50051", "Slow"]);
        r["code"] == "DEADLINE_EXCEEDED" && r["details"].as_str().unwrap().contains("500 ms")
    });
    assert!(
        got.is_some(),
        "timeout as DEADLINE_EXCEEDED: {}",
        fluxd.log()
    );

    // No instance reachable: UNAVAILABLE with flux's reason.
    drop(g1);
    drop(g2);
    let r = grpc_client(&ns, &["one", "198.18.0.30:50051", "Hello"]);
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    assert!(
        r["details"]
            .as_str()
            .unwrap()
            .contains("no instance of service echo is reachable"),
        "{r}"
    );
}
