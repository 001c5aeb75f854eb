//! Runs the real `fluxd` and `fluxctl` binaries for black-box tests: each daemon gets its own
//! state directory and API socket, so tests run in parallel without touching the system's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::steered::{self, Action, Steered};

pub struct Fluxd {
    child: Option<Child>,
    /// Runs inside this network namespace (`ip netns exec`), with its data plane on.
    netns: Option<String>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub host_name: String,
    args: Vec<String>,
    /// Passed as fds 3, 4, ... with `LISTEN_FDS` = their number and `LISTEN_PID` = fluxd's
    /// pid, as systemd's socket activation does (`start_with_socket`, `start_with_sockets`).
    listen_fds: Vec<std::os::fd::RawFd>,
    /// RLIMIT_NOFILE (soft and hard) to start the daemon with (`set_fd_limit`); None keeps
    /// the test process's own.
    fd_limit: Option<u64>,
    /// Environment variables to start the daemon with (`set_env`).
    env: Vec<(String, String)>,
    /// The bpf file system its steering is pinned on (in-namespace daemons): `ip netns exec`
    /// hides the machine's /sys/fs/bpf, and pins must outlive each run of the daemon.
    _bpffs: Option<BpfFs>,
    _tmp: Option<tempfile::TempDir>,
}

/// A bpf file system mounted on a directory of a test's own (unmounted when dropped, which
/// also releases whatever is pinned there).
pub struct BpfFs {
    dir: PathBuf,
}

impl BpfFs {
    pub fn mount(dir: PathBuf) -> BpfFs {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount bpf: {out:?}");
        BpfFs { dir }
    }

    /// What `--bpf-dir` takes.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.join("flux")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

impl Fluxd {
    /// Starts fluxd with the embedded store in a fresh directory.
    pub fn embedded() -> Fluxd {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut f = Fluxd::new(dir, "h1", &[]);
        f._tmp = Some(tmp);
        f.start();
        f
    }

    /// Starts fluxd on etcd with its own socket and host name.
    pub fn etcd(endpoint: &str, host_name: &str, extra: &[&str]) -> Fluxd {
        let tmp = tempfile::tempdir().unwrap();
        let store = format!("etcd://{}", endpoint.trim_start_matches("http://"));
        let mut args = vec!["--store", store.as_str()];
        args.extend_from_slice(extra);
        let mut f = Fluxd::new(tmp.path().to_path_buf(), host_name, &args);
        f._tmp = Some(tmp);
        f.start();
        f
    }

    /// Starts fluxd with its data plane (rules and proxy) inside the namespace `ns`, on the
    /// embedded store.
    pub fn dataplane(ns: &str, extra: &[&str]) -> Fluxd {
        Fluxd::in_netns(ns, "h1", extra)
    }

    /// Starts fluxd with its data plane inside the namespace `ns` as host `host_name`; `extra`
    /// picks the store (`--store etcd://...`), `--host-ip`, `--docker`, `--host-ttl` and so on.
    /// One such daemon per namespace is one simulated host of a cluster.
    pub fn in_netns(ns: &str, host_name: &str, extra: &[&str]) -> Fluxd {
        let mut f = Fluxd::unstarted_in_netns(ns, host_name, extra);
        f.start();
        f
    }

    /// Starts fluxd without a data plane inside the namespace `ns`, as host `host_name`: a
    /// further host of a cluster in a namespace whose data plane another fluxd already runs
    /// (one set of rules per namespace), for tests that need the host present in the store.
    pub fn control_in_netns(ns: &str, host_name: &str, extra: &[&str]) -> Fluxd {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = Fluxd::new(tmp.path().to_path_buf(), host_name, extra);
        f.netns = Some(ns.to_string());
        f._tmp = Some(tmp);
        f.start();
        f
    }

    /// As `in_netns`, not started yet.
    pub fn unstarted_in_netns(ns: &str, host_name: &str, extra: &[&str]) -> Fluxd {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = Fluxd::new(tmp.path().to_path_buf(), host_name, extra);
        f.args.retain(|a| a != "--no-dataplane");
        f.netns = Some(ns.to_string());
        if !extra.contains(&"--bpf-dir") {
            let bpffs = BpfFs::mount(tmp.path().join("bpf"));
            f.args.extend([
                "--bpf-dir".to_string(),
                bpffs.pin_dir().display().to_string(),
            ]);
            f._bpffs = Some(bpffs);
        }
        f._tmp = Some(tmp);
        f
    }

    /// Starts (or restarts) with `fd` as a socket passed by systemd: fd 3, `LISTEN_FDS=1`,
    /// `LISTEN_PID` set to fluxd's own pid. The caller keeps `fd` open, as systemd does.
    pub fn start_with_socket(&mut self, fd: std::os::fd::RawFd) {
        self.start_with_sockets(&[fd]);
    }

    /// Starts (or restarts) with `fds` passed in that order as fds 3, 4, ..., as a socket
    /// unit with several `ListenStream=` lines passes them.
    pub fn start_with_sockets(&mut self, fds: &[std::os::fd::RawFd]) {
        self.listen_fds = fds.to_vec();
        self.start();
    }

    /// The socket that `spawn` and `start` pass, as `start_with_socket` does.
    pub fn set_listen_fd(&mut self, fd: std::os::fd::RawFd) {
        self.listen_fds = vec![fd];
    }

    /// Starts (or restarts) the daemon with at most `n` open files, as `LimitNOFILE=n` would:
    /// for tests of what happens when fluxd runs out of fds.
    pub fn set_fd_limit(&mut self, n: u64) {
        self.fd_limit = Some(n);
    }

    /// Waits up to `limit` for a daemon expected to exit by itself; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A daemon that is not started yet, for tests that pass their own flags.
    pub fn new(dir: PathBuf, host_name: &str, extra: &[&str]) -> Fluxd {
        let socket = dir.join("fluxd.sock");
        let mut args = vec![
            "run".to_string(),
            "--no-dataplane".into(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--api".into(),
            format!("unix://{}", socket.display()),
            "--host-name".into(),
            host_name.into(),
        ];
        // Many daemons run at once: each UI listener takes a free port unless a test asks.
        if !extra.contains(&"--http") {
            args.extend(["--http".to_string(), "127.0.0.1:0".to_string()]);
        }
        if !extra.contains(&"--host-ip") {
            args.extend(["--host-ip".to_string(), "127.0.0.1".to_string()]);
        }
        // Tests that want Docker pass their own daemon's socket; none touches the host's.
        if !extra.contains(&"--docker") {
            args.extend(["--docker".to_string(), "none".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Fluxd {
            child: None,
            netns: None,
            dir,
            socket,
            host_name: host_name.into(),
            args,
            listen_fds: Vec::new(),
            fd_limit: None,
            env: Vec::new(),
            _bpffs: None,
            _tmp: None,
        }
    }

    /// Starts (or restarts) the daemon with `key=value` in its environment (e.g. a `PATH`
    /// without some program).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.into(), value.into()));
    }

    /// The `--bpf-dir` of an in-namespace daemon (for `fluxd cleanup --bpf-dir`).
    pub fn bpf_dir(&self) -> Option<PathBuf> {
        self._bpffs.as_ref().map(BpfFs::pin_dir)
    }

    /// `fluxd cleanup` in the daemon's namespace with its `--bpf-dir`, as fluxd.socket's
    /// `ExecStopPost` runs it after a stop; its output, checked to succeed.
    pub fn cleanup(&self) -> std::process::Output {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            self.netns.as_deref().expect("an in-namespace daemon"),
        ]);
        cmd.args([env!("CARGO_BIN_EXE_fluxd"), "cleanup"]);
        if let Some(dir) = self.bpf_dir() {
            cmd.arg("--bpf-dir").arg(dir);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "fluxd cleanup: {out:?}");
        out
    }

    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Starts the process without waiting for it to answer.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("fluxd.log"))
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]);
                c
            }
            None => Command::new("env"),
        };
        if !self.listen_fds.is_empty() {
            use std::os::unix::process::CommandExt;
            let fds = self.listen_fds.clone();
            assert!(fds.len() <= 8, "at most 8 passed sockets");
            // The shell's pid is fluxd's after `exec`, whatever `ip netns exec` does.
            cmd.args([
                "sh",
                "-c",
                "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"",
            ])
            .env("LISTEN_FDS", fds.len().to_string())
            .env_remove("LISTEN_FDNAMES");
            // SAFETY: only async-signal-safe calls between fork and exec (fcntl, dup2; `fds`
            // was allocated before the fork).
            unsafe {
                cmd.pre_exec(move || {
                    // Out of the way first, so that moving one to 3 + i cannot close another
                    // that happens to sit there.
                    let mut high = [0; 8];
                    for (i, fd) in fds.iter().take(high.len()).enumerate() {
                        high[i] = libc::fcntl(*fd, libc::F_DUPFD, 100);
                        if high[i] < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for (i, fd) in high.iter().take(fds.len()).enumerate() {
                        if libc::dup2(*fd, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(*fd);
                    }
                    Ok(())
                });
            }
        }
        if let Some(n) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; the limit is inherited across exec (and
            // across `ip netns exec`, which execs fluxd in place).
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg(env!("CARGO_BIN_EXE_fluxd"));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .args(&self.args)
            .env_remove("FLUXD_STORE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("fluxd exited with {status}: {}", self.log());
                }
            }
            if self.ctl(&["list"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("fluxd not ready after 20 s: {}", self.log());
    }

    /// Runs fluxctl against this daemon.
    /// `fluxctl instance add SERVICE NAME --address ADDR`, which must succeed.
    pub fn add_instance(&self, service: &str, name: &str, addr: impl std::fmt::Display) {
        let addr = addr.to_string();
        self.ok(&["instance", "add", service, name, "--address", &addr]);
    }

    /// Waits until the data plane hands connections to the service's VIP to the proxy, on
    /// whichever steering path fluxd runs (`fluxd debug`: a `flux-vips` member on nat, a `proxy`
    /// entry with its local route on bpf); panics with the log after 20 s (installing can take
    /// seconds while parallel tests' dockerds hold the xtables lock).
    pub fn wait_routed(&self, service: &str) {
        self.wait_steered(service, Action::Proxy);
    }

    /// Waits until the data plane refuses new connections to the service's VIP at once (a
    /// `tcp` service with no instance): a `flux-empty` member on nat, a `refuse` entry with its
    /// local route on bpf; panics with the log after 20 s.
    pub fn wait_refusing(&self, service: &str) {
        self.wait_steered(service, Action::Refuse);
    }

    fn wait_steered(&self, service: &str, action: Action) {
        let done = wait_until(Duration::from_secs(20), || {
            self.steered_as(service) == Some(action)
        });
        assert!(
            done.is_some(),
            "{service}'s VIP never steered as {action:?}: {:?}\n{}",
            self.steered(),
            self.log()
        );
    }

    /// What the data plane does with `service`'s VIP now, if anything (a service the VIP guard
    /// refuses, or one without an address, gets nothing).
    pub fn steered_as(&self, service: &str) -> Option<Action> {
        self.steered()
            .into_iter()
            .find(|s| s.service == service)
            .map(|s| s.action)
    }

    /// Every VIP the data plane steers, read back from the kernel by `fluxd debug`.
    pub fn steered(&self) -> Vec<Steered> {
        steered::from_debug(&self.debug())
    }

    /// The steering path in use: `bpf` or `nat`.
    pub fn steering(&self) -> String {
        steered::path(&self.debug()).to_string()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        fluxctl(&self.socket, args)
    }

    /// Runs fluxctl, asserting success, and returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "fluxctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Like `ok` with `--json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// `fluxd debug --json` against this daemon.
    pub fn debug(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_fluxd"))
            .args(["debug", "--json", "--api"])
            .arg(format!("unix://{}", self.socket.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Open file descriptors of the daemon, from /proc.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time the daemon used so far (user + system, all threads), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces:
        // state is field 3, utime 14 and stime 15 (in clock ticks).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the daemon was started and has not been stopped or killed since (it may have
    /// exited by itself: see `log`).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: what a crash looks like.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(
                        status.success(),
                        "fluxd stopped with {status}: {}",
                        self.log()
                    );
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("fluxd did not stop within 10 s: {}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("fluxd.log")).unwrap_or_default()
    }
}

impl Drop for Fluxd {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn fluxctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fluxctl"))
        .arg("--api")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs fluxctl against any `--api` URL.
pub fn fluxctl_api(api: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fluxctl"))
        .arg("--api")
        .arg(api)
        .args(args)
        .env_remove("FLUX_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Polls `check` every 20 ms until it returns true or `limit` passes; returns the time it took.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
