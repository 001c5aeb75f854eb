//! A flux cluster on one machine: two or three simulated hosts, each a network namespace with
//! its own dockerd and fluxd, joined by veth pairs to a bridge in a "lan" namespace that also
//! runs etcd (one member or three). Addresses are in 198.19.250.0/24 (TESTBED.md); nothing has
//! a route off the machine and the machine's own namespace is never changed: every link,
//! address and route is created inside a namespace the cluster owns, with `ip -n`.
//!
//! Everything is torn down on drop, in order (per host: fluxd, dockerd, namespace; then etcd;
//! then the lan namespace, which takes the bridge and the veth ends with it), also when a test
//! panics. A test process killed from outside leaves orphans; `integration/run` sweeps them.
//!
//! ```text
//!   host-a ns                 lan ns                          host-b ns
//!   eth0 198.19.250.11 ---- vh0 ┐                    ┌ vh1 ---- eth0 198.19.250.12
//!   dockerd, fluxd              br0 198.19.250.254   │          dockerd, fluxd
//!                               etcd .201 (.202 .203)
//! ```
//!
//! Shared by the `cluster` and `faults` targets; each uses the parts it needs.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::backend::who_serves;
use crate::support::docker::{Dockerd, NAME_PORT};
use crate::support::etcd::Etcd;
use crate::support::fluxd::{fluxctl, Fluxd};
use crate::support::netns::Netns;

/// The test LAN; hosts are .11, .12, .13, etcd members .201-.203, the bridge .254.
pub const LAN: &str = "198.19.250";
/// The image every host imports; containers of service `web` run it.
pub const IMAGE: &str = "webimg:latest";
/// Service `web`'s VIP.
pub const WEB_VIP: &str = "198.18.0.10:80";

pub fn web_vip() -> SocketAddrV4 {
    WEB_VIP.parse().unwrap()
}

/// Every host's fluxd serves its read-only HTTP API (UI, series) on its own IP at this port.
pub const HTTP_PORT: u16 = 7070;

pub struct ClusterConfig {
    /// Number of hosts, 1-3.
    pub hosts: usize,
    /// 1 or 3 etcd members.
    pub etcd_members: usize,
    /// `--host-ttl` for every fluxd, in seconds.
    pub host_ttl: u64,
    /// `--steering` for every fluxd: `bpf` (fluxd's default path, pinned so that a host that
    /// cannot load it fails the test instead of falling back) or `nat`. Default: `bpf`, or
    /// `FLUX_CLUSTER_STEERING` (`integration/run --steering nat` runs every case on nat).
    pub steering: String,
}

/// The steering cluster hosts run unless a test says: `FLUX_CLUSTER_STEERING`, else `bpf`.
pub fn default_steering() -> String {
    std::env::var("FLUX_CLUSTER_STEERING").unwrap_or_else(|_| "bpf".into())
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            hosts: 2,
            etcd_members: 1,
            host_ttl: 5,
            steering: default_steering(),
        }
    }
}

/// Field order is drop order: hosts, then etcd, then the lan namespace.
pub struct Cluster {
    pub hosts: Vec<Host>,
    pub etcd: Vec<Etcd>,
    pub lan: Netns,
    pub host_ttl: Duration,
    started: Instant,
}

/// One simulated host. Field order is drop order: fluxd, dockerd, namespace.
pub struct Host {
    /// `host-a`, `host-b`, `host-c`: fluxd's `--host-name`.
    pub name: String,
    /// One letter, to prefix container names with, so a served name tells the host.
    pub letter: char,
    pub ip: Ipv4Addr,
    pub fluxd: Fluxd,
    /// None once the test stopped it for good (`stop_docker`).
    pub docker: Option<Dockerd>,
    pub ns: Netns,
    /// The lan-side end of this host's veth, in the lan namespace: down = partitioned.
    lan_link: String,
    lan_ns: String,
}

impl Cluster {
    /// Builds the LAN, starts etcd, then each host (dockerd, image import, fluxd on etcd).
    /// Takes about 10 s per host; the Dockerd values must stay on the calling thread (they
    /// stop when the thread that started them ends).
    pub fn new(config: ClusterConfig) -> Cluster {
        assert!((1..=3).contains(&config.hosts));
        assert!(config.etcd_members == 1 || config.etcd_members == 3);
        let started = Instant::now();
        let lan = Netns::new("cl-lan");
        lan.ip(&["link", "add", "br0", "type", "bridge"]);
        lan.ip(&["link", "set", "br0", "up"]);
        lan.ip(&["addr", "add", &format!("{LAN}.254/24"), "dev", "br0"]);
        let etcd_ips: Vec<Ipv4Addr> = (0..config.etcd_members)
            .map(|i| format!("{LAN}.{}", 201 + i).parse().unwrap())
            .collect();
        for ip in &etcd_ips {
            lan.ip(&["addr", "add", &format!("{ip}/24"), "dev", "br0"]);
        }
        let etcd = Etcd::cluster_in(&lan.name, &etcd_ips);
        let store = format!(
            "etcd://{}",
            etcd_ips
                .iter()
                .map(|ip| format!("{ip}:2379"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut cluster = Cluster {
            hosts: Vec::new(),
            etcd,
            lan,
            host_ttl: Duration::from_secs(config.host_ttl),
            started,
        };
        for i in 0..config.hosts {
            let h = cluster.add_host(i, &store, &config);
            assert_eq!(
                h.fluxd.steering(),
                config.steering,
                "{}: {}",
                h.name,
                h.fluxd.log()
            );
            cluster.hosts.push(h);
        }
        eprintln!(
            "cluster of {} hosts ({} steering) and {} etcd member(s) up in {:?}",
            config.hosts,
            config.steering,
            config.etcd_members,
            started.elapsed()
        );
        cluster
    }

    fn add_host(&self, i: usize, store: &str, config: &ClusterConfig) -> Host {
        let ttl = config.host_ttl;
        let letter = (b'a' + i as u8) as char;
        let name = format!("host-{letter}");
        let ip: Ipv4Addr = format!("{LAN}.{}", 11 + i).parse().unwrap();
        let ns = Netns::new(&format!("cl-{letter}"));
        let lan_link = format!("vh{i}");
        // Created inside the lan namespace with its peer placed straight into the host's: the
        // machine's own namespace never sees either end.
        self.lan.ip(&[
            "link", "add", &lan_link, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.lan.ip(&["link", "set", &lan_link, "master", "br0"]);
        self.lan.ip(&["link", "set", &lan_link, "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let docker = Dockerd::new(&ns);
        docker.import_image(IMAGE);
        let endpoint = docker.endpoint();
        let ip_s = ip.to_string();
        let ttl_s = ttl.to_string();
        // On the host's own address, so the other hosts' UIs can gather its series.
        let http_s = format!("{ip}:{HTTP_PORT}");
        let fluxd = Fluxd::in_netns(
            &ns.name,
            &name,
            &[
                "--store",
                store,
                "--host-ip",
                &ip_s,
                "--docker",
                &endpoint,
                "--host-ttl",
                &ttl_s,
                "--http",
                &http_s,
                "--steering",
                &config.steering,
            ],
        );
        Host {
            name,
            letter,
            ip,
            fluxd,
            docker: Some(docker),
            ns,
            lan_link,
            lan_ns: self.lan.name.clone(),
        }
    }

    pub fn host(&self, letter: char) -> &Host {
        self.hosts.iter().find(|h| h.letter == letter).unwrap()
    }

    pub fn host_mut(&mut self, letter: char) -> &mut Host {
        self.hosts.iter_mut().find(|h| h.letter == letter).unwrap()
    }

    /// A member that runs, for `etcdctl`.
    fn live_member(&self) -> &Etcd {
        self.etcd
            .iter()
            .find(|m| m.running())
            .expect("no etcd member runs")
    }

    /// `etcdctl ARGS` (inside the lan namespace) against a running member; stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        self.live_member().ctl(args)
    }

    /// The store's current revision.
    pub fn etcd_revision(&self) -> i64 {
        let out = self.etcdctl(&["get", "/flux/", "--prefix", "--limit", "1", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl get -w json");
        v["header"]["revision"].as_i64().unwrap()
    }

    /// Compacts the store's history up to the current revision; returns it.
    pub fn compact(&self) -> i64 {
        let rev = self.etcd_revision();
        let out = self.etcdctl(&["compact", &rev.to_string(), "--physical"]);
        assert!(out.contains("compacted"), "etcdctl compact {rev}: {out}");
        rev
    }

    /// Instance keys in etcd under `/flux/instances/SERVICE/`, sorted, with repeats kept.
    pub fn instance_keys(&self, service: &str) -> Vec<String> {
        let prefix = format!("/flux/instances/{service}/");
        let mut keys: Vec<String> = self
            .etcdctl(&["get", &prefix, "--prefix", "--keys-only"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    /// `service add web --address WEB_VIP --instance-port 8080` and a rule selecting the test
    /// image, through host a.
    pub fn add_web_service(&self) {
        let a = &self.hosts[0].fluxd;
        a.ok(&[
            "service",
            "add",
            "web",
            "--address",
            WEB_VIP,
            "--instance-port",
            &NAME_PORT.to_string(),
        ]);
        a.ok(&["select", "web", "all", "--image", "webimg"]);
    }

    /// Short container id to container name, over every host's Docker (containers that ran
    /// and stopped included).
    pub fn container_names(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for h in &self.hosts {
            let Some(d) = &h.docker else { continue };
            let out = d.docker(&["ps", "-a", "--format", "{{.ID}} {{.Names}}"]);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some((id, name)) = line.split_once(' ') {
                    m.insert(id.to_string(), name.to_string());
                }
            }
        }
        m
    }

    /// Waits until every host whose fluxd runs lists exactly `want` (container names) as
    /// instances of `service` in `fluxctl query` and routes to exactly them (`fluxd debug`),
    /// each once. Returns the time it took, or None after `limit`.
    pub fn wait_converged(
        &self,
        service: &str,
        want: &BTreeSet<String>,
        limit: Duration,
    ) -> Option<Duration> {
        let names = self.container_names();
        let start = Instant::now();
        while start.elapsed() < limit {
            let ok = self.hosts.iter().filter(|h| h.fluxd.running()).all(|h| {
                h.query_names(service).as_ref() == Some(want)
                    && h.routed_names(service, &names).as_ref() == Some(want)
            });
            if ok {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// What every host sees, and the tail of every log: for assertion messages.
    pub fn dump(&self, service: &str) -> String {
        let mut s = format!(
            "\n--- cluster {:?} after start; etcd keys {:?}\n",
            self.started.elapsed(),
            self.instance_keys(service)
        );
        let names = self.container_names();
        for h in &self.hosts {
            s += &format!(
                "--- {}: query {:?} routes {:?}\n--- {} fluxd log (tail):\n{}\n",
                h.name,
                h.query(service),
                h.routed_names(service, &names),
                h.name,
                tail(&h.fluxd.log(), 40)
            );
        }
        for m in &self.etcd {
            s += &format!("--- etcd {} log (tail):\n{}\n", m.name, tail(&m.log(), 10));
        }
        s
    }
}

/// When the steps of `Host::restart_docker` happened.
#[derive(Debug, Clone, Copy)]
pub struct DockerRestart {
    /// SIGTERM sent.
    pub stopping: Instant,
    /// The daemon (and its containerd) exited; its containers are stopped.
    pub stopped: Instant,
    /// The daemon answers again.
    pub answering: Instant,
}

/// One instance as `fluxctl --json query` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub host: String,
    /// Container name (without Docker's leading slash).
    pub container: String,
    /// Instance name: the short container id.
    pub name: String,
    pub address: String,
    pub state: String,
}

impl Host {
    pub fn docker(&self) -> &Dockerd {
        self.docker
            .as_ref()
            .expect("this host's dockerd was stopped")
    }

    /// Runs a container named `NAME` (by convention prefixed with the host letter) that serves
    /// its name on port 8080, published on a random host port; returns its id.
    pub fn run_web(&self, name: &str) -> String {
        self.docker()
            .run_name_server(IMAGE, name, &["-p", &NAME_PORT.to_string()])
    }

    /// `fluxctl --json query --service S`; None if fluxctl failed (daemon down).
    pub fn query(&self, service: &str) -> Option<Vec<Listed>> {
        query_socket(&self.fluxd.socket, service)
    }

    /// Container names of the instances listed by `fluxctl query`, each once; None if a name
    /// is listed twice (a duplicate) or fluxctl failed.
    pub fn query_names(&self, service: &str) -> Option<BTreeSet<String>> {
        names_once(self.query(service)?.into_iter().map(|l| l.container))
    }

    /// Container names this host's data plane routes `service` to (`fluxd debug`), through
    /// `names` (short id to container name, see `Cluster::container_names`); each once, None
    /// if one repeats or the daemon does not answer.
    pub fn routed_names(
        &self,
        service: &str,
        names: &BTreeMap<String, String>,
    ) -> Option<BTreeSet<String>> {
        let routed = routed_instances(&self.fluxd.socket, service)?;
        names_once(
            routed
                .into_iter()
                .map(|i| names.get(&i).cloned().unwrap_or(i)),
        )
    }

    /// SIGTERM and start again on the same flags and state.
    pub fn restart_fluxd(&mut self) {
        self.fluxd.stop();
        self.fluxd.start();
    }

    /// Stops this host's dockerd for good: removes its containers, stops the daemon, deletes
    /// its state.
    pub fn stop_docker(&mut self) {
        drop(self.docker.take());
    }

    /// Stops this host's dockerd as `systemctl restart docker` does (SIGTERM: it stops its
    /// containers, which come back with it if their restart policy says so) and starts it
    /// again on the same state; returns when each step began or ended.
    pub fn restart_docker(&mut self) -> DockerRestart {
        let d = self
            .docker
            .as_mut()
            .expect("this host's dockerd was stopped");
        let stopping = Instant::now();
        d.stop_daemon();
        let stopped = Instant::now();
        d.restart();
        DockerRestart {
            stopping,
            stopped,
            answering: Instant::now(),
        }
    }

    /// Cuts this host off the LAN (the lan-side end of its veth goes down; the host sees its
    /// link lose carrier) or restores it.
    pub fn set_link(&self, up: bool) {
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                &self.lan_ns,
                "link",
                "set",
                &self.lan_link,
                if up { "up" } else { "down" },
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{:?}", out);
    }

    /// A client loop from this host's namespace against `vip`; see `Load`.
    pub fn load(&self, vip: SocketAddrV4, max_conns: usize, max_time: Duration) -> Load {
        Load::start(&self.ns, vip, max_conns, max_time)
    }

    /// Connects to `vip` from this host until a connection is served by `container`; the time
    /// it took, or None after `limit`. Every attempt is bounded (5 s connect, 5 s read).
    pub fn first_served_by(
        &self,
        vip: SocketAddrV4,
        container: &str,
        limit: Duration,
    ) -> Option<Duration> {
        self.probe(Instant::now(), vip, container, limit)
            .join()
            .expect("probe panicked")
    }

    /// `first_served_by` on a thread of its own, timed from `since`.
    pub fn probe(
        &self,
        since: Instant,
        vip: SocketAddrV4,
        container: &str,
        limit: Duration,
    ) -> JoinHandle<Option<Duration>> {
        let want = container.to_string();
        self.ns.spawn(move || {
            while since.elapsed() < limit {
                if who_serves(vip).is_ok_and(|n| n == want) {
                    return Some(since.elapsed());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        })
    }
}

pub fn query_socket(socket: &std::path::Path, service: &str) -> Option<Vec<Listed>> {
    let out = fluxctl(socket, &["--json", "query", "--service", service]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .map(|i| Listed {
                host: i["host"].as_str().unwrap_or("").to_string(),
                container: i["container"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string(),
                name: i["name"].as_str().unwrap_or("").to_string(),
                address: i["address"].as_str().unwrap_or("").to_string(),
                state: i["state"].as_str().unwrap_or("").to_string(),
            })
            .collect(),
    )
}

/// Instance names the data plane routes `service` to, from `fluxd debug --json`.
pub fn routed_instances(socket: &std::path::Path, service: &str) -> Option<Vec<String>> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args(["debug", "--json", "--api"])
        .arg(format!("unix://{}", socket.display()))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let svc = v["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == service)?
        .clone();
    Some(
        svc["instances"]
            .as_array()?
            .iter()
            .filter_map(|i| i["instance"].as_str().map(str::to_string))
            .collect(),
    )
}

/// The set of names, or None if one repeats.
fn names_once(names: impl Iterator<Item = String>) -> Option<BTreeSet<String>> {
    let mut set = BTreeSet::new();
    for n in names {
        if !set.insert(n) {
            return None;
        }
    }
    Some(set)
}

pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A client loop on a thread inside a host's namespace: connect to the VIP, read the serving
/// container's name, close, pause 2 ms, again; until told to finish, or `max_conns`
/// connections, or `max_time`. Each connection is bounded (5 s connect, 5 s read).
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<LoadReport>>,
}

#[derive(Debug)]
pub struct LoadReport {
    /// When the loop started; failure times count from here.
    pub started: Instant,
    pub total: usize,
    /// Failed connections in order: when each began and ended (since `started`), and why.
    pub failures: Vec<Failure>,
    /// Connections per serving container name.
    pub served: BTreeMap<String, usize>,
    /// The longest connection (connect + name), which shows retries inside the proxy.
    pub slowest: Duration,
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub began: Duration,
    pub ended: Duration,
    pub error: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:?}..{:?}: {}]", self.began, self.ended, self.error)
    }
}

impl LoadReport {
    fn new() -> LoadReport {
        LoadReport {
            started: Instant::now(),
            total: 0,
            failures: Vec::new(),
            served: BTreeMap::new(),
            slowest: Duration::ZERO,
            elapsed: Duration::ZERO,
        }
    }

    /// The failures of connections that were not already under way at any of `instants`:
    /// a connection whose backend was reached just before a host was cut off the network
    /// loses its bytes with the link, and no proxy can save it.
    pub fn failures_except_in_flight_at(&self, instants: &[Instant]) -> Vec<Failure> {
        self.failures
            .iter()
            .filter(|f| {
                !instants.iter().any(|i| {
                    let at = i.saturating_duration_since(self.started);
                    f.began <= at && at <= f.ended
                })
            })
            .cloned()
            .collect()
    }

    pub fn summary(&self) -> String {
        let first: Vec<String> = self
            .failures
            .iter()
            .take(5)
            .map(|f| f.to_string())
            .collect();
        format!(
            "{} connections in {:?}, {} failed {}, served {:?}, slowest {:?}",
            self.total,
            self.elapsed,
            self.failures.len(),
            first.join(" "),
            self.served,
            self.slowest
        )
    }
}

impl Load {
    pub fn start(ns: &Netns, vip: SocketAddrV4, max_conns: usize, max_time: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = ns.spawn(move || {
            let mut r = LoadReport::new();
            let start = r.started;
            while !flag.load(Ordering::Relaxed) && r.total < max_conns && start.elapsed() < max_time
            {
                let t = Instant::now();
                match who_serves(vip) {
                    Ok(name) => *r.served.entry(name).or_default() += 1,
                    Err(e) => r.failures.push(Failure {
                        began: t - start,
                        ended: start.elapsed(),
                        error: e.to_string(),
                    }),
                }
                r.slowest = r.slowest.max(t.elapsed());
                r.total += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            r.elapsed = start.elapsed();
            r
        });
        Load {
            stop,
            handle: Some(handle),
        }
    }

    /// Waits for the loop to reach its bounds and returns what it saw.
    pub fn wait(mut self) -> LoadReport {
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("client loop panicked")
    }

    /// Stops the loop and returns what it saw.
    pub fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("client loop panicked")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Median of durations (the upper one of an even count).
pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}
