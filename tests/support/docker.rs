//! A real Docker daemon per test, inside a network namespace the test created, so that Docker's
//! bridge, iptables rules and containers live and die with that namespace and never touch the
//! machine's own network. Each daemon keeps all its state (data, exec root, sockets, pidfile,
//! containerd) under one temporary directory and is torn down completely on drop, including
//! after a panic or a crash of the daemon: a leaked dockerd, containerd, shim or container would
//! outlive the test and disturb every later one.
//!
//! No image can be pulled here, so images are imported from a rootfs holding only the static
//! busybox (`/bin/busybox` from busybox-static) and a symlink per applet.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::netns::Netns;

/// The CLI that matches the daemon (20.10). /usr/local/bin/docker is a newer CLI whose API
/// version this daemon refuses.
const DOCKER_CLI: &str = "/usr/bin/docker";

/// The port a name server container listens on.
pub const NAME_PORT: u16 = 8080;

/// No test command should take this long; a hung daemon must fail the test, not stall it.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Dockerd {
    /// The namespace it runs in, by name (for threads that join it) and by inode (which still
    /// identifies it if the name was deleted first).
    pub ns: String,
    ns_inode: u64,
    pub dir: PathBuf,
    /// The API socket: give fluxd `--docker unix://` + this (see `endpoint`).
    pub socket: PathBuf,
    /// Address of `docker0`, `198.19.N.1`; containers' default gateway.
    pub bridge_ip: Ipv4Addr,
    args: Vec<String>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Dockerd {
    /// Starts a daemon inside `ns` and waits until it answers. Keep the value on the thread
    /// that started it: the daemon is told to stop when that thread ends (PR_SET_PDEATHSIG),
    /// so that a test process killed from outside does not leave it running.
    pub fn new(ns: &Netns) -> Dockerd {
        let tmp = tempfile::Builder::new()
            .prefix("flux-dockerd-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        // Distinct per daemon within a process, and spread across processes; 250 is the test
        // LAN (TESTBED.md), so N stays in 1..=249.
        let n =
            (std::process::id() as usize * 31 + COUNTER.fetch_add(1, Ordering::Relaxed)) % 249 + 1;
        let bridge_ip = Ipv4Addr::new(198, 19, n as u8, 1);
        // An empty config file: /etc/docker/daemon.json, if anyone writes one, must not change
        // (or break) the test daemon.
        fs::write(dir.join("daemon.json"), "{}").unwrap();
        let socket = dir.join("docker.sock");
        let p = |s: &str| dir.join(s).display().to_string();
        let args = vec![
            format!("--net=/var/run/netns/{}", ns.name),
            "dockerd".into(),
            "--config-file".into(),
            p("daemon.json"),
            "--data-root".into(),
            p("data"),
            "--exec-root".into(),
            p("exec"),
            "--pidfile".into(),
            p("docker.pid"),
            "-H".into(),
            format!("unix://{}", socket.display()),
            "--bip".into(),
            format!("{bridge_ip}/24"),
            // Bounds the stop of containers that ignore SIGTERM (a shell as pid 1 does).
            "--shutdown-timeout".into(),
            "2".into(),
        ];
        let ns_inode = fs::metadata(format!("/var/run/netns/{}", ns.name))
            .unwrap()
            .ino();
        let mut d = Dockerd {
            ns: ns.name.clone(),
            ns_inode,
            dir,
            socket,
            bridge_ip,
            args,
            child: None,
            _tmp: Some(tmp),
        };
        d.spawn();
        d
    }

    /// Starts the daemon again on the same state, after `kill_daemon`: Docker restarting.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon still running");
        self.spawn();
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let mut cmd = Command::new("nsenter");
        // `ip netns exec` would remount /sys, after which dockerd finds no devices cgroup
        // (TESTBED.md); nsenter with only --net execs dockerd in place, so it is our child.
        cmd.args(&self.args)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        self.child = Some(cmd.spawn().unwrap());
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                panic!("dockerd exited with {status}: {}", self.log());
            }
            if self
                .docker_timeout(&["info"], Duration::from_secs(5))
                .status
                .success()
            {
                break;
            }
            if Instant::now() > deadline {
                panic!("dockerd not ready after 30 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "dockerd in {} ready in {:?} ({})",
            self.ns,
            started.elapsed(),
            self.bridge_ip
        );
    }

    /// The value for fluxd's `--docker`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The daemon's own pid (it writes the same to its pidfile).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL to dockerd: what a crash looks like. The shims and the containers keep
    /// running; the containerd that this dockerd started dies with it (parent-death signal).
    /// Returns once that containerd is reaped: until then its pid still exists, and a
    /// restarted dockerd would take it for a live containerd and wait for it in vain.
    pub fn kill_daemon(&mut self) {
        let containerd = fs::read_to_string(self.dir.join("exec/containerd/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = containerd {
            let gone = Path::new("/proc").join(pid.to_string());
            let deadline = Instant::now() + Duration::from_secs(10);
            while gone.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGTERM to dockerd and wait for it to exit, as `systemctl stop docker` does: it stops
    /// the containers (they come back with the daemon if their restart policy says so) and
    /// keeps its state for `restart`. Returns once its containerd is gone too (see
    /// `kill_daemon`).
    pub fn stop_daemon(&mut self) {
        let containerd = fs::read_to_string(self.dir.join("exec/containerd/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    eprintln!("dockerd did not stop within 20 s; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(pid) = containerd {
            let gone = Path::new("/proc").join(pid.to_string());
            let deadline = Instant::now() + Duration::from_secs(10);
            while gone.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Runs the docker CLI against this daemon and returns its output, whatever its status.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_timeout(args, CLI_TIMEOUT)
    }

    fn docker_timeout(&self, args: &[&str], limit: Duration) -> Output {
        output_within(self.cli(args), None, limit)
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER_CLI);
        c.arg("-H")
            .arg(self.endpoint())
            .args(args)
            // Keeps the CLI away from root's ~/.docker and any context chosen there.
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        c
    }

    /// Runs the docker CLI, asserting success, and returns stdout without surrounding space.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Imports the busybox image as `name_tag` (e.g. `flux-test:1`). Import it under several
    /// names and tags to test image and tag selection: all are the same bytes.
    pub fn import_image(&self, name_tag: &str) {
        self.import_image_with(name_tag, &[]);
    }

    /// Like `import_image`, with extra Dockerfile instructions (`LABEL k=v`, `ENV K=V`,
    /// `EXPOSE 8080`) baked into the image, for selectors that match what an image carries.
    pub fn import_image_with(&self, name_tag: &str, changes: &[&str]) {
        let mut cmd = self.cli(&["import", "-c", r#"CMD ["/bin/sh"]"#]);
        for c in changes {
            cmd.args(["-c", c]);
        }
        cmd.args(["-", name_tag]);
        let started = Instant::now();
        let out = output_within(cmd, Some(rootfs_tar()), CLI_TIMEOUT);
        assert!(
            out.status.success(),
            "docker import {name_tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("imported {name_tag} in {:?}", started.elapsed());
    }

    /// `docker run -d ARGS...`; returns the container's full id.
    pub fn run(&self, args: &[&str]) -> String {
        let mut a = vec!["run", "-d"];
        a.extend_from_slice(args);
        self.ok(&a)
    }

    /// Runs a container named `name` that answers every TCP connection on `NAME_PORT` with
    /// `name` and a newline, then echoes what it reads until end of stream: the same protocol
    /// as `support::backend::Backend`, so `who_serves` tells which container served a
    /// connection. `extra` goes before the image (`-p`, `-l`, `-e`, `--network`...).
    ///
    /// busybox `nc -ll -e` keeps one listening socket and forks a handler per connection (and
    /// reaps it), so back-to-back and concurrent connections never meet a closed port, unlike
    /// a shell loop around `nc -l`, which refuses connections between two iterations.
    ///
    /// It runs under `--init` (docker-init as pid 1), so SIGTERM stops it at once: a busybox pid
    /// 1 would ignore it, and every stop, and every restart of the daemon, would wait out the
    /// stop timeout.
    ///
    /// Returns once the server answers on the container's IP; a container without one (no
    /// network, host network) is returned as soon as it runs.
    pub fn run_name_server(&self, image: &str, name: &str, extra: &[&str]) -> String {
        let port = NAME_PORT.to_string();
        let handler = format!("echo {name}; exec cat");
        let mut a = vec!["--init", "--name", name];
        a.extend_from_slice(extra);
        a.extend_from_slice(&[image, "nc", "-ll", "-p", &port, "-e", "sh", "-c", &handler]);
        let id = self.run(&a);
        if let Some(ip) = self.container_ip(&id) {
            let addr = SocketAddrV4::new(ip, NAME_PORT);
            let want = name.to_string();
            let ok = self.in_ns(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if super::backend::who_serves(addr).is_ok_and(|n| n == want) {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                false
            });
            assert!(
                ok,
                "{name} not answering on {addr}: {}",
                self.ok(&["logs", &id])
            );
        }
        id
    }

    /// `docker stop` with a one second grace: a busybox shell as pid 1 ignores SIGTERM, so its
    /// stop ends in SIGKILL, and the default ten seconds would only slow tests down.
    pub fn stop(&self, id: &str) {
        self.ok(&["stop", "-t", "1", id]);
    }

    pub fn start(&self, id: &str) {
        self.ok(&["start", id]);
    }

    pub fn kill(&self, id: &str) {
        self.ok(&["kill", id]);
    }

    /// Removes the container, running or not.
    pub fn rm(&self, id: &str) {
        self.ok(&["rm", "-f", id]);
    }

    pub fn inspect(&self, id: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", id])).unwrap();
        v[0].clone()
    }

    /// The container's address on its (first) network, `None` without one.
    pub fn container_ip(&self, id: &str) -> Option<Ipv4Addr> {
        let v = self.inspect(id);
        v["NetworkSettings"]["Networks"]
            .as_object()?
            .values()
            .filter_map(|n| n["IPAddress"].as_str()?.parse().ok())
            .next()
    }

    /// The host port Docker published for `port/tcp` (on 0.0.0.0), `None` if none.
    pub fn host_port(&self, id: &str, port: u16) -> Option<u16> {
        let v = self.inspect(id);
        v["NetworkSettings"]["Ports"][format!("{port}/tcp")]
            .as_array()?
            .iter()
            .filter(|b| b["HostIp"].as_str().is_some_and(|ip| !ip.contains(':')))
            .find_map(|b| b["HostPort"].as_str()?.parse().ok())
    }

    /// Runs `f` on a thread inside the daemon's namespace, where container IPs and published
    /// ports are reachable.
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let fd = fs::File::open(&path).expect("open namespace");
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Everything still running on behalf of this daemon: processes naming its directory
    /// (dockerd, containerd, shims), processes of its containers, and docker-proxy processes
    /// in its namespace. Empty after drop.
    pub fn leftovers(&self) -> Vec<i32> {
        leftovers(&self.dir, self.ns_inode)
    }

    /// Removes the containers, stops the daemon by the pid in its pidfile, then kills whatever
    /// a crashed or stuck daemon left behind and unmounts what it left mounted, so that the
    /// directory can be deleted.
    fn shutdown(&mut self) {
        if let Some(mut child) = self.child.take() {
            let ids = self.docker_timeout(&["ps", "-aq"], Duration::from_secs(10));
            let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut a = vec!["rm", "-f"];
                a.extend(ids);
                self.docker_timeout(&a, Duration::from_secs(20));
            }
            let pid = fs::read_to_string(self.dir.join("docker.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .unwrap_or(child.id() as i32);
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    eprintln!("dockerd did not stop within 15 s; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("processes of dockerd in {} survive: {left:?}", self.ns);
                break;
            }
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Cgroups of containers whose daemon died before removing them.
        for id in container_ids(&self.dir) {
            for c in cgroup_dirs(&id) {
                let _ = fs::remove_dir(c);
            }
        }
        unmount_under(&self.dir);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(tmp) = self._tmp.take() {
            let path = tmp.path().to_path_buf();
            if let Err(e) = tmp.close() {
                eprintln!("could not remove {}: {e}", path.display());
            }
        }
    }
}

/// The image's content as a tar stream, built once per process: bin/busybox plus a symlink per
/// applet it reports, an /etc/passwd for root, and empty /tmp and /www.
fn rootfs_tar() -> Vec<u8> {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let started = Instant::now();
        let tmp = tempfile::Builder::new()
            .prefix("flux-rootfs-")
            .tempdir()
            .unwrap();
        let root = tmp.path();
        for d in ["bin", "etc", "root", "tmp", "www"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
        let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
        assert!(list.status.success(), "busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            if applet != "busybox" {
                symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
        }
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
        let out = Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(root)
            .args(["-c", "."])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "busybox rootfs built in {:?} ({} bytes)",
            started.elapsed(),
            out.stdout.len()
        );
        out.stdout
    })
    .clone()
}

/// Runs `cmd` with `input` on stdin, killing it if it takes longer than `limit` (the output
/// then has a failure status).
fn output_within(mut cmd: Command, input: Option<Vec<u8>>, limit: Duration) -> Output {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(bytes) = input {
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let mut out = rx.recv().unwrap().unwrap();
            out.stderr
                .extend_from_slice(format!("\nkilled after {limit:?}").as_bytes());
            out
        }
    }
}

fn leftovers(dir: &Path, ns_inode: u64) -> Vec<i32> {
    let dir = dir.display().to_string();
    let mut pids = Vec::new();
    for id in container_ids(Path::new(&dir)) {
        for c in cgroup_dirs(&id) {
            if let Ok(s) = fs::read_to_string(c.join("cgroup.procs")) {
                pids.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // Zombies have an empty command line and cannot be killed; init reaps them.
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let in_ns = fs::metadata(e.path().join("ns/net")).is_ok_and(|m| m.ino() == ns_inode);
        if cmdline.contains(&dir) || (in_ns && comm.trim() == "docker-proxy") {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Ids of the containers the daemon ever created and did not remove: its data root keeps a
/// directory per container, which survives the daemon.
fn container_ids(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join("data/containers"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The container's cgroup in every v1 hierarchy (the cgroupfs driver puts it under /docker).
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("docker").join(id))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Detaches every mount under `dir`, deepest first: overlay roots of containers and network
/// namespace files that a daemon which died did not unmount, and which would make the
/// directory impossible to delete.
fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}
