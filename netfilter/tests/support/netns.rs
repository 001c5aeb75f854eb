//! A network namespace owned by one test and deleted when it ends, panics included.

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use netfilter::{CommandRunner, Netfilter};

/// Makes namespace names unique within this test process; the pid makes them unique across
/// concurrent test runs.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace created for one test. Every command it runs goes through
/// `ip netns exec`, so a test can never touch the root namespace's iptables, ipsets or routes
/// (ipsets belong to the network namespace too, and go with it).
pub struct Netns {
    /// `flux-nf-<pid>-<n>`: recognisable as a leftover of these tests if a run is killed.
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with `lo` up, or `None` when not running as root (the tests
    /// then skip: creating namespaces needs root).
    pub fn new() -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: creating network namespaces needs root");
            return None;
        }
        let name = format!(
            "flux-nf-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        // From here on Drop deletes the namespace, even if bringing lo up fails.
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle whose every iptables command runs inside this namespace.
    pub fn netfilter(&self) -> Netfilter {
        Netfilter::new(self.runner())
    }

    pub fn runner(&self) -> CommandRunner {
        CommandRunner::in_netns(&self.name)
    }

    /// Runs a command inside the namespace and returns its stdout; panics if it fails, since a
    /// test whose setup failed proves nothing.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut argv = vec!["ip", "netns", "exec", &self.name];
        argv.extend_from_slice(args);
        run(&argv)
    }

    /// `iptables -t nat ARGS` inside the namespace, the way an operator (or an accident) would
    /// change the rules behind flux's back.
    pub fn nat(&self, args: &[&str]) -> String {
        let mut argv = vec!["iptables", "-t", "nat"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// `ipset ARGS` inside the namespace.
    pub fn ipset(&self, args: &[&str]) -> String {
        let mut argv = vec!["ipset"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// Every set in the namespace as `ipset save` prints it, members sorted (they come in hash
    /// order) and without the `initval` a re-created set gets afresh, so two snapshots compare
    /// equal when the sets hold the same members.
    pub fn sets(&self) -> String {
        let mut lines: Vec<String> = self
            .ipset(&["save"])
            .lines()
            .map(|l| match l.find(" initval ") {
                Some(at) if l.starts_with("create ") => l[..at].to_string(),
                _ => l.to_string(),
            })
            .collect();
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Feeds `input` to `iptables-restore --noflush` inside the namespace.
    pub fn restore(&self, input: &str) {
        use netfilter::Runner;
        self.runner()
            .run("iptables-restore", &["--noflush"], Some(input))
            .expect("test rules are valid");
    }

    /// `iptables-save` of every table, without the parts that change on their own (timestamp
    /// comments and counters), so two snapshots compare equal when the rules are equal.
    pub fn save(&self) -> String {
        normalise(&self.exec(&["iptables-save"]))
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it creates live here.
    /// A fresh thread, because a thread cannot reliably return to the root namespace and the
    /// test's own threads must stay where they are.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&path).expect("namespace file exists");
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("setns into test namespace");
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Not `run`: panicking in Drop during a test failure would abort and hide the cause.
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("could not delete namespace {}: {status:?}", self.name);
        }
    }
}

/// Drops `# ...` lines and zeroes `[packets:bytes]` counters.
pub fn normalise(save: &str) -> String {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| match (line.rfind(" ["), line.ends_with(']')) {
            (Some(at), true) if line.starts_with(':') => format!("{} [0:0]\n", &line[..at]),
            _ => format!("{line}\n"),
        })
        .collect()
}

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("command output is UTF-8")
}
