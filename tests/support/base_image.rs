//! A Debian bookworm root file system for building flux's container images where no registry
//! can be reached: made with debootstrap from Debian's mirror (which these machines reach),
//! holding the packages the images need, so that the Dockerfiles' package step finds them and
//! downloads nothing. `docker import` turns the tarball into a base image.
//!
//! The tarball is kept under the test target's tmp directory, named after what is in it, so a
//! second run on the same machine skips debootstrap (about a minute).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// What both images need (packaging/docker/Dockerfile and Dockerfile.edge).
const PACKAGES: &str = "iptables,ipset,conntrack,nginx,ca-certificates";

/// The path of the tarball, made on first use (once per process; concurrent processes each
/// write their own temporary file and rename it into place).
pub fn rootfs_tar() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("container-base");
    fs::create_dir_all(&dir).unwrap();
    let tar = dir.join(format!(
        "{SUITE}-minbase-{}.tar",
        PACKAGES.replace(',', "-")
    ));
    if tar.exists() {
        eprintln!("base rootfs: reusing {}", tar.display());
        return tar;
    }
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(&dir)
        .unwrap();
    let root = work.path().join("root");
    // First stage: download and unpack, running nothing from the new system.
    run(Command::new("debootstrap")
        .args(["--foreign", "--variant=minbase"])
        .arg(format!("--include={PACKAGES}"))
        .arg(SUITE)
        .arg(&root)
        .arg(MIRROR));
    // Second stage: the packages' maintainer scripts, chrooted, in a network and mount
    // namespace of their own, so that nothing they start could listen on this machine's
    // network and the /proc and /sys that debootstrap mounts vanish with it (debootstrap also
    // blocks service starts with its own policy-rc.d).
    run(Command::new("unshare")
        .args(["--net", "--mount", "chroot"])
        .arg(&root)
        .args(["/debootstrap/debootstrap", "--second-stage"]));
    // Downloaded packages and package lists are not needed in an image that installs nothing.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for e in fs::read_dir(root.join(d)).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                fs::remove_file(e.path()).unwrap();
            }
        }
    }
    let partial = dir.join(format!(".partial-{}", std::process::id()));
    run(Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(&root)
        .arg("-cf")
        .arg(&partial)
        .arg("."));
    fs::rename(&partial, &tar).unwrap();
    eprintln!(
        "base rootfs: debootstrap {SUITE} with {PACKAGES} in {:?} ({} MB)",
        started.elapsed(),
        fs::metadata(&tar).unwrap().len() >> 20
    );
    tar
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
