//! `scripts/install` then `scripts/uninstall` (issue 8) under a staging root, inside a network
//! namespace the test creates: install writes binaries, unit, config, completions and man
//! pages; the installed fluxd runs from that config and leaves its rules (`--keep-rules`);
//! uninstall removes every file and exactly flux's rules, leaving other rules and sets alone.
//! On both steering paths: nat (rules and sets) and bpf (local routes and pins).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::fluxd::{fluxctl, wait_until, BpfFs};
use support::netns::Netns;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn in_ns(ns: &Netns, args: &[&str]) -> Output {
    let out = ns.exec(args);
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The namespace's nat table, the names of its ipsets, its filter table and flux's local
/// routes.
fn kernel_state(ns: &Netns) -> (String, String, String, String) {
    let sets = ns.exec(&["ipset", "list", "-n"]);
    (
        ns.nat_table(),
        String::from_utf8_lossy(&sets.stdout).into_owned(),
        ns.filter_table(),
        ns.flux_routes(),
    )
}

#[test]
fn install_then_uninstall_leaves_nothing() {
    install_then_uninstall_leaves_nothing_on("nat");
}

#[test]
fn install_then_uninstall_leaves_nothing_on_the_bpf_path() {
    install_then_uninstall_leaves_nothing_on("bpf");
}

fn install_then_uninstall_leaves_nothing_on(steering: &str) {
    let ns = Netns::new("install");
    // The bpf path pins on a bpf file system of the test's own (`ip netns exec` hides the
    // machine's /sys/fs/bpf), which fluxd and the uninstall's `fluxd cleanup` both find through
    // FLUXD_BPF_DIR, as they would find the default /sys/fs/bpf/flux on a real host.
    let bpf_tmp = tempfile::tempdir().unwrap();
    let bpffs = BpfFs::mount(bpf_tmp.path().join("bpf"));
    let bpf_dir = bpffs.pin_dir().display().to_string();
    // Someone else's rules and set, which uninstall must not touch.
    in_ns(&ns, &["iptables", "-t", "nat", "-N", "OTHER"]);
    in_ns(
        &ns,
        &["iptables", "-t", "nat", "-A", "OTHER", "-j", "RETURN"],
    );
    in_ns(
        &ns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "198.18.99.1",
            "-j",
            "OTHER",
        ],
    );
    in_ns(
        &ns,
        &[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
        ],
    );
    in_ns(&ns, &["ipset", "create", "other-set", "hash:ip"]);
    let before = kernel_state(&ns);

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_fluxd")).parent().unwrap();
    let install = script("install");
    let out = in_ns(
        &ns,
        &[
            install.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--bin-dir",
            bin_dir.to_str().unwrap(),
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    for f in [
        "usr/local/bin/fluxd",
        "usr/local/bin/fluxctl",
        "etc/systemd/system/fluxd.service",
        "etc/flux/fluxd.toml",
        "usr/share/bash-completion/completions/fluxd",
        "usr/share/bash-completion/completions/fluxctl",
        "usr/share/zsh/vendor-completions/_fluxctl",
        "usr/share/fish/vendor_completions.d/fluxctl.fish",
        "usr/local/share/man/man1/fluxd.1",
        "usr/local/share/man/man1/fluxd-run.1",
        "usr/local/share/man/man1/fluxctl-service-add.1",
        "var/lib/flux/install-manifest",
    ] {
        let p = root.join(f);
        assert!(
            p.metadata().is_ok_and(|m| m.len() > 0),
            "install did not write {f}: {said}"
        );
    }
    let bash = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/fluxctl"))
        .unwrap();
    assert!(bash.contains("instance") && bash.contains("--address"));

    // The installed fluxd runs from the installed config, in the namespace, and leaves its
    // rules behind on a stop with --keep-rules (as under the unit).
    let run = tempfile::tempdir().unwrap();
    let sock = run.path().join("fluxd.sock");
    let log = std::fs::File::create(run.path().join("fluxd.log")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(root.join("usr/local/bin/fluxd"))
        .arg("run")
        .arg("--config")
        .arg(root.join("etc/flux/fluxd.toml"))
        .arg("--keep-rules")
        .arg("--state-dir")
        .arg(run.path().join("state"))
        .arg("--api")
        .arg(format!("unix://{}", sock.display()))
        .args(["--host-name", "h1", "--host-ip", "127.0.0.1"])
        .args(["--http", "127.0.0.1:0", "--docker", "none"])
        .args(["--steering", steering])
        .env("FLUXD_BPF_DIR", &bpf_dir)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("FLUXD_STORE")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let fluxd_log = || std::fs::read_to_string(run.path().join("fluxd.log")).unwrap_or_default();
    let ready = wait_until(Duration::from_secs(20), || {
        fluxctl(&sock, &["list"]).status.success()
    });
    if ready.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("installed fluxd not ready: {}", fluxd_log());
    }
    let out = fluxctl(
        &sock,
        &["service", "add", "web", "--address", "198.18.8.1:80"],
    );
    assert!(out.status.success());
    // An instance, so the VIP is routed (a service with none is refused instead).
    let out = fluxctl(
        &sock,
        &[
            "instance",
            "add",
            "web",
            "b0",
            "--address",
            "127.0.0.1:9000",
        ],
    );
    assert!(out.status.success());
    let installed = || match steering {
        "nat" => ns.vip_set().contains("198.18.8.1,tcp:80"),
        _ => ns.flux_routes().contains("local 198.18.8.1 dev lo"),
    };
    let set = wait_until(Duration::from_secs(10), installed);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stopped = wait_until(Duration::from_secs(15), || {
        child.try_wait().unwrap().is_some()
    });
    if stopped.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    assert!(set.is_some(), "not steered: {}", fluxd_log());
    let pins = || std::fs::read_dir(&bpf_dir).map_or(0, |d| d.count());
    if steering == "nat" {
        assert!(
            installed() && ns.nat_table().contains("FLUX-SERVICES"),
            "--keep-rules left no rules: {}",
            fluxd_log()
        );
        assert!(
            ns.filter_table().contains("FLUX-REJECT"),
            "--keep-rules left no filter rules"
        );
    } else {
        assert!(installed(), "--keep-rules left no route: {}", fluxd_log());
        assert_eq!(pins(), 1, "--keep-rules left no pins: {}", fluxd_log());
        assert!(!ns.nat_table().contains("FLUX"), "{}", ns.nat_table());
    }

    let uninstall = script("uninstall");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&uninstall)
        .args(["--root", root.to_str().unwrap(), "--cleanup-rules"])
        .env("FLUXD_BPF_DIR", &bpf_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "uninstall: {out:?}");
    let left = if root.exists() {
        files_under(&root)
    } else {
        Vec::new()
    };
    assert!(left.is_empty(), "uninstall left {left:?}");
    let after = kernel_state(&ns);
    assert_eq!(after.0, before.0, "nat table differs after uninstall");
    assert_eq!(after.1, before.1, "ipsets differ after uninstall");
    assert_eq!(after.2, before.2, "filter table differs after uninstall");
    assert_eq!(after.3, before.3, "flux's routes left after uninstall");
    assert_eq!(pins(), 0, "pins left after uninstall");
}

/// An edited config survives uninstall (without --purge), and a re-install keeps it.
#[test]
fn edited_config_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_fluxd")).parent().unwrap();
    let run = |script_name: &str, extra: &[&str]| {
        let out = Command::new(script(script_name))
            .arg("--root")
            .arg(&root)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script_name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bin = bin_dir.to_str().unwrap();
    run("install", &["--bin-dir", bin]);
    let config = root.join("etc/flux/fluxd.toml");
    std::fs::write(&config, "store = \"etcd://10.0.0.1:2379\"\n").unwrap();
    let said = run("install", &["--bin-dir", bin]);
    assert!(said.contains("keeping /etc/flux/fluxd.toml"), "{said}");
    assert!(std::fs::read_to_string(&config).unwrap().contains("etcd"));
    run("uninstall", &[]);
    assert_eq!(
        files_under(&root),
        vec![root.join("etc"), root.join("etc/flux"), config.clone()]
    );
    // Installing again over a config that install did not write keeps it; --purge removes it
    // only when listed as install's.
    run("install", &["--bin-dir", bin]);
    assert!(std::fs::read_to_string(&config).unwrap().contains("etcd"));
    run("uninstall", &["--purge"]);
    assert!(
        config.exists(),
        "a config install did not write is never removed"
    );
}
