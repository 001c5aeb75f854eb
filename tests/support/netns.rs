//! Network namespaces that a test creates for itself and deletes when dropped, so that iptables
//! rules and test traffic never touch the machine's own namespace. Work inside one runs either
//! as a child process (`ip netns exec`) or on a thread that joined the namespace (`setns`
//! changes only the calling thread), whose sockets stay in the namespace wherever they are used.

use std::fs::File;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{setns, CloneFlags};

/// The VIP range tests use (TESTBED.md): routed to `lo` inside each namespace so that a
/// connect to a VIP reaches the nat OUTPUT hook instead of failing with ENETUNREACH.
pub const VIP_RANGE: &str = "198.18.0.0/16";

pub struct Netns {
    pub name: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    /// A fresh namespace with `lo` up and the VIP range routed to it; no other interface, so
    /// nothing in it can reach beyond the machine.
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "flux-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // With no source address the kernel picks 0.0.0.0 for these connections.
        ns.ip(&["route", "add", VIP_RANGE, "dev", "lo", "src", "127.0.0.1"]);
        ns
    }

    /// `ip -n NAME ...`, asserting success.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["ip", "-n", &self.name];
        a.extend_from_slice(args);
        run(&a);
    }

    /// Runs a command inside the namespace and returns its output, whatever its status.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    /// `iptables-save -t nat` inside the namespace, without the comment and counter lines that
    /// differ between two reads of the same rules.
    pub fn nat_table(&self) -> String {
        let out = self.exec(&["iptables-save", "-t", "nat"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.find(" [") {
                Some(i) if l.starts_with(':') => &l[..i],
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `ipset save flux-vips` inside the namespace, members sorted (they come in hash order);
    /// empty when the set does not exist.
    pub fn vip_set(&self) -> String {
        self.ipset_save("flux-vips")
    }

    /// `ipset save flux-empty` (the VIPs refused because their service has no instance) inside
    /// the namespace, members sorted; empty when the set does not exist.
    pub fn empty_set(&self) -> String {
        self.ipset_save("flux-empty")
    }

    fn ipset_save(&self, set: &str) -> String {
        let out = self.exec(&["ipset", "save", set]);
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        lines.join("\n")
    }

    /// flux's local routes (the bpf steering's: `ip route show table local proto 171`); empty
    /// when there are none.
    pub fn flux_routes(&self) -> String {
        let out = self.exec(&["ip", "route", "show", "table", "local", "proto", "171"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `iptables-save -t filter` inside the namespace, normalised as [`Netns::nat_table`].
    pub fn filter_table(&self) -> String {
        let out = self.exec(&["iptables-save", "-t", "filter"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.find(" [") {
                Some(i) if l.starts_with(':') => &l[..i],
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in namespace panicked")
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).expect("open namespace");
            setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
