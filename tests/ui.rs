//! The web UI in a real headless Chromium, against a real fluxd with its data plane and a real
//! dockerd, all inside a namespace the test creates. The page is loaded with a virtual time
//! budget (its 2 s polls run as fast as fluxd answers) and its DOM is dumped; the page marks
//! what it shows with ids and data attributes (`support::browser` finds them again).
//!
//! Screenshots and DOM dumps go to `<target dir>/ui-test/` (e.g. /work/target-ui/ui-test/).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::backend::{who_serves, Backend};
use support::browser::{self, http_get, GateProxy, Load, Page};
use support::docker::{Dockerd, NAME_PORT};
use support::etcd::Etcd;
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";
const HTTP: &str = "127.0.0.1:7070";

fn http_addr() -> SocketAddr {
    HTTP.parse().unwrap()
}

/// Where screenshots and DOM dumps are kept after the test.
fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("ui-test");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn save(page: &Page, name: &str) {
    std::fs::write(out_dir().join(name), &page.dom.0).unwrap();
}

/// Connects to the VIP from a thread in the namespace until `stop` or `limit`, counting who
/// answered; bounded in time whatever happens to the test.
fn client_loop(
    ns: &Netns,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> JoinHandle<HashMap<String, usize>> {
    let vip = VIP.parse().unwrap();
    ns.spawn(move || {
        let start = Instant::now();
        let mut counts: HashMap<String, usize> = HashMap::new();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
            let who = who_serves(vip).unwrap_or_else(|e| format!("error: {e}"));
            *counts.entry(who).or_default() += 1;
            // About 200 connections per second at most: enough for every instance to show in
            // every 2 s interval, without loading the machine.
            std::thread::sleep(Duration::from_millis(5));
        }
        counts
    })
}

/// `/v1/series` of `web` grouped by `group`: key -> (points, latest connections/s).
fn api_series(ns: &Netns, group: &str) -> BTreeMap<String, (usize, f64)> {
    let path = format!("/v1/series?service=web&group={group}");
    let Ok((200, body)) = http_get(ns, http_addr(), &path) else {
        return BTreeMap::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let points = s["connections_per_s"].as_array().unwrap();
            let last = points.last().and_then(|x| x.as_f64()).unwrap_or(0.0);
            (s["key"].as_str().unwrap().to_string(), (points.len(), last))
        })
        .collect()
}

/// The legend's lines: key -> latest connections/s as the page shows it.
fn legend(page: &Page) -> BTreeMap<String, f64> {
    page.dom
        .with_attr("li", "data-series-key")
        .into_iter()
        .map(|e| {
            let v = e.num("data-last-value").unwrap_or(-1.0);
            (e.attr("data-series-key").unwrap().to_string(), v)
        })
        .collect()
}

/// How many lines each of the four charts draws, by metric.
fn chart_lines(page: &Page) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut metric = String::new();
    for e in page.dom.elements() {
        if e.tag == "div" && e.attr("class") == Some("chart") {
            metric = e.attr("data-metric").unwrap_or("").to_string();
            out.entry(metric.clone()).or_default();
        }
        if e.tag == "path" && e.attrs.contains_key("data-series-key") && !metric.is_empty() {
            out.get_mut(&metric)
                .unwrap()
                .insert(e.attr("data-series-key").unwrap().to_string());
        }
    }
    out
}

fn url(fragment: &str) -> String {
    format!("http://{HTTP}/{fragment}")
}

fn short(id: &str) -> String {
    id[..12].to_string()
}

#[test]
fn service_page_charts_versions_side_by_side() {
    let t0 = Instant::now();
    let ns = Netns::new("ui");
    let docker = Dockerd::new(&ns);
    for image in ["webimg:v1", "webimg:v2"] {
        docker.import_image(image);
    }
    let endpoint = docker.endpoint();
    let bridge = docker.bridge_ip.to_string();
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &["--docker", &endpoint, "--host-ip", &bridge, "--http", HTTP],
    );
    fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--instance-port",
        &NAME_PORT.to_string(),
    ]);
    fluxd.ok(&["select", "web", "all", "--image", "webimg"]);
    let mut ids = BTreeMap::new();
    for (name, image, lane) in [
        ("web-v1-a", "webimg:v1", "lane=blue"),
        ("web-v1-b", "webimg:v1", "lane=blue"),
        ("web-v2-a", "webimg:v2", "lane=green"),
        ("web-v2-b", "webimg:v2", "lane=green"),
    ] {
        let id = docker.run_name_server(image, name, &["-p", "8080", "-l", lane]);
        ids.insert(short(&id), name.to_string());
    }
    let want: Vec<String> = ids.keys().cloned().collect();
    let enrolled = wait_until(Duration::from_secs(10), || {
        let mut have: Vec<String> = fluxd
            .ok(&["query", "--service", "web", "--quiet"])
            .lines()
            .map(str::to_string)
            .collect();
        have.sort();
        have == want
    });
    assert!(enrolled.is_some(), "instances: {}", fluxd.ok(&["query"]));
    eprintln!("setup done in {:?}", t0.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let client = client_loop(&ns, stop.clone(), Duration::from_secs(30));
    // The history samples every 2 s: wait until every instance has a few intervals, the latest
    // not empty, so that the page has lines to draw.
    let ready = wait_until(Duration::from_secs(20), || {
        let s = api_series(&ns, "instance");
        s.len() == 4 && s.values().all(|(n, v)| *n >= 4 && *v > 0.0)
    });
    assert!(
        ready.is_some(),
        "series never filled: {:?}\n{}",
        api_series(&ns, "instance"),
        fluxd.log()
    );

    // Grouped by tag: two lines, v1 and v2, in every chart.
    let page = browser::load(
        &ns,
        &Load::new(url("#/service/web?group=tag")).screenshot(out_dir().join("web-by-tag.png")),
    );
    save(&page, "web-by-tag.html");
    eprintln!("chromium (group=tag) took {:?}", page.took);
    let lines = legend(&page);
    assert_eq!(
        lines.keys().collect::<Vec<_>>(),
        ["v1", "v2"],
        "legend by tag: {lines:?}"
    );
    assert!(lines.values().all(|v| *v > 0.0), "legend by tag: {lines:?}");
    let charts = chart_lines(&page);
    assert_eq!(
        charts.keys().collect::<Vec<_>>(),
        [
            "bytes_per_s",
            "connections_per_s",
            "errors_per_s",
            "latency"
        ],
        "{charts:?}"
    );
    for metric in ["connections_per_s", "bytes_per_s", "latency"] {
        let keys: Vec<&String> = charts[metric].iter().collect();
        assert_eq!(keys, ["v1", "v2"], "chart {metric}: {charts:?}");
    }
    let bytes: Vec<f64> = page
        .dom
        .with_attr("li", "data-series-key")
        .iter()
        .map(|e| e.num("data-last-bytes").unwrap_or(0.0))
        .collect();
    assert!(bytes.iter().all(|b| *b > 0.0), "bytes/s {bytes:?}");
    // The instance table: four live rows with their tags, and a group-by option per label.
    let rows = page.dom.with_attr("tr", "data-instance");
    let mut row_ids: Vec<String> = rows
        .iter()
        .map(|r| r.attr("data-instance").unwrap().to_string())
        .collect();
    row_ids.sort();
    assert_eq!(row_ids, want, "instance rows");
    assert!(
        rows.iter().all(|r| r.attr("data-state") == Some("live")),
        "{rows:?}"
    );
    let tags: Vec<String> = page
        .dom
        .with_attr("td", "class")
        .iter()
        .filter(|e| e.attr("class") == Some("tag"))
        .map(|e| page.dom.text_after(e))
        .collect();
    assert_eq!(
        tags.iter().filter(|t| *t == "v1").count(),
        2,
        "tags {tags:?}"
    );
    let options: Vec<String> = page
        .dom
        .with_attr("option", "value")
        .iter()
        // The group selector's, not the scope selector's.
        .filter(|o| o.attr("data-scope").is_none())
        .map(|o| o.attr("value").unwrap().to_string())
        .collect();
    assert_eq!(
        options,
        ["instance", "image", "tag", "host", "label:lane"],
        "group options"
    );
    let stale = page.dom.by_id("stale").expect("#stale");
    assert!(stale.attrs.contains_key("hidden"), "stale shown: {stale:?}");

    // Grouped by instance (the selector's other value): four lines, one per container.
    let page = browser::load(
        &ns,
        &Load::new(url("#/service/web?group=instance"))
            .screenshot(out_dir().join("web-by-instance.png")),
    );
    save(&page, "web-by-instance.html");
    let lines = legend(&page);
    assert_eq!(
        lines.keys().cloned().collect::<Vec<_>>(),
        want,
        "legend by instance: {lines:?} (containers {ids:?})"
    );
    assert!(
        lines.values().all(|v| *v > 0.0),
        "legend by instance: {lines:?}"
    );
    assert_eq!(
        chart_lines(&page)["connections_per_s"].len(),
        4,
        "{:?}",
        chart_lines(&page)
    );

    // By label: the two lanes.
    let page = browser::load(&ns, &Load::new(url("#/service/web?group=label:lane")));
    let lines = legend(&page);
    assert_eq!(
        lines.keys().collect::<Vec<_>>(),
        ["blue", "green"],
        "legend by label:lane: {lines:?}"
    );

    // The service list: web with four instances, all live.
    let page = browser::load(
        &ns,
        &Load::new(url("#/")).screenshot(out_dir().join("services.png")),
    );
    save(&page, "services.html");
    let rows = page.dom.with_attr("tr", "data-service");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].attr("data-service"), Some("web"));
    assert_eq!(rows[0].attr("data-total"), Some("4"));
    assert_eq!(rows[0].attr("data-live"), Some("4"));
    assert_eq!(rows[0].attr("data-health"), Some("healthy"));

    stop.store(true, Ordering::Relaxed);
    let counts = client.join().unwrap();
    let errors: usize = counts
        .iter()
        .filter(|(k, _)| k.starts_with("error"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(errors, 0, "client errors: {counts:?}");
    eprintln!(
        "client: {counts:?}; screenshots in {}; total {:?}",
        out_dir().display(),
        t0.elapsed()
    );
    drop(fluxd);
    drop(docker);
}

/// Service `web` with two static instances b0 and b1, each a backend in the namespace, routed.
fn web_with_two_backends(ns: &Netns, fluxd: &Fluxd) -> Vec<Backend> {
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    let backends: Vec<Backend> = (0..2)
        .map(|i| {
            let b = Backend::start(ns, &format!("b{i}"), 9000 + i as u16);
            let addr = b.addr.to_string();
            fluxd.ok(&["instance", "add", "web", &b.name, "--address", &addr]);
            b
        })
        .collect();
    fluxd.wait_routed("web");
    backends
}

/// Waits until both instances' series show traffic (a client loop runs).
fn wait_for_series(ns: &Netns, fluxd: &Fluxd) {
    let ready = wait_until(Duration::from_secs(15), || {
        let s = api_series(ns, "instance");
        s.len() == 2 && s.values().all(|(_, v)| *v > 0.0)
    });
    assert!(ready.is_some(), "series never filled: {}", fluxd.log());
}

/// fluxd stops in the middle of a page load: the page keeps its data on screen and says since
/// when it is stale. A proxy in front of fluxd lets the page's first polls through, holds the
/// next one while the test kills fluxd, then lets it fail.
#[test]
fn page_keeps_last_data_and_shows_stale_when_fluxd_is_gone() {
    let ns = Netns::new("ui-stale");
    let mut fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    let backends = web_with_two_backends(&ns, &fluxd);
    let stop = Arc::new(AtomicBool::new(false));
    let client = client_loop(&ns, stop.clone(), Duration::from_secs(20));
    wait_for_series(&ns, &fluxd);

    // Two polls of the page get answers; the third finds fluxd gone, and so do the later ones.
    let proxy = GateProxy::start(
        &ns,
        "127.0.0.1:7071".parse().unwrap(),
        http_addr(),
        "/v1/series",
        2,
    );
    let running = browser::spawn(
        &ns,
        &Load::new("http://127.0.0.1:7071/#/service/web?group=instance")
            .budget(12_000)
            .screenshot(out_dir().join("web-stale.png")),
    );
    let reached = proxy.reached.recv_timeout(Duration::from_secs(60));
    assert!(reached.is_ok(), "the page never polled a third time");
    fluxd.kill();
    proxy.resume.send(()).unwrap();
    let page = running.wait();
    save(&page, "web-stale.html");
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();

    let lines = legend(&page);
    assert_eq!(
        lines.keys().collect::<Vec<_>>(),
        ["b0", "b1"],
        "the last data is still shown: {lines:?}"
    );
    assert!(lines.values().all(|v| *v > 0.0), "{lines:?}");
    assert_eq!(page.dom.with_attr("tr", "data-instance").len(), 2);
    let stale = page.dom.by_id("stale").expect("#stale");
    assert!(
        !stale.attrs.contains_key("hidden"),
        "#stale hidden after fluxd was killed: {stale:?}"
    );
    let last_ok = stale.num("data-last-ok").unwrap_or(0.0);
    assert!(last_ok > 0.0, "{stale:?}");
    let text = page.dom.text_after(&stale);
    assert!(text.starts_with("stale:"), "stale text {text:?}");
    drop(backends);
    drop(proxy);
}

/// Whether fluxd says its store is reachable (`GET /v1/host`).
fn store_reachable(ns: &Netns) -> Option<bool> {
    let (status, body) = http_get(ns, http_addr(), "/v1/host").ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["store"]["reachable"].as_bool()
}

/// etcd stops while traffic flows: fluxd answers from the catalog as it last followed it, so
/// the page shows the service, its instances and live charts with a "store unreachable" marker
/// rather than an error; once etcd is back, fluxd says so again.
#[test]
fn page_marks_the_store_down_while_etcd_is_stopped() {
    let ns = Netns::new("ui-etcd");
    let mut etcd = Etcd::start_in(&ns.name, "127.0.0.1".parse().unwrap());
    let store = format!("etcd://{}", etcd.endpoint.trim_start_matches("http://"));
    let fluxd = Fluxd::in_netns(&ns.name, "h1", &["--http", HTTP, "--store", &store]);
    let backends = web_with_two_backends(&ns, &fluxd);
    let stop = Arc::new(AtomicBool::new(false));
    let client = client_loop(&ns, stop.clone(), Duration::from_secs(40));
    wait_for_series(&ns, &fluxd);
    assert_eq!(store_reachable(&ns), Some(true));

    etcd.stop();
    let noticed = wait_until(Duration::from_secs(15), || {
        store_reachable(&ns) == Some(false)
    });
    assert!(
        noticed.is_some(),
        "fluxd never said etcd was down: {}",
        fluxd.log()
    );
    let page = browser::load(
        &ns,
        &Load::new(url("#/service/web?group=instance"))
            .budget(8_000)
            .screenshot(out_dir().join("web-store-down.png")),
    );
    save(&page, "web-store-down.html");

    let lines = legend(&page);
    assert_eq!(lines.keys().collect::<Vec<_>>(), ["b0", "b1"], "{lines:?}");
    assert!(
        lines.values().all(|v| *v > 0.0),
        "charts are live: {lines:?}"
    );
    assert_eq!(page.dom.with_attr("tr", "data-instance").len(), 2);
    let stale = page.dom.by_id("stale").expect("#stale");
    assert!(
        stale.attrs.contains_key("hidden"),
        "fluxd answers, so no error is shown: {stale:?}"
    );
    let marker = page.dom.by_id("store-stale").expect("#store-stale");
    assert!(!marker.attrs.contains_key("hidden"), "{marker:?}");
    assert!(marker.num("data-since").unwrap_or(0.0) > 0.0, "{marker:?}");
    let text = page.dom.text_after(&marker);
    assert!(text.starts_with("store unreachable since"), "{text:?}");

    etcd.restart();
    let back = wait_until(Duration::from_secs(30), || {
        store_reachable(&ns) == Some(true)
    });
    stop.store(true, Ordering::Relaxed);
    let counts = client.join().unwrap();
    assert!(
        back.is_some(),
        "fluxd never saw etcd again: {}",
        fluxd.log()
    );
    assert!(
        counts.keys().all(|k| !k.starts_with("error")),
        "connections failed while etcd was down: {counts:?}\n{}",
        fluxd.log()
    );
    drop(backends);
}

/// An `http` service's page: besides the connection charts, requests/s, responses by status
/// class and request latency, one line per group (instance here), and the same group control.
#[test]
fn http_service_page_charts_requests_status_and_latency() {
    use support::http_backend::{Client, HttpBackend};
    let ns = Netns::new("ui-http");
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
    let backends = [
        HttpBackend::start(&ns, "good", 9000, 200),
        HttpBackend::start(&ns, "bad", 9001, 500),
    ];
    for b in &backends {
        fluxd.add_instance("web", &b.name, b.addr);
    }
    fluxd.wait_routed("web");
    // Requests on kept-alive connections until stopped, bounded in time.
    let stop = Arc::new(AtomicBool::new(false));
    let vip = VIP.parse().unwrap();
    let client = {
        let stop = stop.clone();
        ns.spawn(move || {
            let start = Instant::now();
            let mut c = None;
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
                if c.is_none() {
                    c = Client::connect(vip).ok();
                }
                if let Some(cl) = c.as_mut() {
                    if cl.get("web").is_err() {
                        c = None;
                    } else {
                        n += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let requests = |key: &str, s: &serde_json::Value| -> usize {
        s["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["key"] == key)
            .map(|x| x["requests_per_s"].as_array().unwrap().len())
            .sum()
    };
    let ready = wait_until(Duration::from_secs(20), || {
        let Ok((200, body)) = http_get(&ns, http_addr(), "/v1/series?service=web&group=instance")
        else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        requests("good", &v) >= 3 && requests("bad", &v) >= 3
    });
    assert!(ready.is_some(), "series never filled: {}", fluxd.log());

    let page = browser::load(
        &ns,
        &Load::new(url("#/service/web?group=instance"))
            .screenshot(out_dir().join("http-by-instance.png")),
    );
    save(&page, "http-by-instance.html");
    let charts = chart_lines(&page);
    for metric in [
        "requests_per_s",
        "status",
        "request_latency",
        "connections_per_s",
    ] {
        let keys: Vec<&String> = charts
            .get(metric)
            .unwrap_or_else(|| panic!("no chart {metric}: {charts:?}"))
            .iter()
            .collect();
        assert_eq!(keys, ["bad", "good"], "chart {metric}: {charts:?}");
    }
    // The status chart: the good instance's 2xx line and the bad one's 5xx line.
    let status_lines: BTreeSet<(String, String)> = page
        .dom
        .with_attr("path", "data-class")
        .iter()
        .filter(|e| e.num("data-last-value").unwrap_or(0.0) > 0.0)
        .map(|e| {
            (
                e.attr("data-series-key").unwrap().to_string(),
                e.attr("data-class").unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        status_lines.contains(&("good".into(), "2xx".into()))
            && status_lines.contains(&("bad".into(), "5xx".into()))
            && !status_lines.contains(&("good".into(), "5xx".into())),
        "{status_lines:?}"
    );
    let legend: BTreeMap<String, (f64, f64)> = page
        .dom
        .with_attr("li", "data-series-key")
        .iter()
        .map(|e| {
            (
                e.attr("data-series-key").unwrap().to_string(),
                (
                    e.num("data-last-requests").unwrap_or(-1.0),
                    e.num("data-last-5xx").unwrap_or(-1.0),
                ),
            )
        })
        .collect();
    assert!(
        legend["good"].0 > 0.0 && legend["good"].1 == 0.0,
        "{legend:?}"
    );
    assert!(legend["bad"].1 > 0.0, "{legend:?}");
    let options: Vec<String> = page
        .dom
        .with_attr("option", "value")
        .iter()
        // The group selector's, not the scope selector's.
        .filter(|o| o.attr("data-scope").is_none())
        .map(|o| o.attr("value").unwrap().to_string())
        .collect();
    assert_eq!(
        options,
        ["instance", "image", "tag", "host"],
        "group options"
    );

    // Grouped by host: one line, both instances summed.
    let page = browser::load(&ns, &Load::new(url("#/service/web?group=host")));
    let charts = chart_lines(&page);
    assert_eq!(charts["requests_per_s"].len(), 1, "{charts:?}");
    stop.store(true, Ordering::Relaxed);
    let n = client.join().unwrap();
    assert!(n > 0);
    drop(backends);
}

/// The VIP guard's refusal shows on the service list (in the refused service's row only) and on
/// the service's page.
#[test]
fn refused_vip_is_marked_not_routed_on_this_host() {
    let ns = Netns::new("ui-guard");
    ns.ip(&["link", "add", "g0", "type", "veth", "peer", "name", "g1"]);
    ns.ip(&["addr", "add", "198.18.5.5/32", "dev", "g0"]);
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    fluxd.ok(&["service", "add", "mine", "--address", "198.18.5.5:80"]);
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    // An instance, so `web` is routed (a service with none is refused instead).
    fluxd.add_instance("web", "b0", "127.0.0.1:9000");
    fluxd.wait_routed("web");
    let reason = "is 198.18.5.5, an address of g0";

    let page = browser::load(
        &ns,
        &Load::new(url("")).screenshot(out_dir().join("guard-list.png")),
    );
    save(&page, "guard-list.html");
    let rows = page.dom.with_attr("tr", "data-service");
    assert_eq!(rows.len(), 2, "{rows:?}");
    let markers = page.dom.with_attr("span", "data-refused");
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(markers[0].attr("data-refused"), Some(reason));
    assert_eq!(
        page.dom.text_after(&markers[0]),
        format!("not routed on this host: VIP {reason}")
    );
    // In mine's row (rows are sorted by name: mine, then web).
    assert_eq!(rows[0].attr("data-service"), Some("mine"));
    assert!(rows[0].at < markers[0].at && markers[0].at < rows[1].at);

    let page = browser::load(
        &ns,
        &Load::new(url("#/service/mine")).screenshot(out_dir().join("guard-service.png")),
    );
    save(&page, "guard-service.html");
    let marker = page.dom.by_id("refused").expect("#refused on mine's page");
    assert_eq!(marker.attr("data-refused"), Some(reason));
    let page = browser::load(&ns, &Load::new(url("#/service/web")));
    assert!(
        page.dom.by_id("service-name").is_some(),
        "web's page never rendered"
    );
    assert!(page.dom.by_id("refused").is_none());
}

/// An instance failing its active health check is marked with the check's reason on the
/// service page; the passing one is not.
#[test]
fn failing_health_check_shows_its_reason() {
    use support::http_backend::HttpBackend;
    let ns = Netns::new("ui-check");
    let good = HttpBackend::start(&ns, "good", 9000, 200);
    let sick = HttpBackend::start(&ns, "sick", 9001, 200);
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--health",
        "http:/healthz",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "100ms",
        "--health-fall",
        "2",
    ]);
    fluxd.add_instance("web", "good", good.addr);
    fluxd.add_instance("web", "sick", sick.addr);
    sick.set_health(503);
    let failing = wait_until(Duration::from_secs(10), || {
        let q = fluxd.json(&["query", "--service", "web", "--state", "failing"]);
        q.as_array().is_some_and(|a| a.len() == 1)
    });
    assert!(failing.is_some(), "{}", fluxd.log());

    let page = browser::load(
        &ns,
        &Load::new(url("#/service/web")).screenshot(out_dir().join("check-failing.png")),
    );
    save(&page, "check-failing.html");
    let header = page.dom.by_id("health-check").expect("#health-check");
    assert_eq!(page.dom.text_after(&header), "health check http:/healthz");
    let marks = page.dom.with_attr("span", "data-check");
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(
        marks[0].attr("data-check"),
        Some("http GET /healthz answered 503")
    );
    let text = page.dom.text_after(&marks[0]).trim().to_string();
    assert!(
        text.starts_with("check: http GET /healthz answered 503,"),
        "{text}"
    );
}

/// A container instance's address note (here: why it has no address) is shown beside its state
/// on the service page. The record is written into etcd as a host's agent would write it, so no
/// Docker is needed.
#[test]
fn address_note_is_shown_beside_no_address() {
    let ns = Netns::new("ui-note");
    let etcd = Etcd::start_in(&ns.name, "127.0.0.1".parse().unwrap());
    let store = format!("etcd://{}", etcd.endpoint.trim_start_matches("http://"));
    let fluxd = Fluxd::in_netns(&ns.name, "h1", &["--http", HTTP, "--store", &store]);
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    let note = "port 80/tcp is published only on 127.0.0.1:49153, which other hosts cannot reach";
    let record = serde_json::json!({
        "service": "web", "name": "0123456789ab", "origin": "container", "host": "h2",
        "rule": "all",
        "container": {
            "id": "0123456789ab0123456789ab", "name": "loop", "image": "docker.io/library/webimg",
            "tag": "latest", "address_note": note,
        },
    });
    let put = etcd.ctl_output(&[
        "put",
        "/flux/instances/web/0123456789ab",
        &record.to_string(),
    ]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let listed = wait_until(Duration::from_secs(5), || {
        fluxd.ok(&[
            "query",
            "--service",
            "web",
            "--state",
            "no-address",
            "--quiet",
        ]) == "0123456789ab\n"
    });
    assert!(listed.is_some(), "{}", fluxd.ok(&["query"]));

    let page = browser::load(
        &ns,
        &Load::new(url("#/service/web")).screenshot(out_dir().join("note-no-address.png")),
    );
    save(&page, "note-no-address.html");
    let rows = page.dom.with_attr("tr", "data-instance");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].attr("data-state"), Some("no address"));
    let notes = page.dom.with_attr("span", "data-note");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].attr("data-note"), Some(note));
    assert_eq!(page.dom.text_after(&notes[0]).trim(), note);
}

/// Traffic control on the service page (issue 16): a 90/10 canary split shows as two lines
/// when grouped by tag, one about nine times the other; each rule shows its weight and a
/// drained instance is marked `drained`. Container records are written into etcd as host h2's
/// agent writes them, pointing at backends on the namespace's loopback (no Docker needed).
#[test]
fn weighted_split_shows_grouped_by_tag_and_drained_instances_are_marked() {
    let ns = Netns::new("ui-weights");
    let etcd = Etcd::start_in(&ns.name, "127.0.0.1".parse().unwrap());
    let store = format!("etcd://{}", etcd.endpoint.trim_start_matches("http://"));
    let fluxd = Fluxd::in_netns(&ns.name, "h1", &["--http", HTTP, "--store", &store]);
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.ok(&["select", "web", "v1", "--tag", "1", "--weight", "90"]);
    fluxd.ok(&["select", "web", "v2", "--tag", "2", "--weight", "10"]);
    let backends: Vec<Backend> = [("v1-a", 9501), ("v1-b", 9502), ("v2-a", 9503)]
        .iter()
        .map(|(n, p)| Backend::start(&ns, n, *p))
        .collect();
    for b in &backends {
        let (rule, tag) = if b.name.starts_with("v1") {
            ("v1", "1")
        } else {
            ("v2", "2")
        };
        let record = serde_json::json!({
            "service": "web", "name": b.name, "origin": "container", "host": "h2", "rule": rule,
            "container": {
                "id": format!("{}0000", b.name), "name": b.name,
                "image": "docker.io/library/webimg", "tag": tag,
            },
            "address": b.addr.to_string(),
        });
        let key = format!("/flux/instances/web/{}", b.name);
        etcd.ctl(&["put", &key, &record.to_string()]);
    }
    // A static instance, live but drained: no connection, marked on the page.
    let old = Backend::start(&ns, "old", 9504);
    fluxd.add_instance("web", "old", old.addr);
    fluxd.ok(&["instance", "drain", "web", "old"]);
    fluxd.wait_routed("web");
    let routed = wait_until(Duration::from_secs(10), || {
        fluxd.debug()["services"][0]["traffic"]
            .as_str()
            .is_some_and(|t| t.contains("drained old") && t.contains("v2=10"))
            && fluxd.debug()["services"][0]["instances"]
                .as_array()
                .is_some_and(|i| i.len() == 4)
    });
    assert!(routed.is_some(), "{}", fluxd.debug());

    let stop = Arc::new(AtomicBool::new(false));
    let client = client_loop(&ns, stop.clone(), Duration::from_secs(40));
    let ready = wait_until(Duration::from_secs(25), || {
        let s = api_series(&ns, "tag");
        ["1", "2"]
            .iter()
            .all(|t| s.get(*t).is_some_and(|(n, v)| *n >= 5 && *v > 0.0))
    });
    assert!(ready.is_some(), "series: {:?}", api_series(&ns, "tag"));
    let page = browser::load(
        &ns,
        &Load::new(url("#/service/web?group=tag"))
            .screenshot(out_dir().join("web-weights-by-tag.png")),
    );
    save(&page, "web-weights-by-tag.html");
    stop.store(true, Ordering::Relaxed);
    let counts = client.join().unwrap();

    let lines = legend(&page);
    assert!(
        lines.contains_key("1") && lines.contains_key("2"),
        "legend by tag: {lines:?}"
    );
    // The split over the whole run, as the client saw it.
    let v2 = counts.get("v2-a").copied().unwrap_or(0) as f64;
    let total: usize = counts.values().sum();
    let share = 100.0 * v2 / total as f64;
    eprintln!("client: {counts:?}; v2 {share:.1}%; page legend {lines:?}");
    assert_eq!(counts.get("old"), None, "{counts:?}");
    assert!(total >= 500, "{counts:?}");
    assert!((6.0..=14.0).contains(&share), "{counts:?}");
    // The charted series (what the lines are drawn from): tag 1 about nine times tag 2 over
    // the run.
    let (_, body) = http_get(&ns, http_addr(), "/v1/series?service=web&group=tag").unwrap();
    let series: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sum = |key: &str| -> f64 {
        series["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["key"] == key)
            .flat_map(|s| s["connections_per_s"].as_array().unwrap().iter())
            .filter_map(|x| x.as_f64())
            .sum()
    };
    let ratio = sum("1") / sum("2");
    eprintln!("charted tag 1 / tag 2: {ratio:.1}");
    assert!((5.0..=16.0).contains(&ratio), "{series}");

    let weights: Vec<String> = page
        .dom
        .with_attr("li", "data-weight")
        .iter()
        .map(|e| e.attr("data-weight").unwrap().to_string())
        .collect();
    assert_eq!(weights, ["90", "10"]);
    let drained: Vec<String> = page
        .dom
        .with_attr("tr", "data-instance")
        .iter()
        .filter(|r| r.attr("data-instance") == Some("old"))
        .map(|r| r.attr("data-instance").unwrap().to_string())
        .collect();
    assert_eq!(drained, ["old"]);
    assert_eq!(page.dom.with_attr("span", "data-drained").len(), 1);
}
