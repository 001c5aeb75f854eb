//! Issue 7 acceptance for `http` services: requests through the VIP are balanced one by one
//! over kept-alive connections, counted per instance and status class in `/metrics` (parsed
//! with the reference parser, Python's prometheus_client) and in `/v1/series`; a backend dying
//! under load fails no request; with no instance up the answer is a quick 503. Everything runs
//! inside a network namespace the test creates.

mod support;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::browser::http_get;
use support::fluxd::{wait_until, Fluxd};
use support::http_backend::{Client, HttpBackend};
use support::netns::Netns;
use support::openmetrics;

const VIP: &str = "198.18.0.10:80";
const HTTP: &str = "127.0.0.1:7070";

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// An `http` service `web` at the VIP with one static instance per backend.
fn setup(ns: &Netns, backends: &[&HttpBackend]) -> Fluxd {
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--protocol",
        "http",
    ]);
    for b in backends {
        fluxd.add_instance("web", &b.name, b.addr);
    }
    fluxd.wait_routed("web");
    fluxd
}

/// `/metrics` from inside the namespace, parsed by the reference parser: the `flux_http_*`
/// samples as (name, labels) -> value.
fn http_samples(ns: &Netns) -> HashMap<(String, String, String), f64> {
    let (status, text) = http_get(ns, HTTP.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    openmetrics::samples(&text)
        .into_iter()
        .filter(|s| s.name.starts_with("flux_http_"))
        .map(|s| {
            let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            ((s.name.clone(), label("instance"), label("code")), s.value)
        })
        .collect()
}

fn sample(m: &HashMap<(String, String, String), f64>, name: &str, inst: &str, code: &str) -> f64 {
    m.get(&(name.to_string(), inst.to_string(), code.to_string()))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn status_classes_per_instance_add_up_to_the_requests_made() {
    let ns = Netns::new("http-codes");
    let good = HttpBackend::start(&ns, "good", 9000, 200);
    let bad = HttpBackend::start(&ns, "bad", 9001, 500);
    let fluxd = setup(&ns, &[&good, &bad]);
    let warm = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            Client::connect(vip())
                .and_then(|mut c| c.get("web"))
                .is_ok()
        })
    });
    assert!(warm.is_some(), "VIP never answered: {}", fluxd.log());
    let before = http_samples(&ns);

    // 200 requests on one kept-alive client connection.
    const N: usize = 200;
    let (by_status, hosts, xffs) = ns.run(|| {
        let mut c = Client::connect(vip()).unwrap();
        let mut by_status: HashMap<(String, u16), usize> = HashMap::new();
        let (mut hosts, mut xffs) = (HashMap::new(), HashMap::new());
        for i in 0..N {
            let r = c
                .get("web.example:80")
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            *by_status
                .entry((r.header("x-backend").to_string(), r.status()))
                .or_default() += 1;
            *hosts
                .entry(r.header("x-seen-host").to_string())
                .or_insert(0) += 1;
            *xffs.entry(r.header("x-seen-xff").to_string()).or_insert(0) += 1;
        }
        (by_status, hosts, xffs)
    });
    let served = |name: &str, code: u16| {
        by_status
            .get(&(name.to_string(), code))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        served("good", 200) + served("bad", 500),
        N,
        "unexpected answers: {by_status:?}"
    );
    // Balanced per request, not per connection: round-robin over one client connection.
    assert!(
        served("good", 200) >= N / 4 && served("bad", 500) >= N / 4,
        "{by_status:?}"
    );
    assert_eq!(
        hosts.keys().collect::<Vec<_>>(),
        ["web.example:80"],
        "Host passed through"
    );
    assert_eq!(
        xffs.keys().collect::<Vec<_>>(),
        ["127.0.0.1"],
        "X-Forwarded-For"
    );
    // Kept-alive instance connections: a handful, not one per request.
    for b in [&good, &bad] {
        let n = b.accepted.load(Ordering::Relaxed);
        assert!(
            n <= 3,
            "{} accepted {n} connections for {N} requests",
            b.name
        );
    }

    let after = http_samples(&ns);
    let rise = |inst: &str, code: &str| {
        sample(&after, "flux_http_requests_total", inst, code)
            - sample(&before, "flux_http_requests_total", inst, code)
    };
    assert_eq!(rise("good", "2xx"), served("good", 200) as f64);
    assert_eq!(rise("bad", "5xx"), served("bad", 500) as f64);
    let mut total = 0.0;
    for inst in ["good", "bad"] {
        for code in ["2xx", "3xx", "4xx", "5xx"] {
            total += rise(inst, code);
        }
    }
    assert_eq!(total, N as f64, "{after:?}");
    let latency: f64 = ["good", "bad"]
        .iter()
        .map(|i| {
            sample(&after, "flux_http_request_duration_seconds_count", i, "")
                - sample(&before, "flux_http_request_duration_seconds_count", i, "")
        })
        .sum();
    assert_eq!(latency, N as f64, "request duration observations");
    assert_eq!(
        sample(&after, "flux_http_retries_total", "good", ""),
        0.0,
        "no retries without failures"
    );

    // The UI's history: per instance, requests by status class and latency.
    let path = "/v1/series?service=web&group=instance";
    let seen = wait_until(Duration::from_secs(6), || {
        let Ok((200, body)) = http_get(&ns, HTTP.parse().unwrap(), path) else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let sum = |key: &str, field: &str| -> f64 {
            v["series"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["key"] == key)
                .flat_map(|s| s[field].as_array().unwrap().clone())
                .filter_map(|x| x.as_f64())
                .sum()
        };
        sum("good", "http_2xx_per_s") > 0.0
            && sum("bad", "http_5xx_per_s") > 0.0
            && sum("good", "http_5xx_per_s") == 0.0
            && sum("good", "request_p99_ms") > 0.0
    });
    assert!(
        seen.is_some(),
        "series: {:?}",
        http_get(&ns, HTTP.parse().unwrap(), path)
    );
    drop(fluxd);
}

#[test]
fn killing_a_backend_mid_loop_fails_no_request() {
    let ns = Netns::new("http-kill");
    let b0 = HttpBackend::start(&ns, "b0", 9000, 200);
    let mut b1 = HttpBackend::start(&ns, "b1", 9001, 200);
    let fluxd = setup(&ns, &[&b0, &b1]);
    let warm = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            Client::connect(vip())
                .and_then(|mut c| c.get("web"))
                .is_ok()
        })
    });
    assert!(warm.is_some(), "VIP never answered: {}", fluxd.log());

    // Two clients, each 300 requests on its own kept-alive connection, with a POST (no retry
    // unless unsent or bodyless) and a PUT with a small body (idempotent, buffered) mixed in.
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let done = done.clone();
            ns.spawn(move || {
                let mut c = Client::connect(vip()).unwrap();
                let mut failures = Vec::new();
                let mut served: HashMap<String, usize> = HashMap::new();
                for i in 0..300 {
                    let r = match i % 3 {
                        0 => c.request("PUT", "web", b"hello"),
                        _ => c.get("web"),
                    };
                    match r {
                        Ok(r) if r.status() == 200 => {
                            *served.entry(r.header("x-backend").to_string()).or_default() += 1
                        }
                        Ok(r) => failures.push(format!(
                            "request {i}: {} {:?}",
                            r.status(),
                            String::from_utf8_lossy(&r.body)
                        )),
                        Err(e) => {
                            failures.push(format!("request {i}: {e}"));
                            c = Client::connect(vip()).unwrap();
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                (failures, served)
            })
        })
        .collect();
    let reached = wait_until(Duration::from_secs(20), || {
        done.load(Ordering::Relaxed) >= 150
    });
    assert!(reached.is_some(), "clients stalled: {}", fluxd.log());
    b1.kill();
    let mut failures = Vec::new();
    let mut served: HashMap<String, usize> = HashMap::new();
    for c in clients {
        let (f, s) = c.join().unwrap();
        failures.extend(f);
        for (k, v) in s {
            *served.entry(k).or_default() += v;
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        fluxd.log()
    );
    assert_eq!(served.values().sum::<usize>(), 600, "{served:?}");
    assert!(served.get("b1").copied().unwrap_or(0) > 0, "{served:?}");
    let q = fluxd.json(&["query", "--service", "web"]);
    let state = |name: &str| {
        q.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state("b1"), "failed", "{q}");
    assert_eq!(state("b0"), "live", "{q}");
    drop(b0);
}

#[test]
fn no_instance_up_answers_503_at_once() {
    let ns = Netns::new("http-503");
    let mut b0 = HttpBackend::start(&ns, "b0", 9000, 200);
    let fluxd = setup(&ns, &[&b0]);
    let warm = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            Client::connect(vip())
                .and_then(|mut c| c.get("web"))
                .is_ok()
        })
    });
    assert!(warm.is_some(), "VIP never answered: {}", fluxd.log());
    b0.kill();
    // On a kept-alive connection and on a new one: 503 with a short plain body, quickly, and
    // the connection stays usable.
    let answers = ns.run(|| {
        let mut c = Client::connect(vip()).unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let r = c.get("web").unwrap();
            out.push((
                r.status(),
                r.header("content-type").to_string(),
                String::from_utf8_lossy(&r.body).into_owned(),
                start.elapsed(),
            ));
        }
        out
    });
    for (status, ctype, body, took) in &answers {
        assert_eq!(*status, 503, "{answers:?}");
        assert!(ctype.starts_with("text/plain"), "{answers:?}");
        assert!(body.contains("no instance of service web"), "{body:?}");
        assert!(*took < Duration::from_secs(2), "answered after {took:?}");
    }
    // A service with no instances at all: 503 too.
    fluxd.ok(&["instance", "rm", "web", "b0"]);
    let gone = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            Client::connect(vip())
                .and_then(|mut c| c.get("web"))
                .is_ok_and(|r| r.status() == 503)
        })
    });
    assert!(gone.is_some(), "{}", fluxd.log());
}

#[test]
fn an_instance_that_never_answers_gets_504_after_the_response_timeout() {
    let ns = Netns::new("http-504");
    // Listening but never accepting: the kernel completes the handshake, nothing ever answers.
    let silent_addr: SocketAddrV4 = "127.0.0.1:9002".parse().unwrap();
    let _silent = ns.run(move || std::net::TcpListener::bind(silent_addr).unwrap());
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &["--http", HTTP, "--http-response-timeout-ms", "700"],
    );
    fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--protocol",
        "http",
    ]);
    fluxd.add_instance("web", "silent", silent_addr);
    fluxd.wait_routed("web");
    let routed = |want: &str| {
        wait_until(Duration::from_secs(5), || {
            fluxd.debug()["services"][0]["instances"]
                .as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["instance"] == want)
        })
    };
    assert!(routed("silent").is_some(), "{}", fluxd.debug());

    let (status, body, took) = ns.run(|| {
        let start = Instant::now();
        let r = Client::connect(vip()).unwrap().get("web").unwrap();
        let body = String::from_utf8_lossy(&r.body).into_owned();
        (r.status(), body, start.elapsed())
    });
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer within 700 ms"), "{body:?}");
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    // Slow is not dead: the instance stays live, and the 504 counts as its 5xx.
    let q = fluxd.json(&["query", "--service", "web"]);
    assert_eq!(q[0]["state"], "live", "{q}");
    let m = http_samples(&ns);
    assert_eq!(
        sample(&m, "flux_http_requests_total", "silent", "5xx"),
        1.0,
        "{m:?}"
    );

    // A working instance in its place answers 200 through the same VIP.
    let good = HttpBackend::start(&ns, "good", 9000, 200);
    fluxd.add_instance("web", "good", good.addr);
    fluxd.ok(&["instance", "rm", "web", "silent"]);
    let ok = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            Client::connect(vip())
                .and_then(|mut c| c.get("web"))
                .is_ok_and(|r| r.status() == 200)
        })
    });
    assert!(ok.is_some(), "{}", fluxd.log());
    // The timeout runs from the end of the request body: an upload slower than it (4 KiB in
    // 1.2 s, against 700 ms) is answered, not cut (once the silent instance is out of routing).
    assert!(routed("good").is_some(), "{}", fluxd.debug());
    let upload = ns.run(|| {
        let chunk = [7u8; 1024];
        let chunks = [&chunk[..], &chunk[..], &chunk[..], &chunk[..]];
        Client::connect(vip())
            .and_then(|mut c| c.request_slowly("POST", "web", &chunks, Duration::from_millis(300)))
            .map(|r| (r.status(), r.header("x-seen-body").to_string()))
    });
    assert_eq!(upload.unwrap(), (200, "4096".to_string()));
}
