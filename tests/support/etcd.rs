//! A real etcd (Debian's etcd-server) started for one test, in a temporary data directory, and
//! killed when dropped: either on loopback ports of its own in the machine's namespace
//! (`start`), or inside a network namespace the test created, on an address of that namespace
//! (`start_in`, and `cluster_in` for a three-member cluster), where every simulated host of a
//! cluster test reaches it.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fixed ports are safe inside a namespace of the test's own: nothing else listens there.
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

pub struct Etcd {
    child: Option<Child>,
    /// `http://IP:PORT`, for the etcd-client crate and for `--store etcd://`.
    pub endpoint: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// The member's name in its cluster.
    pub name: String,
    /// Runs inside this network namespace (and so does `ctl`), by name.
    pub netns: Option<String>,
    ip: String,
    /// `--initial-cluster`: `name=http://IP:PEER,...`.
    initial_cluster: String,
    dir: tempfile::TempDir,
    /// TLS and auth, boxed: most tests use neither.
    secure: Box<Secure>,
}

#[derive(Default)]
struct Secure {
    /// Clients must speak TLS and show a certificate signed by this CA (`start_tls`).
    tls: Option<TlsFiles>,
    /// `etcdctl --user`, once auth is enabled (`enable_auth`).
    ctl_user: Option<String>,
}

/// PEM files for an etcd on https with `--client-cert-auth`: the CA that signed both sides,
/// etcd's server certificate, and the certificate etcdctl uses.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

/// A port the kernel just handed out and released; etcd binds it a moment later. Collisions with
/// parallel tests are possible in theory and retried by `start`.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts etcd and waits until it answers; panics with its log after 20 s.
    pub fn start() -> Etcd {
        for _ in 0..3 {
            let (client_port, peer_port) = (free_port(), free_port());
            let mut etcd = Etcd::member(None, "test", "127.0.0.1", client_port, peer_port);
            etcd.initial_cluster = format!("test=http://127.0.0.1:{peer_port}");
            etcd.spawn();
            if etcd.wait_ready(Duration::from_secs(20)) {
                return etcd;
            }
        }
        panic!("etcd did not start three times; is etcd-server installed?");
    }

    /// As `start`, on https with `--client-cert-auth` (peers stay on http, on loopback).
    pub fn start_tls(files: TlsFiles) -> Etcd {
        for _ in 0..3 {
            let (client_port, peer_port) = (free_port(), free_port());
            let mut etcd = Etcd::member(None, "test", "127.0.0.1", client_port, peer_port);
            etcd.initial_cluster = format!("test=http://127.0.0.1:{peer_port}");
            etcd.endpoint = format!("https://127.0.0.1:{client_port}");
            etcd.secure.tls = Some(files.clone());
            etcd.spawn();
            if etcd.wait_ready(Duration::from_secs(20)) {
                return etcd;
            }
        }
        panic!("etcd (TLS) did not start three times: is etcd-server installed?");
    }

    /// Turns etcd auth on: a `root` user with `root_password`, and `user` with `password`
    /// holding a role that may read and write keys under `prefix`. etcdctl goes on as root.
    pub fn enable_auth(&mut self, root_password: &str, user: &str, password: &str, prefix: &str) {
        let role = format!("{user}-rw");
        for args in [
            vec!["user", "add", &format!("root:{root_password}")],
            vec!["user", "add", &format!("{user}:{password}")],
            vec!["role", "add", &role],
            vec![
                "role",
                "grant-permission",
                &role,
                "--prefix=true",
                "readwrite",
                prefix,
            ],
            vec!["user", "grant-role", user, &role],
            vec!["auth", "enable"],
        ] {
            let out = self.ctl_output(&args);
            assert!(
                out.status.success(),
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.secure.ctl_user = Some(format!("root:{root_password}"));
    }

    /// Starts a single-member etcd inside the namespace `ns` listening on `ip` (an address of
    /// that namespace) and waits until it answers.
    pub fn start_in(ns: &str, ip: Ipv4Addr) -> Etcd {
        let mut v = Etcd::cluster_in(ns, &[ip]);
        v.pop().unwrap()
    }

    /// Starts one member per address, all inside `ns`, as one cluster, and waits until each
    /// answers (a member is healthy only once the cluster has a leader).
    pub fn cluster_in(ns: &str, ips: &[Ipv4Addr]) -> Vec<Etcd> {
        let names: Vec<String> = (0..ips.len()).map(|i| format!("m{i}")).collect();
        let initial = ips
            .iter()
            .zip(&names)
            .map(|(ip, n)| format!("{n}=http://{ip}:{PEER_PORT}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = ips
            .iter()
            .zip(&names)
            .map(|(ip, n)| {
                let mut m = Etcd::member(Some(ns), n, &ip.to_string(), CLIENT_PORT, PEER_PORT);
                m.initial_cluster = initial.clone();
                m
            })
            .collect();
        for m in members.iter_mut() {
            m.spawn();
        }
        for m in members.iter_mut() {
            assert!(
                m.wait_ready(Duration::from_secs(30)),
                "etcd member {} in {ns} not ready: {}",
                m.name,
                m.log()
            );
        }
        members
    }

    fn member(ns: Option<&str>, name: &str, ip: &str, client_port: u16, peer_port: u16) -> Etcd {
        Etcd {
            child: None,
            endpoint: format!("http://{ip}:{client_port}"),
            client_port,
            peer_port,
            name: name.to_string(),
            netns: ns.map(str::to_string),
            ip: ip.to_string(),
            initial_cluster: String::new(),
            dir: tempfile::Builder::new()
                .prefix("flux-etcd-")
                .tempdir()
                .unwrap(),
            secure: Box::default(),
        }
    }

    /// A command that runs in the member's namespace, if it has one. `nsenter --net` changes
    /// only the network namespace and execs in place, so the child is the program itself.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let mut cmd = self.command("etcd");
        if let Some(t) = &self.secure.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca);
        }
        let child = cmd
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&self.endpoint)
            .arg("--advertise-client-urls")
            .arg(&self.endpoint)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run etcd (Debian package etcd-server)");
        self.child = Some(child);
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if self.healthy() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// `etcdctl endpoint health` against this member: it answers a quorum read.
    pub fn healthy(&self) -> bool {
        self.etcdctl()
            .args([
                "--endpoints",
                &self.endpoint,
                "--command-timeout",
                "2s",
                "endpoint",
                "health",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Whether the process runs (it may still be joining its cluster).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops etcd (SIGKILL) but keeps its data, to simulate an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data (a member rejoins its cluster).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        assert!(self.wait_ready(Duration::from_secs(20)), "{}", self.log());
    }

    /// `etcdctl` against this etcd, returning stdout; for compaction and raw checks.
    pub fn ctl(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.ctl_output(args).stdout).into_owned()
    }

    /// `etcdctl` against this etcd, with its whole output.
    pub fn ctl_output(&self, args: &[&str]) -> std::process::Output {
        self.etcdctl()
            .arg("--endpoints")
            .arg(&self.endpoint)
            .args(args)
            .output()
            .expect("etcdctl")
    }

    /// `etcdctl` with this etcd's TLS files and user, if any.
    fn etcdctl(&self) -> Command {
        let mut c = self.command("etcdctl");
        c.env("ETCDCTL_API", "3");
        if let Some(t) = &self.secure.tls {
            c.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        if let Some(u) = &self.secure.ctl_user {
            c.arg("--user").arg(u);
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
