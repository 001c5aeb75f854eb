//! fluxd under systemd (issue 8): the unit file passes `systemd-analyze verify`, and fluxd
//! talks the notify protocol to a fake `NOTIFY_SOCKET`: READY=1 only once its steering is
//! installed (on nat its rules and set; on bpf its local route and its map entry, with the
//! listener in the socket map), WATCHDOG=1 at half of `WATCHDOG_USEC`, STOPPING=1 on SIGTERM.
//! The data plane runs in a network namespace the test creates.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::fluxd::{fluxctl, BpfFs, Fluxd};
use support::netns::Netns;

/// The notify socket systemd would give fluxd, as a datagram socket in a temp dir.
struct FakeSystemd {
    socket: UnixDatagram,
}

impl FakeSystemd {
    fn bind(path: &Path) -> FakeSystemd {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        FakeSystemd { socket }
    }

    /// The next message within `limit`, as text.
    fn recv(&self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
        None
    }

    /// Messages until one has the line `want`; returns that message and those before it.
    fn wait_for(&self, want: &str, limit: Duration) -> (String, Vec<String>) {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(m) = self.recv(deadline - Instant::now()) {
                if m.lines().any(|l| l == want) {
                    return (m, seen);
                }
                seen.push(m);
            }
        }
        panic!("no {want} within {limit:?}; got {seen:?}");
    }
}

/// fluxd with its data plane inside `ns`, on the store in `dir/state`, with the given
/// environment and flags; not waited for.
fn spawn_fluxd(ns: &Netns, dir: &Path, env: &[(&str, String)], flags: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("fluxd.log"))
        .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.name,
        env!("CARGO_BIN_EXE_fluxd"),
        "run",
    ])
    .arg("--state-dir")
    .arg(dir.join("state"))
    .arg("--api")
    .arg(format!("unix://{}", dir.join("fluxd.sock").display()))
    .args([
        "--host-name",
        "h1",
        "--host-ip",
        "127.0.0.1",
        "--http",
        "127.0.0.1:0",
        "--docker",
        "none",
    ])
    .args(flags)
    .env_remove("FLUXD_STORE")
    .env_remove("NOTIFY_SOCKET")
    .env_remove("WATCHDOG_USEC")
    .env_remove("WATCHDOG_PID")
    .stdin(Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("fluxd.log")).unwrap_or_default()
}

#[test]
fn notify_ready_after_rules_watchdog_and_stopping() {
    notify_ready_after_steering_watchdog_and_stopping("nat");
}

#[test]
fn notify_ready_after_the_bpf_steering_watchdog_and_stopping() {
    notify_ready_after_steering_watchdog_and_stopping("bpf");
}

fn notify_ready_after_steering_watchdog_and_stopping(steering: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A first run (no data plane) stores a service; the store persists in dir/state.
    {
        let mut first = Fluxd::new(dir.to_path_buf(), "h1", &[]);
        first.start();
        first.ok(&["service", "add", "web", "--address", "198.18.7.1:80"]);
        // An instance, so the VIP is routed (a service with none is refused instead).
        first.add_instance("web", "b0", "127.0.0.1:9000");
        first.stop();
    }

    let ns = Netns::new("sysd");
    assert_eq!(ns.vip_set(), "", "a fresh namespace has no flux set");
    assert_eq!(ns.flux_routes(), "", "a fresh namespace has no flux route");
    // The bpf path pins on a bpf file system of the test's own (`ip netns exec` hides the
    // machine's /sys/fs/bpf).
    let bpffs = BpfFs::mount(dir.join("bpf"));
    let pin_dir = bpffs.pin_dir().display().to_string();
    let notify = FakeSystemd::bind(&dir.join("notify.sock"));
    let mut child = spawn_fluxd(
        &ns,
        dir,
        &[
            (
                "NOTIFY_SOCKET",
                dir.join("notify.sock").display().to_string(),
            ),
            ("WATCHDOG_USEC", "1000000".into()),
        ],
        &["--steering", steering, "--bpf-dir", &pin_dir],
    );
    let (ready, before) = notify.wait_for("READY=1", Duration::from_secs(30));
    // Read the kernel's state at once: the steering must already be there.
    if steering == "nat" {
        let set = ns.vip_set();
        let nat = ns.nat_table();
        assert!(
            set.contains("198.18.7.1,tcp:80"),
            "READY=1 before the VIP set member: {set}\n{}",
            log(dir)
        );
        assert!(
            nat.contains("-A FLUX-SERVICES") && nat.contains("-j FLUX-SERVICES"),
            "READY=1 before the nat rules: {nat}"
        );
    } else {
        let routes = ns.flux_routes();
        assert!(
            routes.contains("local 198.18.7.1 dev lo"),
            "READY=1 before the local route: {routes}\n{}",
            log(dir)
        );
        // The map entry and the listener: a connection is accepted by the proxy (which then
        // resets it, since nothing listens at the instance), not refused by the program. The
        // reset may beat the client's own wake-up on loopback: connect then reports it.
        let vip = "198.18.7.1:80".parse().unwrap();
        let connected =
            ns.run(move || std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2)));
        assert!(
            connected.is_ok()
                || matches!(&connected, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "READY=1 before the map entry: {connected:?}\n{}",
            log(dir)
        );
    }
    assert!(
        ready.contains("STATUS=routing 1 services"),
        "READY=1 comes with a status line: {ready:?}"
    );
    assert!(
        before.iter().all(|m| !m.contains("WATCHDOG=1")),
        "watchdog pings before READY=1: {before:?}"
    );
    // And the API serves at that moment.
    let out = fluxctl(&dir.join("fluxd.sock"), &["list"]);
    assert!(out.status.success(), "API not serving at READY=1");

    // WATCHDOG_USEC=1 s: a ping every 0.5 s.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 && start.elapsed() < Duration::from_secs(5) {
        if let Some(m) = notify.recv(Duration::from_millis(500)) {
            pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
    assert!(pings >= 3, "{pings} watchdog pings in 5 s\n{}", log(dir));
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "pings come at half the period, not back to back ({:?} for 3)",
        start.elapsed()
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fluxd did not stop: {}", log(dir));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "fluxd stopped with {status}: {}",
        log(dir)
    );
    assert_eq!(ns.vip_set(), "", "a clean stop removes the set");
    assert_eq!(ns.flux_routes(), "", "a clean stop removes the routes");
    let pins = std::fs::read_dir(&pin_dir).map_or(0, |d| d.count());
    assert_eq!(pins, 0, "a clean stop removes the pins");
}

#[test]
fn no_notify_socket_no_watchdog() {
    // Without NOTIFY_SOCKET nothing is sent and nothing fails; WATCHDOG_USEC alone is harmless.
    let tmp = tempfile::tempdir().unwrap();
    let ns = Netns::new("sysd-plain");
    let mut child = spawn_fluxd(&ns, tmp.path(), &[("WATCHDOG_USEC", "1000000".into())], &[]);
    let sock = tmp.path().join("fluxd.sock");
    let ok = support::fluxd::wait_until(Duration::from_secs(20), || {
        fluxctl(&sock, &["list"]).status.success()
    });
    assert!(ok.is_some(), "fluxd not ready: {}", log(tmp.path()));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(child.try_wait().unwrap().is_none(), "{}", log(tmp.path()));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stopped = support::fluxd::wait_until(Duration::from_secs(15), || {
        child.try_wait().unwrap().is_some()
    });
    if stopped.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", log(tmp.path()));
}

/// `systemd-analyze verify` on packaging/systemd/fluxd.service, with ExecStart pointing at the
/// fluxd just built (verify checks the binary exists) and fluxd's man pages on MANPATH (verify
/// checks `Documentation=man:...`). Any other unit in packaging/systemd is verified alongside.
#[test]
fn unit_file_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let man = tmp.path().join("man");
    let out = Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .arg("man")
        .arg(man.join("man1"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut paths = Vec::new();
    for e in std::fs::read_dir(&units).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replace("/usr/local/bin/fluxd", env!("CARGO_BIN_EXE_fluxd"));
        let dest = tmp.path().join(p.file_name().unwrap());
        std::fs::write(&dest, text).unwrap();
        paths.push(dest);
    }
    assert!(paths.iter().any(|p| p.ends_with("fluxd.service")));
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("MANPATH", &man)
        .output()
        .expect("systemd-analyze (package systemd) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // The hardening holds: systemd rates the unit's exposure "OK" or better (below 4.0 of 10).
    let service = tmp.path().join("fluxd.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=40"])
        .arg(&service)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exposure above 4.0: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Type=notify with the watchdog, restarts on failure, no full capability set.
    let unit = std::fs::read_to_string(units.join("fluxd.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF",
        "ExecStart=/usr/local/bin/fluxd run --config /etc/flux/fluxd.toml --keep-rules",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")));
}
