//! A real etcd (Debian's etcd-server) started for one test on loopback ports of its own, in a
//! temporary data directory, and killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`, for the etcd-client crate and for `--store etcd://`.
    pub endpoint: String,
    pub client_port: u16,
    pub peer_port: u16,
    dir: tempfile::TempDir,
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
            let dir = tempfile::tempdir().unwrap();
            let (client_port, peer_port) = (free_port(), free_port());
            let mut etcd = Etcd {
                child: None,
                endpoint: format!("http://127.0.0.1:{client_port}"),
                client_port,
                peer_port,
                dir,
            };
            etcd.spawn();
            if etcd.wait_ready(Duration::from_secs(20)) {
                return etcd;
            }
        }
        panic!("etcd did not start three times; is etcd-server installed?");
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let child = Command::new("etcd")
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&self.endpoint)
            .arg("--advertise-client-urls")
            .arg(&self.endpoint)
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-cluster")
            .arg(format!("test=http://127.0.0.1:{}", self.peer_port))
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
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoint, "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Stops etcd (SIGKILL) but keeps its data, to simulate an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        assert!(self.wait_ready(Duration::from_secs(20)), "{}", self.log());
    }

    /// `etcdctl` against this etcd, returning stdout; for compaction and raw checks.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint)
            .args(args)
            .output()
            .expect("etcdctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
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
