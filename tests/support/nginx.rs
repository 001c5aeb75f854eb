//! A real nginx (Debian's) for edge tests: run as root inside a test's network namespace with
//! its own prefix, main configuration, pid file, logs and temp paths in a temporary directory,
//! so that the machine's /etc/nginx and /var/log/nginx are never read or written. Its main
//! configuration includes `conf.d/*.conf` in the `http` block, as Debian's does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;

pub struct Nginx {
    pub dir: PathBuf,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx in `ns` (in the foreground, its own process group) with an empty conf.d.
    pub fn start(ns: &Netns) -> Nginx {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("conf.d")).unwrap();
        std::fs::create_dir_all(dir.join("temp")).unwrap();
        let d = dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {d}/temp/body;
    proxy_temp_path {d}/temp/proxy;
    fastcgi_temp_path {d}/temp/fastcgi;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;
    include {d}/conf.d/*.conf;
}}
"
            ),
        )
        .unwrap();
        let mut n = Nginx {
            dir,
            child: None,
            _tmp: tmp,
        };
        let args = n.args();
        use std::os::unix::process::CommandExt;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nginx"])
            .args(&args)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        n.child = Some(child);
        let pid_file = n.dir.join("nginx.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pid_file.exists() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                n.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    /// `-p PREFIX -c CONF -e ERRLOG`: what every nginx command for this instance takes.
    fn args(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "-p".into(),
            format!("{d}/"),
            "-c".into(),
            format!("{d}/nginx.conf"),
            "-e".into(),
            format!("{d}/error.log"),
        ]
    }

    /// The command `fluxd edge --test-cmd` runs for this instance.
    pub fn test_cmd(&self) -> String {
        format!("nginx {} -t -q", self.args().join(" "))
    }

    /// The command `fluxd edge --reload-cmd` runs for this instance.
    pub fn reload_cmd(&self) -> String {
        format!("nginx {} -s reload", self.args().join(" "))
    }

    /// The include file `fluxd edge` owns.
    pub fn include(&self) -> PathBuf {
        self.dir.join("conf.d/flux.conf")
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // The master and its workers share the process group started above.
        let pg = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
        let _ = c.wait();
    }
}

/// A running `fluxd edge`, its log in a file.
pub struct Edge {
    child: Option<Child>,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Edge {
    /// `fluxd edge --api unix://SOCKET --nginx-conf INCLUDE --test-cmd ... --reload-cmd ...`
    /// with a short interval, plus `extra`.
    pub fn start(socket: &Path, nginx: &Nginx, extra: &[&str]) -> Edge {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("edge.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fluxd"))
            .arg("edge")
            .arg("--api")
            .arg(format!("unix://{}", socket.display()))
            .arg("--nginx-conf")
            .arg(nginx.include())
            .args(["--test-cmd", &nginx.test_cmd()])
            .args(["--reload-cmd", &nginx.reload_cmd()])
            .args(["--interval-ms", "200", "--debounce-ms", "100"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Edge {
            child: Some(child),
            log,
            _tmp: tmp,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let status = c.wait().unwrap();
            assert!(status.success(), "fluxd edge: {status}: {}", self.log());
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
